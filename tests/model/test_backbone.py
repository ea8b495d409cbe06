"""Tests for fl2ora.model.backbone: random architectures, local folders, offline hub errors."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from transformers import CLIPModel

from fl2ora.config import ConfigError, ModelConfig
from fl2ora.model.backbone import (
    ARCHITECTURES,
    RANDOM_INIT_WARNING,
    build_architecture,
    load_backbone,
)
from fl2ora.model.tokenizer import VOCAB_SIZE, bundled_clip_tokenizer

# Parameters of Hugging Face's openai/clip-vit-base-patch16 (CLIP ViT-B/16).
VIT_B_16_PARAMETERS = 149_620_737


def tiny(**kwargs) -> ModelConfig:
    return ModelConfig(name="tiny", random_init=True, **kwargs)


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for key in first_state:
        assert torch.equal(first_state[key], second_state[key]), key


def test_tiny_matches_architecture():
    backbone = load_backbone(tiny())
    spec = ARCHITECTURES["tiny"]
    config = backbone.model.config

    assert isinstance(backbone.model, CLIPModel)
    for key, value in spec["text_config"].items():
        assert getattr(config.text_config, key) == value, f"text_config.{key}"
    for key, value in spec["vision_config"].items():
        assert getattr(config.vision_config, key) == value, f"vision_config.{key}"
    assert config.projection_dim == spec["projection_dim"]
    assert config.text_config.vocab_size == VOCAB_SIZE
    assert config.text_config.max_position_embeddings == 77

    # The built modules have the configured shapes.
    assert backbone.model.visual_projection.weight.shape == (64, 64)
    assert len(backbone.model.vision_model.encoder.layers) == 4
    assert len(backbone.model.text_model.encoder.layers) == 4
    assert backbone.model.text_model.embeddings.token_embedding.weight.shape == (VOCAB_SIZE, 64)
    assert backbone.image_size == 32
    assert not backbone.model.training


def test_tiny_description():
    backbone = load_backbone(tiny(init_seed=5))
    description = backbone.description

    assert description["random_init"] is True
    assert backbone.random_init is True
    assert description["warning"] == RANDOM_INIT_WARNING
    assert "pipeline check" in description["warning"]
    assert description["init_seed"] == 5
    assert description["name"] == "tiny"
    assert description["image_size"] == 32
    assert description["patch_size"] == 8
    assert description["vision_layers"] == 4
    assert description["text_layers"] == 4
    assert description["embedding_dim"] == 64
    assert description["parameters"] == sum(p.numel() for p in backbone.model.parameters())


def test_random_init_logs_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fl2ora.model.backbone"):
        load_backbone(tiny())
    assert any(RANDOM_INIT_WARNING in record.getMessage() for record in caplog.records)


def test_init_seed_reproducible():
    first = load_backbone(tiny(init_seed=1)).model
    second = load_backbone(tiny(init_seed=1)).model
    other = load_backbone(tiny(init_seed=2)).model

    assert_same_weights(first, second)
    first_weight = first.vision_model.encoder.layers[0].self_attn.q_proj.weight
    other_weight = other.vision_model.encoder.layers[0].self_attn.q_proj.weight
    assert not torch.equal(first_weight, other_weight)


def test_init_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone(tiny(init_seed=9))
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_is_bundled_clip():
    backbone = load_backbone(tiny())
    ids = backbone.tokenizer("a photo of a cat.")["input_ids"]
    assert ids[0] == 49406
    assert ids[-1] == 49407
    assert len(backbone.tokenizer) == VOCAB_SIZE


def test_architecture_without_random_init_rejected():
    with pytest.raises(ConfigError, match=r"random_init"):
        load_backbone(ModelConfig(name="tiny"))


def test_missing_hub_weights_fail_fast(monkeypatch):
    # The error message reads HF_HUB_OFFLINE at call time. huggingface_hub 2.4 reads it once at
    # import, which conftest precedes, and allow_download=False keeps the loader off the network anyway.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        load_backbone(ModelConfig(name="openai/clip-vit-base-patch16"))
    elapsed = time.monotonic() - start

    assert elapsed < 5.0
    message = str(raised.value)
    assert "openai/clip-vit-base-patch16" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "local folder" in message
    assert "allow_download" in message
    assert "tiny" in message
    assert "random_init" in message


@pytest.mark.parametrize("random_init", [False, True])
def test_missing_pt_file_named(random_init, tmp_path):
    path = tmp_path / "ViT-B-61.pt"  # mistyped ViT-B-16.pt
    with pytest.raises(ConfigError) as raised:
        load_backbone(ModelConfig(name=str(path), random_init=random_init))
    message = str(raised.value)
    assert message.startswith(f"OpenAI CLIP checkpoint file {str(path)!r} (model.name={str(path)!r}) does not exist.")
    assert "Check the path" in message
    assert "Hugging Face" not in message
    assert "\n" not in message


def test_local_folder_named_pt_loads(tmp_path):
    # A save_pretrained folder whose name ends in .pt is still a model folder, not a missing file.
    folder = tmp_path / "clip-tiny.pt"
    torch.manual_seed(6)
    saved = CLIPModel(build_architecture("tiny"))
    saved.save_pretrained(folder)
    assert_same_weights(load_backbone(ModelConfig(name=str(folder))).model, saved)


def test_local_folder_loads_same_weights(tmp_path):
    folder = tmp_path / "clip-tiny"
    torch.manual_seed(4)
    saved = CLIPModel(build_architecture("tiny"))
    saved.save_pretrained(folder)  # weights and config only, no tokenizer files

    backbone = load_backbone(ModelConfig(name=str(folder)))

    assert_same_weights(backbone.model, saved)
    assert backbone.random_init is False
    assert "warning" not in backbone.description
    assert backbone.description["init_seed"] is None
    assert backbone.image_size == 32
    # Without tokenizer files in the folder the bundled CLIP tokenizer is used.
    assert len(backbone.tokenizer) == VOCAB_SIZE
    assert backbone.tokenizer("a photo of a dog.")["input_ids"] == [49406, 320, 1125, 539, 320, 1929, 269, 49407]


def test_local_folder_keeps_its_tokenizer(tmp_path):
    folder = tmp_path / "clip-tiny"
    CLIPModel(build_architecture("tiny")).save_pretrained(folder)
    bundled_clip_tokenizer(model_max_length=50).save_pretrained(folder)

    backbone = load_backbone(ModelConfig(name=str(folder)))

    # The folder's own tokenizer is read, recognisable by its context length.
    assert backbone.tokenizer.model_max_length == 50
    assert len(backbone.tokenizer) == VOCAB_SIZE


def test_local_folder_random_init_uses_its_config(tmp_path):
    folder = tmp_path / "clip-tiny"
    CLIPModel(build_architecture("tiny")).save_pretrained(folder)

    backbone = load_backbone(ModelConfig(name=str(folder), random_init=True, init_seed=3))
    reference = load_backbone(tiny(init_seed=3))

    assert backbone.random_init is True
    assert backbone.model.config.vision_config.hidden_size == 64
    # Same architecture and seed give the same random weights as the named architecture.
    assert_same_weights(backbone.model, reference.model)


def test_hub_id_random_init_known_architecture():
    # A known hub id gives its architecture with random weights and reads no file.
    # The meta device keeps the 150 M parameters unallocated.
    with torch.device("meta"):
        backbone = load_backbone(ModelConfig(name="openai/clip-vit-base-patch32", random_init=True))
    assert backbone.description["patch_size"] == 32
    assert backbone.description["image_size"] == 224
    assert backbone.description["vision_layers"] == 12


INVALID_RANDOM_NAMES = [
    # (name, expected message fragment)
    ("not-a-model", r"Cannot build 'not-a-model' with random weights"),
    ("someone/clip-vit-large-patch14", r"architecture is unknown offline"),
    ("vit-b-8", r"Use one of \['tiny', 'vit-b-16', 'vit-b-32'\]"),
]


@pytest.mark.parametrize("name,message", INVALID_RANDOM_NAMES)
def test_random_init_unknown_name_rejected(name, message):
    with pytest.raises(ConfigError, match=message):
        load_backbone(ModelConfig(name=name, random_init=True))


def test_build_architecture_unknown_name():
    with pytest.raises(ConfigError, match=r"Unknown CLIP architecture 'vit-h-14'\. Available"):
        build_architecture("vit-h-14")


def vit_parameter_count(
    *,
    vision_width: int,
    vision_mlp: int,
    vision_layers: int,
    patch_size: int,
    image_size: int,
    text_width: int,
    text_mlp: int,
    text_layers: int,
    vocab_size: int,
    context_length: int,
    embed_dim: int,
) -> int:
    """Count CLIP ViT parameters block by block, as Hugging Face's CLIPModel lays them out."""

    def block(width: int, hidden: int) -> int:
        attention = 4 * (width * width + width)  # q, k, v, out projections with bias
        mlp = (width * hidden + hidden) + (hidden * width + width)  # fc1, fc2 with bias
        norms = 2 * 2 * width  # layer_norm1, layer_norm2: weight and bias
        return attention + mlp + norms

    patches = (image_size // patch_size) ** 2
    vision = (
        vision_width  # class embedding
        + 3 * vision_width * patch_size * patch_size  # patch embedding, a conv without bias
        + (patches + 1) * vision_width  # position embedding
        + 2 * vision_width  # pre_layrnorm
        + vision_layers * block(vision_width, vision_mlp)
        + 2 * vision_width  # post_layernorm
    )
    text = (
        vocab_size * text_width  # token embedding
        + context_length * text_width  # position embedding
        + text_layers * block(text_width, text_mlp)
        + 2 * text_width  # final_layer_norm
    )
    projections = vision_width * embed_dim + text_width * embed_dim  # both without bias
    logit_scale = 1
    return vision + text + projections + logit_scale


def test_vit_b_16_parameter_count():
    expected = vit_parameter_count(
        vision_width=768,
        vision_mlp=3072,
        vision_layers=12,
        patch_size=16,
        image_size=224,
        text_width=512,
        text_mlp=2048,
        text_layers=12,
        vocab_size=49408,
        context_length=77,
        embed_dim=512,
    )
    assert expected == VIT_B_16_PARAMETERS

    # The meta device allocates no memory for the 150 M parameters.
    with torch.device("meta"):
        model = CLIPModel(build_architecture("vit-b-16"))
    assert sum(p.numel() for p in model.parameters()) == VIT_B_16_PARAMETERS


def test_tiny_parameter_count():
    spec = ARCHITECTURES["tiny"]
    expected = vit_parameter_count(
        vision_width=64,
        vision_mlp=128,
        vision_layers=4,
        patch_size=8,
        image_size=32,
        text_width=64,
        text_mlp=128,
        text_layers=4,
        vocab_size=VOCAB_SIZE,
        context_length=77,
        embed_dim=spec["projection_dim"],
    )
    backbone = load_backbone(tiny())
    assert backbone.description["parameters"] == expected
