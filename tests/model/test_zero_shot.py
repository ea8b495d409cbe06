"""Tests for fl2ora.model.zero_shot: prompt formatting, cosine logits and the text-feature cache."""

from __future__ import annotations

import math
from unittest import mock

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fl2ora.config import ModelConfig
from fl2ora.model.backbone import load_backbone
from fl2ora.model.zero_shot import ZeroShotClassifier, format_prompts

CLASSNAMES = ["airplane", "automobile", "sea_turtle", "dog"]
TEMPLATE = "a photo of a {}."
PROMPTS = ["a photo of a airplane.", "a photo of a automobile.", "a photo of a sea turtle.", "a photo of a dog."]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(ModelConfig(name="tiny", random_init=True, init_seed=0))


@pytest.fixture
def clip():
    # A fresh model per test, because tests change requires_grad and weights.
    return load_backbone(ModelConfig(name="tiny", random_init=True, init_seed=0)).model


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, 32, 32, generator=generator)  # (N, 3, H, W)


def reference_logits(clip, pixels: torch.Tensor, prompts: list[str], tau: float) -> torch.Tensor:
    """exp(logit_scale) * cos(image, text) / tau through CLIPModel's own feature methods and open_clip tokens."""
    tokens = open_clip.tokenize(prompts, context_length=77)  # (C, 77), padded with 0
    mask = (tokens != 0).long()
    # In transformers 5 both methods return a BaseModelOutputWithPooling whose pooler_output is projected.
    image = clip.get_image_features(pixel_values=pixels).pooler_output  # (N, D)
    text = clip.get_text_features(input_ids=tokens, attention_mask=mask).pooler_output  # (C, D)
    cosine = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()  # (N, C)
    return clip.logit_scale.exp() * cosine / tau


def test_format_prompts_fills_template():
    assert format_prompts(TEMPLATE, CLASSNAMES) == PROMPTS
    assert format_prompts("{}", ["cat"]) == ["cat"]
    assert format_prompts("itap of a {}, {{literal}}", ["cat"]) == ["itap of a cat, {literal}"]
    assert format_prompts(TEMPLATE, []) == []


INVALID_TEMPLATES = [
    # (template, defect)
    ("a photo of a cat.", "no placeholder"),
    ("a photo of a {name}.", "named field instead of {}"),
    ("a {} photo of a {}.", "two placeholders"),
    ("a photo of a {{}}.", "escaped braces, every class would get the same prompt"),
    ("a photo of a {", "unmatched brace"),
    ("", "empty template"),
]


@pytest.mark.parametrize("template,defect", INVALID_TEMPLATES, ids=[d for _, d in INVALID_TEMPLATES])
def test_invalid_template_rejected(template, defect):
    with pytest.raises(ValueError, match=r"must have exactly one '\{\}' placeholder"):
        format_prompts(template, ["cat"])


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_invalid_tau_rejected(backbone, tau):
    with pytest.raises(ValueError, match=r"tau must be > 0"):
        ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE, tau=tau)


def test_classifier_tokenises_prompts(backbone):
    classifier = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    reference = open_clip.tokenize(PROMPTS, context_length=77)

    assert classifier.prompts == PROMPTS
    assert classifier.num_classes == 4
    assert classifier.input_ids.shape == (4, 77)
    assert torch.equal(classifier.attention_mask, (reference != 0).long())
    mask = classifier.attention_mask.bool()
    assert torch.equal(classifier.input_ids[mask], reference[mask])
    # Tokens are buffers, not saved with the trainable state.
    assert "input_ids" not in classifier.state_dict()


def test_forward_logits_match_reference(clip, backbone, pixels):
    classifier = ZeroShotClassifier(clip, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    with torch.no_grad():
        logits = classifier(pixels)
        expected = reference_logits(clip, pixels, PROMPTS, tau=1.0)

    assert logits.shape == (5, 4)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # CLIPConfig starts logit_scale at 2.6592, about log(1 / 0.07), and a cosine bounds each logit by its exp.
    assert clip.logit_scale.item() == pytest.approx(2.6592, rel=1e-6)
    assert logits.abs().max().item() <= math.exp(2.6592) * (1 + 1e-5)


def test_forward_matches_clip_forward(backbone, pixels):
    classifier = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    with torch.no_grad():
        logits = classifier(pixels)
        output = backbone.model(
            input_ids=classifier.input_ids, attention_mask=classifier.attention_mask, pixel_values=pixels
        )
    torch.testing.assert_close(logits, output.logits_per_image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau", [0.5, 2.0, 10.0])
def test_tau_divides_logits(backbone, pixels, tau):
    plain = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE, tau=1.0)
    scaled = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE, tau=tau)
    with torch.no_grad():
        expected = reference_logits(backbone.model, pixels, PROMPTS, tau=tau)
        torch.testing.assert_close(scaled(pixels), plain(pixels) / tau, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scaled(pixels), expected, rtol=1e-5, atol=1e-5)


def test_tau_two_halves_logits(backbone, pixels):
    plain = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE, tau=1.0)
    halved = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE, tau=2.0)
    with torch.no_grad():
        torch.testing.assert_close(halved(pixels) * 2, plain(pixels), rtol=1e-6, atol=1e-6)


def test_encoders_return_unit_vectors(backbone, pixels):
    classifier = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    with torch.no_grad():
        text = classifier.encode_text()
        image = classifier.encode_image(pixels)
    assert text.shape == (4, 64)
    assert image.shape == (5, 64)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(5))


def test_frozen_text_encoded_once(clip, backbone, pixels):
    clip.requires_grad_(False)
    clip.visual_projection.requires_grad_(True)  # image side trainable, text side frozen
    classifier = ZeroShotClassifier(clip, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    assert not classifier.text_is_trainable()

    with mock.patch.object(classifier, "encode_text", wraps=classifier.encode_text) as encode_text:
        first = classifier(pixels)
        second = classifier(pixels)
        assert encode_text.call_count == 1

        classifier.clear_cache()
        classifier(pixels)
        assert encode_text.call_count == 2

    torch.testing.assert_close(first, second)
    # Gradients still reach the trainable image side through the cached text features.
    first.sum().backward()
    assert clip.visual_projection.weight.grad is not None
    assert clip.visual_projection.weight.grad.abs().sum() > 0


def test_clear_cache_picks_up_new_text_weights(clip, backbone, pixels):
    clip.requires_grad_(False)
    classifier = ZeroShotClassifier(clip, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    with torch.no_grad():
        before = classifier(pixels)
        clip.text_projection.weight.mul_(-1.0)  # flips every text feature, so every cosine changes sign
        stale = classifier(pixels)
        classifier.clear_cache()
        fresh = classifier(pixels)
        expected = reference_logits(clip, pixels, PROMPTS, tau=1.0)

    # The old features are reused until clear_cache, and the new weights count afterwards.
    torch.testing.assert_close(stale, before)
    torch.testing.assert_close(fresh, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh, -before, rtol=1e-5, atol=1e-5)


def test_trainable_text_recomputed(clip, backbone, pixels):
    clip.requires_grad_(False)
    layer_norm = clip.text_model.final_layer_norm
    layer_norm.weight.requires_grad_(True)
    classifier = ZeroShotClassifier(clip, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    assert classifier.text_is_trainable()

    with mock.patch.object(classifier, "encode_text", wraps=classifier.encode_text) as encode_text:
        classifier(pixels)
        logits = classifier(pixels)
        assert encode_text.call_count == 2

    logits.sum().backward()
    grad = layer_norm.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0

    # The same loss through the independent reference gives the same gradient.
    layer_norm.weight.grad = None
    reference_logits(clip, pixels, PROMPTS, tau=1.0).sum().backward()
    torch.testing.assert_close(grad, layer_norm.weight.grad, rtol=1e-4, atol=1e-6)


def test_trainable_text_projection_counts(clip, backbone):
    clip.requires_grad_(False)
    classifier = ZeroShotClassifier(clip, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    assert not classifier.text_is_trainable()
    clip.text_projection.weight.requires_grad_(True)
    assert classifier.text_is_trainable()
