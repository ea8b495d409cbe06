"""CoOp, PromptFL and KgCoOp: prompt layout, equality with zero-shot CLIP, gradients, KgCoOp's term."""

from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fl2ora.config import ConfigError, ModelConfig
from fl2ora.methods.coop import CoOpSettings, PromptLearnerClassifier
from fl2ora.model.backbone import load_backbone
from fl2ora.model.trainable import load_trainable_state_dict, trainable_state_dict
from fl2ora.model.zero_shot import ZeroShotClassifier

CLASSNAMES = ["airplane", "automobile", "sea_turtle", "dog"]
TEMPLATE = "a photo of a {}."


@functools.cache
def build_backbone():
    # Shared by every test: the classifiers only freeze CLIP and never change its weights.
    return load_backbone(ModelConfig(name="tiny", random_init=True, init_seed=0))


def build(settings: CoOpSettings | None = None, **kwargs) -> PromptLearnerClassifier:
    backbone = build_backbone()
    return PromptLearnerClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, settings, **kwargs)


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.randint(0, len(CLASSNAMES), (n,), generator=generator)
    return images, labels


@pytest.mark.parametrize("class_specific", [False, True])
def test_phrase_init_equals_zero_shot(class_specific):
    backbone = build_backbone()
    zero_shot = ZeroShotClassifier(backbone.model, backbone.tokenizer, CLASSNAMES, TEMPLATE)
    coop = PromptLearnerClassifier(
        backbone.model, backbone.tokenizer, CLASSNAMES, CoOpSettings(init="a photo of a", class_specific=class_specific)
    )
    images, _ = batch()
    with torch.no_grad():
        expected = zero_shot(images)
        actual = coop(images)
        torch.testing.assert_close(coop.encode_text(), zero_shot.encode_text(), atol=1e-5, rtol=0)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_prompt_layout_matches_coop():
    model = build()
    tokenizer = build_backbone().tokenizer
    prompts = [" ".join(["X"] * 16) + f" {name.replace('_', ' ')}." for name in CLASSNAMES]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    reference = model.clip.text_model.embeddings.token_embedding(ids).detach()  # (C, 77, W)

    embedded = model.prompt_embeddings()  # (C, 77, W)
    assert embedded.shape == (4, 77, 64)
    assert torch.equal(embedded[:, 0], reference[:, 0])  # start-of-text
    assert torch.equal(embedded[:, 17:], reference[:, 17:])  # class name, '.', end-of-text, padding
    for c in range(4):
        assert torch.equal(embedded[c, 1:17], model.ctx.detach())
    # [SOS] and 16 X tokens, then "airplane ." puts EOS at 19 and "sea turtle ." puts it at 20.
    assert model.eos_positions.tolist() == [19, 19, 20, 19]


@pytest.mark.parametrize(
    ("settings", "expected_shape"),
    [
        (CoOpSettings(), (16, 64)),
        (CoOpSettings(n_ctx=8), (8, 64)),
        (CoOpSettings(class_specific=True), (4, 16, 64)),
        (CoOpSettings(init="a photo of a"), (4, 64)),
        (CoOpSettings(init="a photo of a", n_ctx=4), (4, 64)),
        (CoOpSettings(init="itap of a", class_specific=True), (4, 4, 64)),  # "itap" is two BPE tokens
    ],
)
def test_context_shape(settings, expected_shape):
    model = build(settings)
    assert tuple(model.ctx.shape) == expected_shape
    assert model.n_ctx == expected_shape[-2]


def test_random_init_seeded_and_scaled():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build(seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random state is untouched

    assert torch.equal(first.ctx, build(seed=0).ctx)
    assert not torch.equal(first.ctx, build(seed=1).ctx)
    assert abs(first.ctx.mean().item()) < 0.002  # 1,024 draws of N(0, 0.02^2): standard error 0.000625
    assert abs(first.ctx.std().item() - 0.02) < 0.003
    assert first.ctx.dtype == torch.float32


def test_phrase_init_uses_token_embeddings():
    model = build(CoOpSettings(init="a photo of a", class_specific=True))
    ids = torch.tensor([320, 1125, 539, 320])  # CLIP's BPE ids of "a", "photo", "of", "a"
    expected = model.clip.text_model.embeddings.token_embedding.weight[ids].detach()
    for c in range(4):
        assert torch.equal(model.ctx[c].detach(), expected)


@pytest.mark.parametrize("kgcoop_weight", [0.0, 8.0])
def test_only_context_gets_gradients(kgcoop_weight):
    model = build(CoOpSettings(kgcoop_weight=kgcoop_weight))
    images, labels = batch()
    model.train()
    loss = F.cross_entropy(model(images), labels)
    if kgcoop_weight:
        loss = loss + model.regularization_loss()
    loss.backward()

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trainable == {"ctx"}
    assert with_grad == {"ctx"}
    assert model.ctx.grad.abs().sum() > 0
    assert set(trainable_state_dict(model)) == {"ctx"}
    assert model.text_is_trainable()


def sgd_step(model: PromptLearnerClassifier, images, labels, lr: float = 0.1) -> torch.Tensor:
    """One SGD step on cross-entropy plus the method's regularisation; returns the new ctx."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = F.cross_entropy(model(images), labels)
    extra = model.regularization_loss()
    if extra is not None:
        loss = loss + extra
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return model.ctx.detach().clone()


def test_kgcoop_zero_weight_equals_coop_update():
    images, labels = batch()
    plain = sgd_step(build(CoOpSettings(init="random")), images, labels)
    kgcoop_zero = build(CoOpSettings(init="random", kgcoop_weight=0.0))
    assert kgcoop_zero.regularization_loss() is None
    assert torch.equal(sgd_step(kgcoop_zero, images, labels), plain)
    # A positive weight changes the step, so the comparison above can fail.
    assert not torch.allclose(sgd_step(build(CoOpSettings(init="random", kgcoop_weight=8.0)), images, labels), plain)


def test_kgcoop_gradient_adds_weighted_term():
    """d(CE + lambda * R)/d ctx = d CE/d ctx + lambda * d R/d ctx, R from the hand-written features."""
    images, labels = batch()
    model = build(CoOpSettings(init="random", kgcoop_weight=3.0))
    model.train()
    F.cross_entropy(model(images), labels).backward()
    ce_grad = model.ctx.grad.clone()
    model.ctx.grad = None

    hand = ZeroShotClassifier(model.clip, build_backbone().tokenizer, CLASSNAMES, TEMPLATE).encode_text().detach()
    distance = (model.encode_text() - hand).pow(2).sum(dim=-1).mean()
    distance.backward()
    term_grad = model.ctx.grad.clone()
    model.ctx.grad = None

    loss = F.cross_entropy(model(images), labels) + model.regularization_loss()
    loss.backward()
    torch.testing.assert_close(model.ctx.grad, ce_grad + 3.0 * term_grad, atol=1e-6, rtol=1e-5)


def test_kgcoop_term_matches_hand_computation():
    model = build(CoOpSettings(init="a photo of a", kgcoop_weight=8.0), template=TEMPLATE)
    # Initialised from the template's own words, the learned prompt is the hand-written one.
    assert model.regularization_loss().item() == pytest.approx(0.0, abs=1e-10)

    with torch.no_grad():
        model.ctx.add_(0.05 * torch.randn(model.ctx.shape, generator=torch.Generator().manual_seed(5)))
        learned = model.encode_text().numpy().astype(np.float64)  # (C, D)
        hand = ZeroShotClassifier(model.clip, build_backbone().tokenizer, CLASSNAMES, TEMPLATE).encode_text()
    hand = hand.numpy().astype(np.float64)
    expected = 8.0 * np.mean(np.sum((learned - hand) ** 2, axis=1))
    assert expected > 1e-4
    assert model.regularization_loss().item() == pytest.approx(expected, rel=1e-4)
    # For unit vectors ||t - h||^2 = 2 - 2 cos(t, h): the released KgCoOp's form is half of it.
    cosine = np.sum(learned * hand, axis=1) / np.linalg.norm(learned, axis=1) / np.linalg.norm(hand, axis=1)
    assert expected == pytest.approx(8.0 * 2 * (1 - cosine.mean()), rel=1e-4)


def test_kgcoop_reuses_forward_features():
    model = build(CoOpSettings(kgcoop_weight=1.0))
    images, _ = batch()
    model.train()
    model(images)
    with mock.patch.object(model, "encode_text", wraps=model.encode_text) as encode:
        model.regularization_loss()
        assert encode.call_count == 0
        model.regularization_loss()  # nothing left from a forward: recomputed
        assert encode.call_count == 1


def test_logits_formula():
    model = build(tau=0.5)
    images, _ = batch()
    with torch.no_grad():
        image = F.normalize(model.clip.get_image_features(pixel_values=images).pooler_output, dim=-1)
        logits = model(images)
        text = model.encode_text()
    expected = model.clip.logit_scale.exp() * image @ text.t() / 0.5
    assert logits.shape == (6, 4)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_eval_cache_follows_loaded_state():
    model = build()
    images, _ = batch()
    model.eval()
    with torch.no_grad(), mock.patch.object(model, "encode_text", wraps=model.encode_text) as encode:
        first = model(images)
        model(images)
        assert encode.call_count == 1
        new_state = {"ctx": torch.randn(16, 64, generator=torch.Generator().manual_seed(9)) * 0.02}
        load_trainable_state_dict(model, new_state)
        second = model(images)
        assert encode.call_count == 2
    assert not torch.allclose(first, second)
    assert model.num_classes == 4
    assert model.classnames == CLASSNAMES


INVALID_SETTINGS = [
    # (kwargs, message)
    ({"n_ctx": 0}, "coop.n_ctx must be >= 1"),
    ({"n_ctx": -3}, "coop.n_ctx must be >= 1"),
    ({"init": "  "}, "coop.init must be 'random' or a non-empty phrase"),
    ({"kgcoop_weight": -1.0}, "coop.kgcoop_weight must be >= 0"),
    ({"kgcoop_weight": float("nan")}, "coop.kgcoop_weight must be >= 0"),
]


@pytest.mark.parametrize("kwargs,message", INVALID_SETTINGS, ids=[m + str(k) for k, m in INVALID_SETTINGS])
def test_invalid_settings_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CoOpSettings(**kwargs)


INVALID_CLASSIFIERS = [
    # (settings, keyword arguments, message)
    (CoOpSettings(init="a photo of a", n_ctx=16), {}, "has 4 tokens but coop.n_ctx=16"),
    (CoOpSettings(n_ctx=80), {}, "do not fit in 77 tokens"),
    (CoOpSettings(), {"tau": 0.0}, "tau must be > 0"),
    (CoOpSettings(kgcoop_weight=8.0), {"template": "a photo"}, "exactly one"),
]


@pytest.mark.parametrize("settings,kwargs,message", INVALID_CLASSIFIERS, ids=[c[2] for c in INVALID_CLASSIFIERS])
def test_invalid_classifier_rejected(settings, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(settings, **kwargs)


def test_kgcoop_preset():
    settings = CoOpSettings.kgcoop()
    assert settings.kgcoop_weight == 8.0
    assert settings.init == "a photo of a"
    assert build(settings).n_ctx == 4
