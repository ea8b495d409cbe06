"""The decoded-image cache: bit-identical tensors, what is cached, and the shared memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from fl2ora.data import clip_transforms
from fl2ora.data.datasets import ImageSamples
from fl2ora.perf.images import CachedImageSamples, ImageMemoryBudget, cache_decoded_images, split_transform

SIZE = 32


def arrays(count: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Not square and not 32 px, so the resize and the center crop both change the image.
    return [rng.integers(0, 256, size=(27, 41, 3), dtype=np.uint8) for _ in range(count)]


def files(folder, count: int = 4) -> list:
    paths = []
    for index, array in enumerate(arrays(count, seed=1)):
        path = folder / f"{index}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def test_cached_evaluation_tensors_bit_identical():
    plain = ImageSamples(arrays(), np.arange(6), clip_transforms(SIZE, train=False))
    cached = CachedImageSamples(plain, ImageMemoryBudget(2**20))
    for _ in range(2):  # first read fills the cache, the second reads from it
        for index in range(len(plain)):
            expected, label = plain[index]
            actual, cached_label = cached[index]
            assert torch.equal(actual, expected)
            assert cached_label == label == index
    assert cached.cached_count() == 6
    # Stored after resize and center crop: SIZE x SIZE x 3 uint8 per image.
    assert cached.budget.used == 6 * SIZE * SIZE * 3


def test_cached_files_with_random_crop_match_seeded_reads(tmp_path):
    transform = clip_transforms(SIZE, train=True, augment=True)
    plain = ImageSamples(files(tmp_path), np.zeros(4, dtype=np.int64), transform)
    cached = CachedImageSamples(plain, ImageMemoryBudget(2**20))
    for index in range(4):
        torch.manual_seed(index)
        expected, _ = plain[index]
        cached[index]  # fills the cache with the decoded image
        torch.manual_seed(index)
        actual, _ = cached[index]
        assert torch.equal(actual, expected)
    # Only decoding is saved: the files' full 27 x 41 images are kept.
    assert cached.budget.used == 4 * 27 * 41 * 3


def test_in_memory_arrays_with_random_crop_not_cached():
    plain = ImageSamples(arrays(), np.arange(6), clip_transforms(SIZE, train=True, augment=True))
    cached = CachedImageSamples(plain, ImageMemoryBudget(2**20))
    for index in range(len(cached)):
        cached[index]
    assert cached.cached_count() == 0
    assert cached.budget.used == 0


def test_budget_shared_and_full():
    image_bytes = SIZE * SIZE * 3
    budget = ImageMemoryBudget(3 * image_bytes + 10)  # room for three images
    transform = clip_transforms(SIZE, train=False)
    first = CachedImageSamples(ImageSamples(arrays(2), np.arange(2), transform), budget)
    second = CachedImageSamples(ImageSamples(arrays(3, seed=2), np.arange(3), transform), budget)
    for samples in (first, second):
        for index in range(len(samples)):
            samples[index]
    assert (first.cached_count(), second.cached_count()) == (2, 1)
    assert budget.used == 3 * image_bytes
    assert budget.rejected == 2
    # An image past the budget is still read correctly.
    expected, _ = ImageSamples(arrays(3, seed=2), np.arange(3), transform)[2]
    assert torch.equal(second[2][0], expected)


def test_cache_keeps_dataset_interface():
    plain = ImageSamples(arrays(), np.arange(6), clip_transforms(SIZE, train=False))
    cached = cache_decoded_images(plain, ImageMemoryBudget(2**20))
    assert isinstance(cached, ImageSamples)
    assert len(cached) == 6
    assert np.array_equal(cached.labels, plain.labels)
    assert cached.subset([1, 3]).labels.tolist() == [1, 3]
    # Already wrapped datasets are returned unchanged.
    assert cache_decoded_images(cached, ImageMemoryBudget(0)) is cached


@pytest.mark.parametrize(
    ("transform", "prefix", "rest"),
    [
        (T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()]), ["Resize", "CenterCrop"], ["ToTensor"]),
        (T.Compose([T.RandomResizedCrop(8), T.ToTensor()]), [], ["RandomResizedCrop", "ToTensor"]),
        (T.Compose([T.Resize(8), T.RandomHorizontalFlip(), T.CenterCrop(8)]), ["Resize"],
         ["RandomHorizontalFlip", "CenterCrop"]),
        (T.ToTensor(), [], ["ToTensor"]),
        (None, [], []),
    ],
)
def test_split_transform(transform, prefix, rest):
    first, second = split_transform(transform)
    assert [type(step).__name__ for step in first] == prefix
    assert [type(step).__name__ for step in second] == rest


@pytest.mark.parametrize("max_bytes", [-1, -(2**20)])
def test_negative_budget_rejected(max_bytes):
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ImageMemoryBudget(max_bytes)
