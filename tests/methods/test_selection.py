"""LayerNorm tuning, BitFit and full fine-tuning: which tensors train, how many, and nothing else."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from fl2ora.config import ModelConfig
from fl2ora.methods.selection import select_trainable
from fl2ora.model.backbone import load_backbone
from fl2ora.model.tokenizer import bundled_clip_tokenizer
from fl2ora.model.trainable import trainable_state_dict
from fl2ora.model.zero_shot import ZeroShotClassifier

KINDS = ["layernorm", "bitfit", "full"]
ENCODERS = ["vision", "text", "both"]

# Parameter names each method selects, written as patterns independently of the module walk.
BLOCK_NORMS = r"encoder\.layers\.\d+\.layer_norm[12]"
BLOCK_BIASES = r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|layer_norm[12])"
PATTERNS = {
    ("layernorm", "vision"): rf"vision_model\.(pre_layrnorm|post_layernorm|{BLOCK_NORMS})\.(weight|bias)",
    ("layernorm", "text"): rf"text_model\.(final_layer_norm|{BLOCK_NORMS})\.(weight|bias)",
    ("bitfit", "vision"): rf"vision_model\.(pre_layrnorm|post_layernorm|{BLOCK_BIASES})\.bias",
    ("bitfit", "text"): rf"text_model\.(final_layer_norm|{BLOCK_BIASES})\.bias",
    ("full", "vision"): r"(vision_model\..*|visual_projection\.weight)",
    ("full", "text"): r"(text_model\..*|text_projection\.weight)",
}


def fresh_clip():
    return load_backbone(ModelConfig(name="tiny", random_init=True, init_seed=0)).model


def expected_names(clip, kind: str, encoder: str) -> set[str]:
    sides = ["vision", "text"] if encoder == "both" else [encoder]
    pattern = "|".join(f"({PATTERNS[kind, side]})" for side in sides)
    return {name for name, _ in clip.named_parameters() if re.fullmatch(pattern, name)}


def expected_count(config, kind: str, encoder: str) -> int:
    """Trainable parameters from the architecture's sizes alone."""
    text, vision = config.text_config, config.vision_config

    def block(width: int, inner: int) -> dict[str, int]:
        return {
            "layernorm": 2 * 2 * width,  # layer_norm1 and layer_norm2, weight and bias
            "bitfit": 4 * width + inner + width + 2 * width,  # q, k, v, out, then fc1, fc2 and two LayerNorm biases
            "full": 4 * (width * width + width) + 2 * 2 * width + (width * inner + inner) + (inner * width + width),
        }[kind]

    def vision_count() -> int:
        width, layers = vision.hidden_size, vision.num_hidden_layers
        extra = {
            "layernorm": 2 * 2 * width,  # pre_layrnorm, post_layernorm
            "bitfit": 2 * width,
            "full": width  # class embedding
            + 3 * vision.patch_size**2 * width  # patch convolution, no bias
            + ((vision.image_size // vision.patch_size) ** 2 + 1) * width  # position embedding
            + 2 * 2 * width
            + width * config.projection_dim,  # visual_projection
        }[kind]
        return layers * block(width, vision.intermediate_size) + extra

    def text_count() -> int:
        width, layers = text.hidden_size, text.num_hidden_layers
        extra = {
            "layernorm": 2 * width,  # final_layer_norm
            "bitfit": width,
            "full": text.vocab_size * width  # token embedding
            + text.max_position_embeddings * width  # position embedding
            + 2 * width
            + width * config.projection_dim,  # text_projection
        }[kind]
        return layers * block(width, text.intermediate_size) + extra

    return {"vision": vision_count, "text": text_count}.get(encoder, lambda: vision_count() + text_count())()


@pytest.mark.parametrize(("kind", "encoder"), list(itertools.product(KINDS, ENCODERS)))
def test_selection_names_and_count(kind, encoder):
    clip = fresh_clip()
    count = select_trainable(clip, kind, encoder)

    trainable = {name for name, p in clip.named_parameters() if p.requires_grad}
    assert trainable == expected_names(clip, kind, encoder)
    assert "logit_scale" not in trainable
    assert count == expected_count(clip.config, kind, encoder)
    assert count == sum(p.numel() for p in clip.parameters() if p.requires_grad)


def test_tiny_counts_by_hand():
    """The formulas above, evaluated by hand for the tiny architecture (W 64, 4 blocks, MLP 128)."""
    clip = fresh_clip()
    assert select_trainable(clip, "layernorm", "vision") == (4 * 2 + 2) * 2 * 64  # 1,280
    assert select_trainable(clip, "layernorm", "text") == (4 * 2 + 1) * 2 * 64  # 1,152
    assert select_trainable(clip, "bitfit", "vision") == 4 * (4 * 64 + 128 + 64 + 2 * 64) + 2 * 64  # 2,432
    assert select_trainable(clip, "bitfit", "text") == 4 * (4 * 64 + 128 + 64 + 2 * 64) + 64  # 2,368


def test_full_both_is_everything_but_logit_scale():
    clip = fresh_clip()
    total = sum(p.numel() for p in clip.parameters())
    assert select_trainable(clip, "full", "both") == total - 1
    assert not clip.logit_scale.requires_grad


def test_reselection_freezes_previous_choice():
    clip = fresh_clip()
    select_trainable(clip, "full", "both")
    count = select_trainable(clip, "layernorm", "text")
    assert {name for name, p in clip.named_parameters() if p.requires_grad} == expected_names(clip, "layernorm", "text")
    assert count == expected_count(clip.config, "layernorm", "text")


@pytest.mark.parametrize("encoder", ENCODERS)
def test_only_selected_tensors_get_gradients(encoder):
    clip = fresh_clip()
    tokenizer = bundled_clip_tokenizer()
    select_trainable(clip, "bitfit", encoder)
    model = ZeroShotClassifier(clip, tokenizer, ["cat", "dog", "bird"], "a photo of a {}.")
    assert model.text_is_trainable() == (encoder != "vision")

    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    F.cross_entropy(model(pixels), torch.tensor([0, 1, 2, 0])).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    selected = {f"clip.{name}" for name in expected_names(clip, "bitfit", encoder)}
    assert with_grad == selected
    assert set(trainable_state_dict(model)) == selected


INVALID = [
    # (kind, encoder, message)
    ("lora", "both", "Unknown selection kind 'lora'"),
    ("LayerNorm", "both", "Unknown selection kind 'LayerNorm'"),
    ("bitfit", "image", "Unknown encoder 'image'"),
    ("full", "", "Unknown encoder ''"),
]


@pytest.mark.parametrize("kind,encoder,message", INVALID, ids=[m for _, _, m in INVALID])
def test_invalid_selection_rejected(kind, encoder, message):
    clip = fresh_clip()
    with pytest.raises(ValueError, match=message):
        select_trainable(clip, kind, encoder)
