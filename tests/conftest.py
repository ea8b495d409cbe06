"""Shared test settings: no hub access, tiny models, the shared data archives."""

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
