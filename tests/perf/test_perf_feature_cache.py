"""The image-feature cache: equal to encoding the images, used only while the image encoder is frozen."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fl2ora.config import TrainConfig, config_from_dict
from fl2ora.data import clip_transforms
from fl2ora.data.datasets import ImageSamples
from fl2ora.evaluation.evaluate import predict_probabilities
from fl2ora.federated.client import client_update
from fl2ora.methods.registry import build_classifier
from fl2ora.model.trainable import trainable_state_dict
from fl2ora.perf.features import ImageFeatureCache, image_features_frozen
from conftest import fresh_tiny_backbone

CLASSNAMES = ["airplane", "cat", "dog"]
TEMPLATE = "a photo of a {}."
CPU = torch.device("cpu")


def build_model(method: str, **sections):
    values = {"method": method, "model": {"name": "tiny", "random_init": True}, "maple": {"depth": 2}, **sections}
    config = config_from_dict(values)
    backbone = fresh_tiny_backbone()
    return build_classifier(config, backbone, CLASSNAMES, TEMPLATE)


@functools.cache
def image_arrays(count: int = 10, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, 256, size=(36, 40, 3), dtype=np.uint8) for _ in range(count))


def dataset(count: int = 10) -> ImageSamples:
    labels = np.arange(count) % len(CLASSNAMES)
    return ImageSamples(list(image_arrays(count)), labels, clip_transforms(32, train=False))


def encoded(model, samples: ImageSamples) -> torch.Tensor:
    """Independent reference: every image through the transform and encode_image at once."""
    images = torch.stack([samples[i][0] for i in range(len(samples))])
    model.eval()
    with torch.no_grad():
        return model.encode_image(images)


def test_cached_features_equal_encoded_images():
    model = build_model("coop")
    samples = dataset()
    cache = ImageFeatureCache(batch_size=4)  # three batches: 4, 4, 2
    cache.register(samples)

    cached = cache.lookup(model, samples, CPU)

    torch.testing.assert_close(cached.features, encoded(model, samples), rtol=0, atol=1e-6)
    assert torch.equal(cached.labels, torch.as_tensor(samples.labels))
    assert cached.features.dtype == torch.float32
    assert cache.nbytes() == 10 * 64 * 4 + 10 * 8  # (N, D) float32 features and (N,) int64 labels


def test_second_lookup_reuses_features():
    model = build_model("coop")
    samples = dataset()
    cache = ImageFeatureCache()
    cache.register(samples)
    first = cache.lookup(model, samples, CPU)
    second = cache.lookup(model, samples, CPU)
    assert second is first
    assert cache.computed == 1


@pytest.mark.parametrize(
    ("method", "sections", "frozen"),
    [
        ("coop", {}, True),
        ("kgcoop", {}, True),
        ("zeroshot", {}, True),
        ("fl2ora", {"lora": {"encoder": "text"}}, True),
        ("layernorm", {"tuning": {"encoder": "text"}}, True),
        ("fl2ora", {}, False),  # LoRA on the image encoder
        ("layernorm", {}, False),
        ("bitfit", {"tuning": {"encoder": "vision"}}, False),
        ("full", {}, False),
        ("maple", {}, False),  # learned prompts enter the image encoder
    ],
)
def test_cache_used_only_with_frozen_image_encoder(method, sections, frozen):
    model = build_model(method, **sections)
    samples = dataset(4)
    cache = ImageFeatureCache()
    cache.register(samples)
    assert image_features_frozen(model) is frozen
    assert (cache.lookup(model, samples, CPU) is not None) is frozen


def test_unregistered_dataset_not_cached():
    model = build_model("coop")
    cache = ImageFeatureCache()
    assert cache.lookup(model, dataset(4), CPU) is None
    assert cache.computed == 0


def test_features_recomputed_after_image_encoder_change():
    model = build_model("coop")
    samples = dataset(4)
    cache = ImageFeatureCache()
    cache.register(samples)
    before = cache.lookup(model, samples, CPU).features.clone()
    with torch.no_grad():
        model.clip.visual_projection.weight.mul_(-1.0)  # flips every image feature
    after = cache.lookup(model, samples, CPU).features
    assert cache.computed == 2
    torch.testing.assert_close(after, -before, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, encoded(model, samples), rtol=0, atol=1e-6)


def test_training_lookup_skipped_with_vision_dropout():
    model = build_model("coop")
    samples = dataset(4)
    cache = ImageFeatureCache()
    cache.register(samples)
    model.clip.config.vision_config.attention_dropout = 0.1
    try:
        assert cache.lookup(model, samples, CPU, training=True) is None
        assert cache.lookup(model, samples, CPU, training=False) is not None
    finally:
        model.clip.config.vision_config.attention_dropout = 0.0


def test_lookup_leaves_global_random_state():
    model = build_model("coop")
    samples = dataset(4)
    cache = ImageFeatureCache()
    cache.register(samples)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    cache.lookup(model, samples, CPU)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["coop", "kgcoop"])
def test_client_update_with_cache_matches_images(method):
    samples = dataset(10)
    config = TrainConfig(lr=0.05, batch_size=4)
    updates = []
    for use_cache in (False, True):
        model = build_model(method)
        initial = trainable_state_dict(model)
        cache = ImageFeatureCache()
        cache.register(samples)
        model.image_feature_cache = cache if use_cache else None
        updates.append(client_update(model, initial, samples, config, client_id=0, seed=11, device=CPU))
        assert cache.computed == int(use_cache)

    plain, cached = updates
    assert (cached.num_steps, cached.num_examples) == (plain.num_steps, plain.num_examples) == (3, 10)
    assert cached.train_loss == pytest.approx(plain.train_loss, abs=1e-6)
    for name, tensor in plain.state.items():
        torch.testing.assert_close(cached.state[name], tensor, rtol=0, atol=1e-6)


def test_predict_probabilities_with_cache_matches_images():
    model = build_model("coop")
    samples = dataset(10)
    expected = predict_probabilities(model, samples, 4, CPU)
    cache = ImageFeatureCache()
    cache.register(samples)
    model.image_feature_cache = cache
    actual = predict_probabilities(model, samples, 4, CPU)
    assert cache.computed == 1
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(actual.sum(axis=1), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [0, -3])
def test_invalid_batch_size_rejected(batch_size):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ImageFeatureCache(batch_size=batch_size)
