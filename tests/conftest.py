"""Shared test settings: no hub access, tiny models, the shared data archives."""

import copy
import dataclasses
import functools
import os
from pathlib import Path

import pytest

# A hub lookup without network spends about 50 s before failing; tests never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    """The shared CIFAR-10 archive; tests that need it skip when it is absent."""
    archive = SHARED_DATA / "cifar10.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {archive}")
    return archive


def write_image_folder(root: Path, classes: dict[str, tuple[int, int]], size: int = 32, seed: int = 0) -> Path:
    """Write ``root/{train,test}/<class>/<n>.png`` images whose mean colour depends on the class.

    Args:
        classes: class folder name -> (training images, test images).
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, (name, counts) in enumerate(sorted(classes.items())):
        colour = np.array([60 + 60 * index, 200 - 50 * index, 40 * index % 255], dtype=np.float64)
        for split, count in zip(("train", "test"), counts):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                pixels = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.png")
    return root


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    """Three classes, 24 training and 12 test images each, 32 x 32 PNG."""
    root = tmp_path_factory.mktemp("tiny_folder")
    return write_image_folder(root, {"airplane": (24, 12), "cat": (24, 12), "dog": (24, 12)})


@functools.cache
def _pristine_tiny_backbone():
    from fl2ora.config import ModelConfig
    from fl2ora.model.backbone import load_backbone

    return load_backbone(ModelConfig(name="tiny", random_init=True))


def fresh_tiny_backbone():
    """Return a copy of one random-initialised tiny backbone (methods change the backbone they get).

    The tokenizer is shared between copies.
    """
    backbone = _pristine_tiny_backbone()
    return dataclasses.replace(backbone, model=copy.deepcopy(backbone.model))
