"""Unreadable and truncated image files: an error naming them, or skipped with a count."""

import logging

import numpy as np
import pytest

from fl2ora.config import config_from_dict
from fl2ora.data import load_image_folder
from fl2ora.data.validation import drop_unreadable, find_unreadable
from fl2ora.experiment import build_experiment
from conftest import write_image_folder


@pytest.fixture()
def damaged_folder(tmp_path):
    root = write_image_folder(tmp_path / "data", {"cat": (10, 5), "dog": (10, 5)})
    good = (root / "train" / "cat" / "0.png").read_bytes()
    (root / "train" / "cat" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "train" / "dog" / "2.png").write_bytes(b"not an image at all")
    return root


def test_find_unreadable_names_each_bad_file(damaged_folder):
    data = load_image_folder(damaged_folder)
    failures = find_unreadable(data.train, np.arange(len(data.train)))
    names = sorted(reason.split(":")[0].split("/")[-2] + "/" + reason.split(":")[0].split("/")[-1] for _, reason in failures)
    assert names == ["cat/1.png", "dog/2.png"]
    assert find_unreadable(data.test, np.arange(len(data.test))) == []


def test_bad_images_error_by_default(damaged_folder):
    data = load_image_folder(damaged_folder)
    with pytest.raises(ValueError, match=r"2 training image\(s\) cannot be decoded.*data.bad_images=skip"):
        drop_unreadable(data.train, np.arange(len(data.train)), "error", "training")


def test_bad_images_skipped_with_count(damaged_folder, caplog):
    data = load_image_folder(damaged_folder)
    with caplog.at_level(logging.WARNING):
        kept = drop_unreadable(data.train, np.arange(len(data.train)), "skip", "training")
    assert len(kept) == len(data.train) - 2
    assert "Skipping 2 unreadable training image(s)" in caplog.text


def test_experiment_skips_bad_images_when_asked(damaged_folder):
    values = {
        "model": {"name": "tiny", "random_init": True},
        "data": {"dataset": "image_folder", "root": str(damaged_folder), "bad_images": "skip"},
        "partition": {"method": "iid", "num_clients": 2, "min_samples": 1},
    }
    experiment = build_experiment(config_from_dict(values))
    assert sum(len(client) for client in experiment.client_train) == 18
    values["data"]["bad_images"] = "error"
    with pytest.raises(ValueError, match="cannot be decoded"):
        build_experiment(config_from_dict(values))
