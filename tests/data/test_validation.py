"""Unreadable and truncated image files: an error naming them, or skipped with a count."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl2ora.config import ConfigError, config_from_dict
from fl2ora.data import load_image_folder
from fl2ora.data.validation import drop_unreadable, drop_unreadable_splits, find_unreadable
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


def _name(path) -> str:
    """Return ``class/file`` of an image path."""
    return f"{Path(path).parent.name}/{Path(path).name}"


@pytest.fixture()
def oversized_folder(tmp_path, monkeypatch):
    """32 x 32 images plus one 48 x 48 (warns) and one 64 x 64 (raises) under a 1500-pixel limit.

    Pillow warns above MAX_IMAGE_PIXELS (48 * 48 = 2304 > 1500) and raises above twice that
    (64 * 64 = 4096 > 3000). Every 32 x 32 image (1024 pixels) stays below both.
    """
    root = write_image_folder(tmp_path / "data", {"cat": (6, 3), "dog": (6, 3)})
    rng = np.random.default_rng(0)
    for name, side in (("cat/1.png", 48), ("dog/4.png", 64)):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    return root


def test_oversized_images_skipped_with_count(oversized_folder, caplog):
    data = load_image_folder(oversized_folder)
    expected = [i for i, path in enumerate(data.train.sources) if _name(path) not in ("cat/1.png", "dog/4.png")]
    with caplog.at_level(logging.WARNING):
        readable = drop_unreadable(data.train, np.arange(len(data.train)), "skip", "training")
    assert readable.tolist() == expected
    assert "Skipping 2 unreadable training image(s)" in caplog.text


def test_oversized_images_error_names_files_and_fix(oversized_folder):
    data = load_image_folder(oversized_folder)
    with pytest.raises(ValueError) as raised:
        drop_unreadable(data.train, np.arange(len(data.train)), "error", "training")
    message = str(raised.value)
    assert message.startswith("2 training image(s) cannot be decoded.")
    assert f"cat{os.sep}1.png" in message
    assert f"dog{os.sep}4.png" in message
    assert "PIL.Image.MAX_IMAGE_PIXELS=1500" in message
    assert "data.bad_images=skip" in message
    assert "\n" not in message


def test_oversized_image_reason_is_pillow_limit(oversized_folder):
    data = load_image_folder(oversized_folder)
    reasons = dict(find_unreadable(data.train, np.arange(len(data.train))))
    assert len(reasons) == 2
    assert all("exceeds limit of" in reason for reason in reasons.values())


def test_corrupt_images_error_omits_pixel_limit(damaged_folder):
    data = load_image_folder(damaged_folder)
    with pytest.raises(ValueError) as raised:
        drop_unreadable(data.train, np.arange(len(data.train)), "error", "training")
    assert "MAX_IMAGE_PIXELS" not in str(raised.value)


def test_experiment_skips_oversized_images_when_asked(oversized_folder):
    values = {
        "model": {"name": "tiny", "random_init": True},
        "data": {"dataset": "image_folder", "root": str(oversized_folder), "bad_images": "skip"},
        "partition": {"method": "iid", "num_clients": 2, "min_samples": 1},
    }
    experiment = build_experiment(config_from_dict(values))
    assert sum(len(client) for client in experiment.client_train) == 12 - 2
    values["data"]["bad_images"] = "error"
    with pytest.raises(ValueError, match="2 training image"):
        build_experiment(config_from_dict(values))


@pytest.fixture()
def damaged_both_splits(damaged_folder):
    """The damaged folder plus one test image that is not an image."""
    (damaged_folder / "test" / "dog" / "3.png").write_bytes(b"not an image either")
    return damaged_folder


def test_splits_checked_together_before_raising(damaged_both_splits):
    data = load_image_folder(damaged_both_splits)
    checks = [("training", data.train, np.arange(len(data.train))), ("test", data.test, np.arange(len(data.test)))]
    with pytest.raises(ValueError) as raised:
        drop_unreadable_splits(checks, "error")
    message = str(raised.value)
    assert message.startswith("2 training and 1 test image(s) cannot be decoded.")
    training_part, test_part = message.split(". test: ")
    assert f"cat{os.sep}1.png" in training_part
    assert f"dog{os.sep}2.png" in training_part
    assert f"dog{os.sep}3.png" in test_part
    assert "data.bad_images=skip" in test_part


def test_splits_skip_keeps_each_entry(damaged_both_splits, caplog):
    data = load_image_folder(damaged_both_splits)
    bad_train = {i for i, path in enumerate(data.train.sources) if _name(path) in ("cat/1.png", "dog/2.png")}
    bad_test = {i for i, path in enumerate(data.test.sources) if _name(path) == "dog/3.png"}
    train_rows = np.array([7, 1, 12, 0, 19], dtype=np.int64)  # unsorted, so the order is checked
    test_rows = np.arange(len(data.test))
    with caplog.at_level(logging.WARNING):
        readable_train, readable_test = drop_unreadable_splits(
            [("training", data.train, train_rows), ("test", data.test, test_rows)], "skip"
        )
    assert readable_train.tolist() == [row for row in train_rows.tolist() if row not in bad_train]
    assert readable_test.tolist() == [row for row in test_rows.tolist() if row not in bad_test]
    assert readable_train.dtype == np.int64
    assert "Skipping 2 unreadable training image(s)" in caplog.text
    assert "Skipping 1 unreadable test image(s)" in caplog.text


def test_splits_sharing_a_name_counted_together(damaged_both_splits):
    data = load_image_folder(damaged_both_splits)
    cat_rows = np.flatnonzero(data.train.labels == 0)
    dog_rows = np.flatnonzero(data.train.labels == 1)
    checks = [
        ("training", data.train, cat_rows),
        ("test", data.test, np.arange(len(data.test))),
        ("training", data.train, dog_rows),
    ]
    with pytest.raises(ValueError, match=r"^2 training and 1 test image\(s\) cannot be decoded\."):
        drop_unreadable_splits(checks, "error")


def test_splits_error_lists_five_per_split(tmp_path):
    root = write_image_folder(tmp_path / "data", {"cat": (8, 2)})
    for n in range(7):
        (root / "train" / "cat" / f"{n}.png").write_bytes(b"broken")
    data = load_image_folder(root)
    with pytest.raises(ValueError) as raised:
        drop_unreadable_splits([("training", data.train, np.arange(len(data.train)))], "error")
    message = str(raised.value)
    assert message.startswith("7 training image(s) cannot be decoded.")
    assert message.count("cannot identify image file") == 5
    assert "(and 2 more)" in message


def test_clean_splits_unchanged(damaged_folder):
    data = load_image_folder(damaged_folder)
    rows = np.arange(len(data.test))
    (readable,) = drop_unreadable_splits([("test", data.test, rows)], "error")
    assert readable.tolist() == rows.tolist()


def test_experiment_reports_both_splits(damaged_both_splits):
    values = {
        "model": {"name": "tiny", "random_init": True},
        "data": {"dataset": "image_folder", "root": str(damaged_both_splits)},
        "partition": {"method": "iid", "num_clients": 2, "min_samples": 1},
    }
    with pytest.raises(ValueError, match=r"^2 training and 1 test image\(s\) cannot be decoded\."):
        build_experiment(config_from_dict(values))


def test_base_to_new_client_without_readable_shots(tmp_path):
    for split in ("train", "test"):
        for name in ("ant", "bee", "cow", "doe"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", (8, 8), (index * 90, 40, 200)).save(folder / f"{index}.png")
    for index in range(2):
        (tmp_path / "train" / "ant" / f"{index}.png").write_bytes(b"not an image")
    values = {
        "model": {"name": "tiny", "random_init": True},
        "data": {"dataset": "image_folder", "root": str(tmp_path), "bad_images": "skip"},
        "setting": {"kind": "base_to_new", "shots": 1},
        "partition": {"num_clients": 2},
    }
    with pytest.raises(ConfigError, match=r"Client \d has no readable training image left: all its 1 shots"):
        build_experiment(config_from_dict(values))
