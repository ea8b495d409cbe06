"""Checks that the images a run will read can be decoded, before any round starts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from fl2ora.data.datasets import ImageSamples

logger = logging.getLogger(__name__)


def find_unreadable(samples: ImageSamples, indices: Sequence[int] | np.ndarray) -> list[tuple[int, str]]:
    """Decode every image at ``indices`` fully and return ``(index, reason)`` for each failure.

    Full decoding (not only the header) catches truncated files as well as files
    that are not images at all. In-memory array sources are always readable.
    """
    failures = []
    for index in np.asarray(indices, dtype=np.int64):
        try:
            samples.load_image(int(index)).load()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            failures.append((int(index), f"{samples.sources[int(index)]}: {error}"))
    return failures


def drop_unreadable(
    samples: ImageSamples,
    indices: np.ndarray,
    policy: Literal["error", "skip"],
    split: str,
) -> np.ndarray:
    """Return ``indices`` without unreadable images, or raise, as ``policy`` says.

    Raises:
        ValueError: with ``policy="error"``, naming up to five unreadable files, their
            count and the setting that skips them.
    """
    failures = find_unreadable(samples, indices)
    if not failures:
        return indices
    listed = "; ".join(reason for _, reason in failures[:5])
    if policy == "error":
        raise ValueError(
            f"{len(failures)} {split} image(s) cannot be decoded, e.g. {listed}. "
            "Replace the files, or set data.bad_images=skip to leave them out."
        )
    logger.warning("Skipping %d unreadable %s image(s), e.g. %s", len(failures), split, listed)
    bad = {index for index, _ in failures}
    return np.array([index for index in indices if int(index) not in bad], dtype=np.int64)
