"""FL²oRA adapters: placement, scaling, initialisation, gradients, dropout and persistence."""

import math

import pytest
import torch
import torch.nn.functional as F

from fl2ora.config import ConfigError, LoraConfig, ModelConfig
from fl2ora.methods.lora import apply_lora, count_trainable, lora_target_modules, resolve_layers
from fl2ora.model.backbone import load_backbone
from fl2ora.model.trainable import (
    load_adapter,
    load_trainable_state_dict,
    save_adapter,
    trainable_state_dict,
)
from fl2ora.model.zero_shot import ZeroShotClassifier

CLASSNAMES = ["airplane", "cat", "dog"]


def build(lora: LoraConfig | None = None, seed: int = 0) -> ZeroShotClassifier:
    backbone = load_backbone(ModelConfig(name="tiny", random_init=True, init_seed=seed))
    model = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, "a photo of a {}.")
    if lora is not None:
        apply_lora(backbone.model, lora)
    return model


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("spec", "num_layers", "expected"),
    [
        ("all", 12, list(range(12))),
        ("bottom", 12, [0, 1, 2, 3]),
        ("mid", 12, [4, 5, 6, 7]),
        ("up", 12, [8, 9, 10, 11]),
        ("half-bottom", 12, [0, 1, 2, 3, 4, 5]),
        ("half-up", 12, [6, 7, 8, 9, 10, 11]),
        ("top-3", 12, [9, 10, 11]),
        ("top1", 12, [11]),
        ([3, 1, 1], 12, [1, 3]),
        ("up", 4, [3]),
    ],
)
def test_resolve_layers_named_ranges(spec, num_layers, expected):
    assert resolve_layers(spec, num_layers) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("middle", "Unknown lora.layers 'middle'"),
        ("top-13", "1 <= K <= 12"),
        ("top-0", "1 <= K <= 12"),
        ([12], r"outside \[0, 11\]"),
        ([-1], r"outside \[0, 11\]"),
        ([], "selects no block"),
    ],
)
def test_resolve_layers_invalid(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve_layers(spec, 12)


def test_targets_follow_encoder_projection_and_layers():
    model = build()
    targets = lora_target_modules(model.clip, LoraConfig(encoder="vision", projections=["q", "out"], layers=[0, 3]))
    assert targets == [
        "vision_model.encoder.layers.0.self_attn.q_proj",
        "vision_model.encoder.layers.0.self_attn.out_proj",
        "vision_model.encoder.layers.3.self_attn.q_proj",
        "vision_model.encoder.layers.3.self_attn.out_proj",
    ]


def test_trainable_count_matches_formula():
    # Each adapted d x d projection adds A (r x d) and B (d x r): 2 * r * d parameters.
    model = build(LoraConfig(rank=2))
    width = model.clip.config.vision_config.hidden_size  # 64 in both tiny towers
    layers = model.clip.config.vision_config.num_hidden_layers + model.clip.config.text_config.num_hidden_layers
    assert count_trainable(model) == layers * 3 * 2 * 2 * width


@pytest.mark.parametrize(("scaling", "expected"), [("rslora", 1.0 / math.sqrt(4)), ("standard", 1.0 / 4)])
def test_scaling_alpha_over_rank_forms(scaling, expected):
    model = build(LoraConfig(rank=4, alpha=1.0, scaling=scaling))
    layer = model.clip.vision_model.encoder.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(expected)


def test_lora_delta_equals_scaled_low_rank_product():
    model = build(LoraConfig(rank=2, alpha=1.0, dropout=0.0))
    layer = model.clip.vision_model.encoder.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, layer.in_features)
    base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base + (x @ a.t() @ b.t()) / math.sqrt(2)
    torch.testing.assert_close(layer(x), expected)


def test_zero_initialised_b_keeps_zero_shot_logits():
    plain = build(seed=3)
    adapted = build(LoraConfig(), seed=3)
    adapted.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(images()), plain(images()), rtol=0, atol=0)


def test_only_lora_parameters_receive_gradients():
    model = build(LoraConfig(dropout=0.0))
    # Give B non-zero values so that A receives a non-zero gradient too.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    model.train()
    loss = F.cross_entropy(model(images()), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert parameter.requires_grad, name
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad, name
            assert parameter.grad is None, name


def test_dropout_active_in_training_off_in_evaluation():
    model = build(LoraConfig(dropout=0.5))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1.0)
    x = images()
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        third, fourth = model(x), model(x)
    assert not torch.equal(third, fourth)


def test_adapter_save_load_round_trip(tmp_path):
    model = build(LoraConfig())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    state = trainable_state_dict(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(state, path, {"rank": 2})
    loaded = load_adapter(path)
    assert loaded.keys() == state.keys()
    for name in state:
        assert torch.equal(loaded[name], state[name]), name

    fresh = build(LoraConfig())
    load_trainable_state_dict(fresh, loaded)
    fresh.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images()), model(images()), rtol=0, atol=0)


def test_only_lora_tensors_travel():
    state = trainable_state_dict(build(LoraConfig()))
    assert state
    assert all(".lora_A." in name or ".lora_B." in name for name in state)


def test_load_rejects_mismatched_state():
    model = build(LoraConfig(rank=2))
    other = trainable_state_dict(build(LoraConfig(rank=4)))
    before = trainable_state_dict(model)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_trainable_state_dict(model, other)
    after = trainable_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)

    missing = dict(before)
    removed = sorted(missing)[0]
    del missing[removed]
    with pytest.raises(ValueError, match="Missing"):
        load_trainable_state_dict(model, missing)
