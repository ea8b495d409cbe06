"""Text switches: padding trim equal to the full context, text features once per evaluation, the perf section.

Also the full-context LoRA dropout that keeps trimmed training on the untrimmed masks.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from fl2ora.config import ConfigError, PerfConfig, config_from_dict
from fl2ora.methods.registry import build_classifier
from fl2ora.model.trainable import load_trainable_state_dict, trainable_state_dict
from fl2ora.model.zero_shot import text_dropout_active
from fl2ora.perf.context_dropout import ContextDropout, use_context_dropout
from fl2ora.perf.speedups import configure_classifier
from conftest import fresh_tiny_backbone

CLASSNAMES = ["airplane", "sea_turtle", "dog"]
TEMPLATE = "a photo of a {}."


def build_model(method: str, **sections):
    values = {"method": method, "model": {"name": "tiny", "random_init": True}, "maple": {"depth": 3}, **sections}
    return build_classifier(config_from_dict(values), fresh_tiny_backbone(), CLASSNAMES, TEMPLATE)


def text_features(model, trim: bool) -> torch.Tensor:
    model.trim_text_padding = trim
    with torch.no_grad():
        return model.encode_text()


@pytest.mark.parametrize("method", ["zeroshot", "fl2ora", "coop", "kgcoop", "maple"])
def test_trimmed_text_features_match_full_context(method):
    model = build_model(method).eval()
    full = text_features(model, trim=False)
    trimmed = text_features(model, trim=True)
    assert full.shape == (len(CLASSNAMES), 64)
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)


def test_trim_runs_shorter_sequences():
    model = build_model("zeroshot").eval()
    longest = int(model.attention_mask.sum(dim=1).max())  # "a photo of a sea turtle." with start and end tokens
    seen = []
    hook = model.clip.text_model.embeddings.register_forward_hook(lambda m, i, output: seen.append(output.shape[1]))
    try:
        text_features(model, trim=True)
        text_features(model, trim=False)
    finally:
        hook.remove()
    assert seen == [longest, 77]
    assert longest < 77


def test_trim_skipped_in_training_with_lora_dropout():
    model = build_model("fl2ora").train()  # LoRA dropout 0.25 on the text encoder
    assert text_dropout_active(model.clip)
    outputs = []
    for trim in (False, True):
        model.trim_text_padding = trim
        torch.manual_seed(3)
        outputs.append(model.encode_text())
    # The same dropout masks: the full context was used both times.
    assert torch.equal(outputs[0], outputs[1])


def test_trim_used_in_training_without_dropout():
    model = build_model("coop").train()
    assert not text_dropout_active(model.clip)
    full = model.encode_text()
    model.trim_text_padding = True
    torch.testing.assert_close(model.encode_text(), full, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("cache", "calls"), [(True, 1), (False, 3)])
def test_trainable_text_encoded_once_per_evaluation(cache, calls):
    model = build_model("fl2ora").eval()
    model.cache_text_features = cache
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with mock.patch.object(model, "encode_text", wraps=model.encode_text) as encode_text, torch.no_grad():
        logits = [model(images) for _ in range(3)]
    assert encode_text.call_count == calls
    assert all(torch.equal(logits[0], other) for other in logits[1:])


def test_text_cache_follows_new_weights():
    model = build_model("fl2ora").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state = trainable_state_dict(model)
    changed = {name: tensor + 0.5 for name, tensor in state.items()}
    with torch.no_grad():
        before = model(images)
        load_trainable_state_dict(model, changed)
        after_cached = model(images)
        model.cache_text_features = False
        after_plain = model(images)
    assert not torch.allclose(before, after_plain)
    assert torch.equal(after_cached, after_plain)


@pytest.mark.parametrize("method", ["zeroshot", "coop", "maple"])
def test_text_cache_off_recomputes_every_forward(method):
    model = build_model(method).eval()
    configure_classifier(model, PerfConfig(text_feature_cache=False), None)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with mock.patch.object(model, "encode_text", wraps=model.encode_text) as encode_text, torch.no_grad():
        model(images)
        model(images)
    assert encode_text.call_count == 2


def test_configure_classifier_sets_switches():
    model = build_model("coop")
    configure_classifier(model, PerfConfig(text_feature_cache=False, trim_text_padding=True), None)
    assert (model.cache_text_features, model.trim_text_padding, model.image_feature_cache) == (False, True, None)


def test_perf_defaults():
    perf = config_from_dict({}).perf
    assert (perf.text_feature_cache, perf.trim_text_padding, perf.image_feature_cache, perf.decoded_image_cache) == (
        True, True, True, True,
    )
    assert perf.image_cache_mb == 2048


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"perf": {"image_cache_mb": -1}}, "perf.image_cache_mb must be >= 0"),
        ({"perf": {"image_cache_mb": 1.5}}, "perf.image_cache_mb must be an integer"),
        ({"perf": {"text_feature_cache": "yes"}}, "perf.text_feature_cache must be bool"),
        ({"perf": {"image_feature_cach": True}}, "Did you mean 'perf.image_feature_cache'"),
        ({"perf": ["text_feature_cache"]}, "perf must be a mapping"),
    ],
)
def test_invalid_perf_section_rejected(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_context_dropout_matches_dropout_untrimmed():
    x = torch.randn(3, 77, 16)
    torch.manual_seed(2)
    expected = torch.nn.functional.dropout(x, 0.25, training=True)
    next_expected = torch.rand(1)
    torch.manual_seed(2)
    actual = ContextDropout(0.25, 77).train()(x)
    assert torch.equal(actual, expected)
    assert torch.equal(torch.rand(1), next_expected)  # the generator advanced by as much


def test_context_dropout_trimmed_keeps_mask():
    x = torch.randn(3, 77, 16)
    torch.manual_seed(2)
    full = torch.nn.functional.dropout(x, 0.25, training=True)
    next_expected = torch.rand(1)
    torch.manual_seed(2)
    trimmed = ContextDropout(0.25, 77).train()(x[:, :9].contiguous())
    assert trimmed.shape == (3, 9, 16)
    assert torch.equal(trimmed, full[:, :9])
    assert torch.equal(torch.rand(1), next_expected)


def test_context_dropout_off_in_eval():
    x = torch.randn(3, 9, 16)
    assert ContextDropout(0.25, 77).eval()(x) is x


def test_context_dropout_swapped_in_and_out():
    model = build_model("fl2ora")
    text_model = model.clip.text_model
    swapped = use_context_dropout(text_model, 77, enabled=True)
    assert swapped == 4 * 3  # q, k and v of the tiny model's 4 text blocks
    assert not text_dropout_active(model.clip)
    assert sum(isinstance(m, ContextDropout) for m in text_model.modules()) == 12
    assert use_context_dropout(text_model, 77, enabled=False) == 12
    assert text_dropout_active(model.clip)


def test_trimmed_lora_training_matches_full_context():
    model = build_model("fl2ora").train()
    torch.manual_seed(3)
    full = model.encode_text()
    configure_classifier(model, PerfConfig(trim_text_padding=True), None)
    assert not text_dropout_active(model.clip)
    seen = []
    hook = model.clip.text_model.embeddings.register_forward_hook(lambda m, i, output: seen.append(output.shape[1]))
    torch.manual_seed(3)
    try:
        trimmed = model.encode_text()
    finally:
        hook.remove()
    assert seen == [int(model.attention_mask.sum(dim=1).max())]
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("p", "context_length", "message"),
    [(1.0, 77, "p must be in"), (-0.1, 77, "p must be in"), (0.25, 0, "context_length must be >= 1")],
)
def test_invalid_context_dropout_rejected(p, context_length, message):
    with pytest.raises(ValueError, match=message):
        ContextDropout(p, context_length)
