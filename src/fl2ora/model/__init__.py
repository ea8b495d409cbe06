"""CLIP backbone, tokenizer, zero-shot head and the trainable state."""
