"""Decoded images kept in memory, so later epochs and rounds skip decoding and resizing.

CLIP's evaluation transform (and the training transform without augmentation)
starts with a deterministic bicubic resize and center crop of a decoded image. For
ViT-B at 224 px that is the costly part of loading a CIFAR image, and it is the
same on every read. :class:`CachedImageSamples` keeps, per sample, the uint8 RGB
array after those deterministic steps (or after decoding only, when the transform
starts with a random crop) and runs only the rest of the transform on each read.
The arrays are the ones the transform would have produced, so the tensors are
bit-identical to the uncached ones.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from fl2ora.data.datasets import ImageSamples

logger = logging.getLogger(__name__)

_DETERMINISTIC_PIL_STEPS = (T.Resize, T.CenterCrop)


class ImageMemoryBudget:
    """A byte budget shared by every cached dataset of a run.

    Args:
        max_bytes: total bytes the cached arrays may hold, >= 0.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes!r}. Use 0 to cache nothing.")
        self.max_bytes = max_bytes
        self.used = 0
        self.rejected = 0
        """Images that did not fit and are read from their source on every access."""
        self._lock = threading.Lock()
        self._warned = False

    def reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` and return True, or return False when they do not fit."""
        with self._lock:
            if self.used + nbytes > self.max_bytes:
                self.rejected += 1
                if not self._warned:
                    self._warned = True
                    logger.info(
                        "Decoded-image cache full at %.0f MiB: further images are decoded on every read "
                        "(raise perf.image_cache_mb to cache more)", self.used / 2**20,
                    )
                return False
            self.used += nbytes
            return True


def split_transform(
    transform: Callable | None,
) -> tuple[list[Callable], list[Callable]]:
    """Split a transform into its leading deterministic PIL steps and the rest.

    Only ``torchvision.transforms.Compose`` is split; its leading ``Resize`` and
    ``CenterCrop`` steps form the first part. Any other transform is kept whole
    in the second part.

    >>> pre, rest = split_transform(T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()]))
    >>> [type(step).__name__ for step in pre], [type(step).__name__ for step in rest]
    (['Resize', 'CenterCrop'], ['ToTensor'])
    """
    if transform is None:
        return [], []
    if not isinstance(transform, T.Compose):
        return [], [transform]
    steps = list(transform.transforms)
    count = 0
    while count < len(steps) and isinstance(steps[count], _DETERMINISTIC_PIL_STEPS):
        count += 1
    return steps[:count], steps[count:]


class CachedImageSamples(ImageSamples):
    """:class:`ImageSamples` that keep each image as a uint8 array after its first read.

    The array is the image after decoding and after the transform's leading
    ``Resize`` and ``CenterCrop`` steps. Reads run the remaining steps on it.
    ``ToTensor`` accepts the (H, W, 3) uint8 array directly and gives the same
    tensor as from the PIL image, and any other first step gets the PIL image back.

    Samples whose source is already an in-memory array and whose transform has no
    deterministic leading step are not cached, since there is nothing to save.

    Args:
        samples: the samples to wrap; their sources, labels and transform are shared.
        budget: memory budget shared with the run's other cached datasets.
    """

    def __init__(self, samples: ImageSamples, budget: ImageMemoryBudget) -> None:
        super().__init__(samples.sources, samples.labels, samples.transform)
        self.budget = budget
        self._prefix, self._suffix = split_transform(samples.transform)
        self._arrays: dict[int, np.ndarray] = {}

    def cached_count(self) -> int:
        return len(self._arrays)

    def _array(self, index: int) -> np.ndarray:
        array = self._arrays.get(index)
        if array is not None:
            return array
        image = self.load_image(index)
        for step in self._prefix:
            image = step(image)
        array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        worth_caching = bool(self._prefix) or not isinstance(self.sources[index], np.ndarray)
        if worth_caching and self.budget.reserve(array.nbytes):
            array.setflags(write=False)  # shared by every later read
            self._arrays[index] = array
        return array

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        array = self._array(index)
        steps = self._suffix
        if not steps:
            value = TF.to_tensor(np.array(array))
        elif isinstance(steps[0], T.ToTensor):
            value = steps[0](np.array(array))  # a writable copy: torch.from_numpy needs one
            for step in steps[1:]:
                value = step(value)
        else:
            value = Image.fromarray(array)
            for step in steps:
                value = step(value)
        return value, int(self.labels[index])


def cache_decoded_images(samples: ImageSamples, budget: ImageMemoryBudget) -> ImageSamples:
    """Return ``samples`` wrapped in :class:`CachedImageSamples`, or unchanged when it is not plain ImageSamples."""
    if type(samples) is not ImageSamples:
        return samples
    return CachedImageSamples(samples, budget)
