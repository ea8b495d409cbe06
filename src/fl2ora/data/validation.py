"""Checks that the images a run will read can be decoded, before any round starts."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from fl2ora.data.datasets import ImageSamples

logger = logging.getLogger(__name__)

# Pillow raises DecompressionBombError for images above 2 * PIL.Image.MAX_IMAGE_PIXELS and only
# warns with DecompressionBombWarning above PIL.Image.MAX_IMAGE_PIXELS. _find_failures turns the
# warning into an error, so both sizes count as unreadable and neither is decoded into memory.
_OVERSIZED_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, *_OVERSIZED_ERRORS)
_MAX_LISTED_PER_SPLIT = 5


@dataclass(frozen=True)
class _Failure:
    """An image that failed to decode: its index, the file and the error, and whether it is too large."""

    index: int
    reason: str
    oversized: bool


def _find_failures(samples: ImageSamples, indices: Sequence[int] | np.ndarray) -> list[_Failure]:
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for index in np.asarray(indices, dtype=np.int64).tolist():
            try:
                samples.load_image(index).load()
            except _DECODE_ERRORS as error:
                reason = f"{samples.sources[index]}: {error}"
                failures.append(_Failure(index, reason, isinstance(error, _OVERSIZED_ERRORS)))
    return failures


def find_unreadable(samples: ImageSamples, indices: Sequence[int] | np.ndarray) -> list[tuple[int, str]]:
    """Decode every image at ``indices`` fully and return ``(index, reason)`` for each failure.

    Full decoding (not only the header) catches truncated files as well as files
    that are not images at all. An image with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``
    also fails, before its pixels are read. In-memory array sources are always readable.
    """
    return [(failure.index, failure.reason) for failure in _find_failures(samples, indices)]


def _join_names(names: list[str]) -> str:
    """Join ``["a", "b", "c"]`` as ``"a, b and c"``."""
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} and {names[-1]}"


def _unreadable_error(failures_by_split: dict[str, list[_Failure]]) -> ValueError:
    """Build the one-line error that lists the unreadable files of every split and the fix."""
    counts = _join_names([f"{len(failures)} {split}" for split, failures in failures_by_split.items()])
    listed = []
    for split, failures in failures_by_split.items():
        reasons = "; ".join(failure.reason for failure in failures[:_MAX_LISTED_PER_SPLIT])
        more = len(failures) - _MAX_LISTED_PER_SPLIT
        listed.append(f"{split}: {reasons}" + (f" (and {more} more)" if more > 0 else ""))

    fix = "Replace the files"
    if any(failure.oversized for failures in failures_by_split.values() for failure in failures):
        fix = (
            "Replace the files, downscaling those above Pillow's limit of "
            f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels"
        )
    return ValueError(
        f"{counts} image(s) cannot be decoded. {'. '.join(listed)}. "
        f"{fix}, or set data.bad_images=skip to leave them out."
    )


def drop_unreadable_splits(
    splits: Sequence[tuple[str, ImageSamples, Sequence[int] | np.ndarray]],
    policy: Literal["error", "skip"],
) -> list[np.ndarray]:
    """Check the images of every split, then return each split's indices without the unreadable ones.

    Every split is decoded before anything is raised, so with ``policy="error"`` one error lists
    the unreadable files of all splits, training and test alike. Entries that share a split name
    (for example the training shots of each client) are counted and listed together.

    Args:
        splits: ``(name, samples, indices)`` per entry, e.g. ``("training", data.train, train_pool)``.
            ``name`` is the split's name in the error and the log.
        policy: ``"error"`` raises if any image is unreadable. ``"skip"`` leaves the unreadable images
            out and logs their count per split name.

    Returns:
        For each entry of ``splits``, in order, its ``indices`` as int64 without the unreadable images.

    Raises:
        ValueError: with ``policy="error"``, naming the count of unreadable images of each split,
            up to five of its files with the reason, and the setting that skips them.
    """
    failures_per_entry = [_find_failures(samples, indices) for _, samples, indices in splits]
    failures_by_split: dict[str, list[_Failure]] = {}
    for (split, _, _), failures in zip(splits, failures_per_entry):
        if failures:
            failures_by_split.setdefault(split, []).extend(failures)

    if failures_by_split and policy == "error":
        raise _unreadable_error(failures_by_split)
    for split, failures in failures_by_split.items():
        listed = "; ".join(failure.reason for failure in failures[:_MAX_LISTED_PER_SPLIT])
        logger.warning("Skipping %d unreadable %s image(s), e.g. %s", len(failures), split, listed)

    readable_per_entry = []
    for (_, _, indices), failures in zip(splits, failures_per_entry):
        bad = {failure.index for failure in failures}
        rows = np.asarray(indices, dtype=np.int64)
        readable_per_entry.append(np.array([row for row in rows.tolist() if row not in bad], dtype=np.int64))
    return readable_per_entry


def drop_unreadable(
    samples: ImageSamples,
    indices: Sequence[int] | np.ndarray,
    policy: Literal["error", "skip"],
    split: str,
) -> np.ndarray:
    """Return ``indices`` without unreadable images, or raise, as ``policy`` says.

    This checks one split only. To report the unreadable files of the training and test splits
    in one error, check them together with :func:`drop_unreadable_splits`.

    Raises:
        ValueError: with ``policy="error"``, naming up to five unreadable files, their
            count and the setting that skips them.
    """
    return drop_unreadable_splits([(split, samples, indices)], policy)[0]
