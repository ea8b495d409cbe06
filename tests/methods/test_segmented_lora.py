"""Segmented LoRA: each client's adapter on its own rows of a joined batch, with its own dropout stream."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear

from fl2ora.config import ModelConfig, config_from_dict
from fl2ora.federated.batched import batching_unsupported
from fl2ora.methods.registry import build_classifier
from fl2ora.methods.segmented_lora import (
    ADAPTER,
    RandomStream,
    SegmentPlan,
    lora_layers,
    segmented_lora,
    segmented_lora_unsupported,
)
from fl2ora.model.backbone import Backbone, load_backbone
from fl2ora.model.trainable import load_trainable_state_dict, trainable_state_dict

CLASSNAMES = ["airplane", "sea_turtle", "dog"]
TEMPLATE = "a photo of a {}."
CPU = torch.device("cpu")
SEEDS = (11, 29)
ROWS = (3, 5)  # images of the two clients


@functools.cache
def pristine_backbone() -> Backbone:
    return load_backbone(ModelConfig(name="tiny", random_init=True))


def build_model(method: str = "fl2ora", **sections):
    backbone = pristine_backbone()
    backbone = dataclasses.replace(backbone, model=copy.deepcopy(backbone.model))
    values = {"method": method, "model": {"name": "tiny", "random_init": True}, **sections}
    return build_classifier(config_from_dict(values), backbone, CLASSNAMES, TEMPLATE)


def client_states(model, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """Return ``count`` different adapter states (B non-zero, so every adapter changes its layer's output)."""
    generator = torch.Generator().manual_seed(0)
    base = trainable_state_dict(model)
    return [
        {name: tensor + 0.1 * torch.randn(tensor.shape, generator=generator) for name, tensor in base.items()}
        for _ in range(count)
    ]


def images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(rows, 3, 32, 32, generator=generator) for rows in ROWS]


def reference_features(model, states, batches, seeds=None):
    """Each client alone: its state loaded, its own global seed, image pass then text pass."""
    results = []
    for index, (state, batch) in enumerate(zip(states, batches)):
        load_trainable_state_dict(model, state)
        if seeds is not None:
            torch.manual_seed(seeds[index])
        results.append((model.encode_image(batch), model.encode_text()))
    return results


def segmented_features(model, states, batches, seeds=SEEDS):
    """All clients in one image pass and one text pass through segmented layers."""
    plan = SegmentPlan(streams=[RandomStream(seed, CPU) for seed in seeds])
    with segmented_lora(model, plan) as layers:
        for module_name, layer in layers.items():
            layer.weights = [
                (state[f"{module_name}.lora_A.{ADAPTER}.weight"], state[f"{module_name}.lora_B.{ADAPTER}.weight"])
                for state in states
            ]
        plan.segments = [(slot, batch.shape[0]) for slot, batch in enumerate(batches)]
        image = model.encode_image(torch.cat(batches)).split(list(ROWS))
        plan.segments = [(slot, model.num_classes) for slot in range(len(states))]
        text = model.encode_text(repeats=len(states)).split(model.num_classes)
    return list(zip(image, text))


@torch.no_grad()
def test_segments_match_each_client_alone():
    model = build_model().eval()
    states, batches = client_states(model), images()
    expected = reference_features(model, states, batches)
    # The two adapters give different features, so a wrong segment would show.
    assert not torch.allclose(expected[0][1], expected[1][1], atol=1e-3)
    for (image, text), (image_ref, text_ref) in zip(segmented_features(model, states, batches), expected):
        torch.testing.assert_close(image, image_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(text, text_ref, rtol=0, atol=1e-6)


@torch.no_grad()
def test_dropout_masks_follow_client_streams():
    model = build_model().train()  # LoRA dropout 0.25 on both encoders
    states, batches = client_states(model), images()
    expected = reference_features(model, states, batches, seeds=SEEDS)
    without_dropout = reference_features(model.eval(), states, batches)
    model.train()
    # Dropout really changed the features, so equal masks are what makes the results equal.
    assert not torch.allclose(expected[0][0], without_dropout[0][0], atol=1e-4)
    for (image, text), (image_ref, text_ref) in zip(segmented_features(model, states, batches), expected):
        torch.testing.assert_close(image, image_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(text, text_ref, rtol=0, atol=1e-6)


def test_swap_restored_after_error():
    model = build_model()
    before = [(name, id(layer)) for name, layer in lora_layers(model)]
    plan = SegmentPlan(streams=[RandomStream(0, CPU)])
    with pytest.raises(RuntimeError, match="boom"):
        with segmented_lora(model, plan) as layers:
            assert len(layers) == len(before)
            assert lora_layers(model) == []
            raise RuntimeError("boom")
    assert [(name, id(layer)) for name, layer in lora_layers(model)] == before
    assert all(isinstance(model.get_submodule(name), LoraLinear) for name, _ in before)


def test_rows_outside_segments_rejected():
    model = build_model().eval()
    states = client_states(model, count=1)
    plan = SegmentPlan(streams=[RandomStream(0, CPU)])
    with segmented_lora(model, plan) as layers, torch.no_grad():
        for module_name, layer in layers.items():
            layer.weights = [(states[0][f"{module_name}.lora_A.{ADAPTER}.weight"],
                              states[0][f"{module_name}.lora_B.{ADAPTER}.weight"])]
        plan.segments = [(0, 2)]
        with pytest.raises(RuntimeError, match="got 3 rows but its segments cover 2"):
            model.encode_image(torch.zeros(3, 3, 32, 32))


def test_random_stream_continues_seeded_sequence():
    torch.manual_seed(7)
    expected = torch.rand(6)
    stream = RandomStream(7, CPU)
    torch.manual_seed(123)  # the global state in between does not matter
    with stream.active():
        first = torch.rand(2)
    torch.rand(5)
    with stream.active():
        second = torch.rand(4)
    torch.testing.assert_close(torch.cat([first, second]), expected, rtol=0, atol=0)


def test_supported_models():
    assert segmented_lora_unsupported(build_model("fl2ora")) is None
    assert batching_unsupported(build_model("fl2ora")) is None
    assert batching_unsupported(build_model("fl2ora", lora={"encoder": "text", "dropout": 0.0})) is None


@pytest.mark.parametrize(
    ("method", "change", "reason"),
    [
        ("layernorm", None, "no peft LoRA layer"),
        ("coop", None, "PromptLearnerClassifier, not a LoRA-adapted"),
        ("fl2ora", lambda m: m.clip.logit_scale.requires_grad_(True), "tensors other than LoRA weights train"),
        ("fl2ora", lambda m: setattr(m.clip.config.vision_config, "attention_dropout", 0.1), "attention dropout"),
        ("fl2ora", lambda m: m.clip.vision_model.add_module("extra", torch.nn.Dropout(0.1)),
         "dropout outside the LoRA inputs"),
    ],
)
def test_unsupported_models_named(method, change, reason):
    model = build_model(method, maple={"depth": 3})
    if change is not None:
        change(model)
    assert reason in batching_unsupported(model)
