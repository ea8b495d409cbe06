"""Trainable parameter counts of every method on a ViT-B/16-sized CLIP, against formulas from its sizes.

The model is built on the meta device: shapes without storage, so the 150M-parameter
architecture costs no memory and no initialisation time.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import CLIPModel

from fl2ora.config import LoraConfig
from fl2ora.methods.coop import CoOpSettings, PromptLearnerClassifier
from fl2ora.methods.lora import apply_lora, count_trainable
from fl2ora.methods.maple import MaPLeClassifier, MaPLeSettings
from fl2ora.methods.selection import select_trainable
from fl2ora.model.backbone import build_architecture
from fl2ora.model.tokenizer import bundled_clip_tokenizer

CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# ViT-B/16 sizes: 12 blocks per encoder, vision width 768 (MLP 3072), text width 512 (MLP 2048),
# 16 px patches of 224 px images (196 patches), 49,408 tokens, 77 positions, embeddings of 512.
BLOCKS, VISION_WIDTH, TEXT_WIDTH = 12, 768, 512
VISION_MLP, TEXT_MLP = 4 * VISION_WIDTH, 4 * TEXT_WIDTH
PATCH, PATCHES, VOCAB, POSITIONS, EMBED = 16, 196, 49408, 77, 512


def meta_clip() -> CLIPModel:
    with torch.device("meta"):
        return CLIPModel(build_architecture("vit-b-16"))


@functools.cache
def tokenizer():
    return bundled_clip_tokenizer()


def test_architecture_sizes():
    config = build_architecture("vit-b-16")
    assert (config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers) == (BLOCKS, BLOCKS)
    assert (config.vision_config.hidden_size, config.text_config.hidden_size) == (VISION_WIDTH, TEXT_WIDTH)
    assert (config.vision_config.intermediate_size, config.text_config.intermediate_size) == (VISION_MLP, TEXT_MLP)
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 == PATCHES
    assert config.projection_dim == EMBED


def test_fl2ora_default_count():
    clip = meta_clip()
    apply_lora(clip, LoraConfig())
    # blocks x (q, k, v) x (A, B) x rank 2 x width, for each encoder
    expected = 12 * 3 * 2 * 2 * 768 + 12 * 3 * 2 * 2 * 512
    assert expected == 184_320
    assert count_trainable(clip) == expected


def test_coop_shared_context_count():
    model = PromptLearnerClassifier(meta_clip(), tokenizer(), CLASSNAMES, CoOpSettings(n_ctx=16))
    assert count_trainable(model) == 16 * 512 == 8_192


def test_coop_class_specific_count():
    model = PromptLearnerClassifier(meta_clip(), tokenizer(), CLASSNAMES, CoOpSettings(class_specific=True))
    assert count_trainable(model) == 10 * 16 * 512


def test_coop_phrase_context_count():
    # KgCoOp's setting trains these same vectors; its reference features need real weights, so it
    # is not built on the meta device.
    model = PromptLearnerClassifier(meta_clip(), tokenizer(), CLASSNAMES, CoOpSettings(init="a photo of a"))
    assert count_trainable(model) == 4 * 512  # "a photo of a": four tokens


def test_maple_default_count():
    model = MaPLeClassifier(meta_clip(), tokenizer(), CLASSNAMES, MaPLeSettings())
    n_ctx, depth = 2, 9
    expected = (
        n_ctx * TEXT_WIDTH  # context vectors
        + (depth - 1) * n_ctx * TEXT_WIDTH  # deep text prompts
        + depth * (TEXT_WIDTH * VISION_WIDTH + VISION_WIDTH)  # coupling layers
    )
    assert expected == 3_555_072  # the 3.55M MaPLe reports for ViT-B/16
    assert count_trainable(model) == expected


def layernorm_count(encoder: str) -> int:
    # Two LayerNorms per block with weight and bias; vision adds pre and post, text a final one.
    vision = (BLOCKS * 2 + 2) * 2 * VISION_WIDTH
    text = (BLOCKS * 2 + 1) * 2 * TEXT_WIDTH
    return {"vision": vision, "text": text, "both": vision + text}[encoder]


def bitfit_count(encoder: str) -> int:
    # Per block: q, k, v, out biases (W each), fc1 (MLP), fc2 (W), two LayerNorm biases (W each).
    vision = BLOCKS * (4 * VISION_WIDTH + VISION_MLP + VISION_WIDTH + 2 * VISION_WIDTH) + 2 * VISION_WIDTH
    text = BLOCKS * (4 * TEXT_WIDTH + TEXT_MLP + TEXT_WIDTH + 2 * TEXT_WIDTH) + TEXT_WIDTH
    return {"vision": vision, "text": text, "both": vision + text}[encoder]


def full_count(encoder: str) -> int:
    def block(width: int, mlp: int) -> int:
        attention = 4 * (width * width + width)
        norms = 2 * 2 * width
        return attention + norms + (width * mlp + mlp) + (mlp * width + width)

    vision = (
        VISION_WIDTH  # class embedding
        + 3 * PATCH * PATCH * VISION_WIDTH  # patch convolution, no bias
        + (PATCHES + 1) * VISION_WIDTH  # position embedding
        + 2 * 2 * VISION_WIDTH  # pre and post LayerNorm
        + BLOCKS * block(VISION_WIDTH, VISION_MLP)
        + VISION_WIDTH * EMBED  # visual_projection
    )
    text = (
        VOCAB * TEXT_WIDTH
        + POSITIONS * TEXT_WIDTH
        + 2 * TEXT_WIDTH  # final LayerNorm
        + BLOCKS * block(TEXT_WIDTH, TEXT_MLP)
        + TEXT_WIDTH * EMBED  # text_projection
    )
    return {"vision": vision, "text": text, "both": vision + text}[encoder]


@pytest.mark.parametrize("encoder", ["vision", "text", "both"])
@pytest.mark.parametrize(
    ("kind", "formula"), [("layernorm", layernorm_count), ("bitfit", bitfit_count), ("full", full_count)]
)
def test_selection_counts(kind, formula, encoder):
    clip = meta_clip()
    assert select_trainable(clip, kind, encoder) == formula(encoder)
    assert count_trainable(clip) == formula(encoder)


def test_selection_hand_values():
    """The formulas evaluated by hand, so a shared mistake in them and the code would show."""
    assert layernorm_count("vision") == 26 * 1536 == 39_936
    assert layernorm_count("text") == 25 * 1024 == 25_600
    assert bitfit_count("vision") == 12 * 11 * 768 + 1536 == 102_912
    assert bitfit_count("text") == 12 * 11 * 512 + 512 == 68_096
    total = sum(p.numel() for p in meta_clip().parameters())
    assert full_count("both") == total - 1  # everything but logit_scale
