"""Tests for fl2ora.data.transforms: CLIP preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fl2ora.data.transforms import CLIP_MEAN, CLIP_STD, clip_transforms


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_constants_match_open_clip():
    constants = pytest.importorskip("open_clip.constants")
    assert CLIP_MEAN == tuple(constants.OPENAI_DATASET_MEAN)
    assert CLIP_STD == tuple(constants.OPENAI_DATASET_STD)


@pytest.mark.parametrize("train,augment", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shape(train, augment, size):
    transform = clip_transforms(size, train=train, augment=augment)
    output = transform(random_image(100, 47))
    assert output.shape == (3, size, size)
    assert output.dtype == torch.float32


def test_eval_deterministic():
    transform = clip_transforms(32, train=False)
    image = random_image(80, 60)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    second = transform(image)
    assert torch.equal(first, second)


def test_train_without_augment_equals_eval():
    image = random_image(70, 90)
    torch.manual_seed(3)
    no_augment = clip_transforms(48, train=True, augment=False)(image)
    evaluation = clip_transforms(48, train=False)(image)
    assert torch.equal(no_augment, evaluation)


def test_train_augment_is_random():
    transform = clip_transforms(32, train=True)
    image = random_image(64, 64)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    second = transform(image)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("train", [True, False])
def test_normalisation_constant_image(train):
    """A constant RGB image maps to (value / 255 - mean) / std in every pixel, for any crop or flip."""
    color = (200, 17, 90)
    image = Image.new("RGB", (50, 40), color)
    output = clip_transforms(24, train=train)(image)
    for channel in range(3):
        expected = (color[channel] / 255.0 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        torch.testing.assert_close(output[channel], torch.full((24, 24), expected), atol=1e-5, rtol=0)


def test_eval_matches_pil_resize_and_center_crop():
    """Eval = bicubic resize of the shorter side to S, center crop S x S, then normalisation."""
    image = random_image(100, 50, seed=5)
    size = 32
    # Hand computation: shorter side 50 -> 32, so width 100 -> 64, then crop columns 16..48.
    resized = image.resize((64, 32), Image.Resampling.BICUBIC)
    cropped = np.asarray(resized.crop((16, 0, 48, 32)), dtype=np.float64) / 255.0  # (S, S, 3)
    expected = (cropped - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    output = clip_transforms(size, train=False)(image)
    np.testing.assert_allclose(output.permute(1, 2, 0).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("image_size", [0, -5, 2.5, "224", True, None])
def test_invalid_image_size(image_size):
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        clip_transforms(image_size, train=False)
