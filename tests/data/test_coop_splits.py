"""Tests for fl2ora.data.coop_splits on generated images, the shared split files and real Caltech-101."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl2ora.data.coop_splits import (
    SPLIT_DATASETS,
    load_caltech101,
    load_dtd,
    load_flowers102,
    load_food101,
    load_oxford_pets,
    load_split_dataset,
    read_split_file,
)
from fl2ora.data.datasets import load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
REAL_CALTECH = SHARED_DATA / "caltech-101.tar.gz"


def class_color(label: int) -> tuple[int, int, int]:
    return ((40 * label) % 256, 255 - (25 * label) % 256, (90 + 70 * label) % 256)


def jpeg_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_listed_images(image_root: Path, split: dict[str, list]) -> int:
    """Write an 8x8 JPEG in the class color at every path of a split dict; return the number written."""
    encoded: dict[int, bytes] = {}
    written = 0
    for entries in split.values():
        for relpath, label, _ in entries:
            path = image_root / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            if label not in encoded:
                encoded[label] = jpeg_bytes(class_color(label))
            path.write_bytes(encoded[label])
            written += 1
    return written


def make_split(classes: list[str], counts: tuple[int, int, int] = (3, 1, 2), folder_per_class: bool = True) -> dict:
    """A split dict with `counts` (train, val, test) entries per class, paths <class>/<class>_<n>.jpg."""
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        number = 0
        for key, count in zip(("train", "val", "test"), counts):
            for _ in range(count):
                relpath = f"{name}/{name}_{number:04d}.jpg" if folder_per_class else f"{name}_{number:04d}.jpg"
                split[key].append([relpath, label, name])
                number += 1
    return split


def write_dataset(root: Path, name: str, split: dict) -> Path:
    """Write CoOp's layout for dataset `name` under root/<CoOp folder>/ and return that folder."""
    spec = SPLIT_DATASETS[name]
    dataset_dir = root / spec.dataset_dir
    write_listed_images(dataset_dir / spec.image_dir, split)
    (dataset_dir / spec.split_file).write_text(json.dumps(split))
    return dataset_dir


def mean_color(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


# ---------------------------------------------------------------------------------------------------
# The shared split files of DTD, OxfordPets and Flowers102
# ---------------------------------------------------------------------------------------------------

SHARED_SPLITS = [
    ("dtd", "split_zhou_DescribableTextures.json", 47, load_dtd),
    ("oxford_pets", "split_zhou_OxfordPets.json", 37, load_oxford_pets),
    ("flowers102", "split_zhou_OxfordFlowers.json", 102, load_flowers102),
]


def reduce_split(raw: dict, per_class: int) -> dict:
    """Keep the first `per_class` entries of each label in each split."""
    reduced: dict[str, list] = {}
    for split, entries in raw.items():
        taken_per_label: dict[int, int] = {}
        reduced[split] = []
        for entry in entries:
            if taken_per_label.get(entry[1], 0) < per_class:
                taken_per_label[entry[1]] = taken_per_label.get(entry[1], 0) + 1
                reduced[split].append(entry)
    return reduced


@pytest.mark.parametrize("name,file_name,num_classes,loader", SHARED_SPLITS, ids=[s[0] for s in SHARED_SPLITS])
def test_shared_split_file_loads(tmp_path, name, file_name, num_classes, loader):
    split_path = SHARED_DATA / "splits" / file_name
    if not split_path.is_file():
        pytest.skip(f"split file not found at {split_path}")
    raw = json.loads(split_path.read_text())

    # Class names by label, computed from the raw JSON.
    names_by_label = {label: classname for entries in raw.values() for _, label, classname in entries}
    expected_names = [names_by_label[label] for label in range(len(names_by_label))]
    parsed = read_split_file(split_path)
    assert len(parsed.classnames) == num_classes
    assert parsed.classnames == expected_names
    for split in ("train", "val", "test"):
        assert parsed.entries[split] == [(relpath, label) for relpath, label, _ in raw[split]]

    # Images for two entries per class and split keep the test fast; every class still occurs.
    reduced = reduce_split(raw, per_class=2)
    reduced_path = tmp_path / file_name
    reduced_path.write_text(json.dumps(reduced))
    spec = SPLIT_DATASETS[name]
    image_root = tmp_path / spec.dataset_dir / spec.image_dir
    write_listed_images(image_root, reduced)
    data = loader(tmp_path, split_path=reduced_path)

    assert data.name == name
    assert data.template == spec.template
    assert data.num_classes == num_classes
    assert data.classnames == [n.replace("_", " ") for n in expected_names]
    for split, samples in (("train", data.train), ("val", data.val), ("test", data.test)):
        assert samples is not None
        assert len(samples) == 2 * num_classes
        np.testing.assert_array_equal(samples.labels, [label for _, label, _ in reduced[split]])
        assert samples.sources[0] == image_root / reduced[split][0][0]

    # The image behind a sample carries its label's color, so paths and labels were kept together.
    index = len(data.test) - 1
    color = mean_color(Path(data.test.sources[index]))
    np.testing.assert_allclose(color, class_color(int(data.test.labels[index])), atol=4)


def test_oxford_pets_names_readable():
    split_path = SHARED_DATA / "splits" / "split_zhou_OxfordPets.json"
    if not split_path.is_file():
        pytest.skip(f"split file not found at {split_path}")
    names = read_split_file(split_path).classnames
    assert names[1] == "american_bulldog"
    assert "_" not in " ".join(n.replace("_", " ") for n in names)


# ---------------------------------------------------------------------------------------------------
# Generated layouts
# ---------------------------------------------------------------------------------------------------


def test_food101_layout_and_archive(tmp_path):
    classes = ["apple_pie", "baby_back_ribs", "ramen"]
    split = make_split(classes)
    dataset_dir = write_dataset(tmp_path / "data", "food101", split)

    for root in (tmp_path / "data", dataset_dir):
        data = load_food101(root)
        assert data.classnames == ["apple pie", "baby back ribs", "ramen"]
        assert data.prompts()[0] == "a photo of apple pie, a type of food."
        assert len(data.train) == 9
        assert len(data.val) == 3
        assert len(data.test) == 6
        np.testing.assert_array_equal(data.test.labels, [0, 0, 1, 1, 2, 2])
        assert data.test.sources[2] == dataset_dir / "images" / "baby_back_ribs" / "baby_back_ribs_0004.jpg"

    archive = tmp_path / "food-101.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(dataset_dir, arcname="food-101")
    from_archive = load_dataset("food101", archive, cache_dir=tmp_path / "cache")
    assert len(from_archive.train) == 9
    assert str(from_archive.train.sources[0]).startswith(str(tmp_path / "cache"))
    image, label = from_archive.train[4]
    assert label == 1
    np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy() * 255, class_color(1), atol=4)


def test_caltech_root_variants(tmp_path):
    split = make_split(["face", "leopard"], counts=(2, 0, 1))
    dataset_dir = write_dataset(tmp_path, "caltech101", split)
    split_copy = tmp_path / "elsewhere.json"
    (dataset_dir / "split_zhou_Caltech101.json").rename(split_copy)

    # The image folder itself, with the split file passed separately.
    data = load_caltech101(dataset_dir / "101_ObjectCategories", split_path=split_copy)
    assert data.classnames == ["face", "leopard"]
    assert len(data.val) == 0
    assert data.prompts() == ["a photo of a face.", "a photo of a leopard."]


def test_split_file_without_val(tmp_path):
    split = make_split(["a", "b"])
    del split["val"]
    write_dataset(tmp_path, "dtd", split)
    data = load_dtd(tmp_path)
    assert data.val is None
    assert data.prompts() == ["a texture.", "b texture."]


# ---------------------------------------------------------------------------------------------------
# Missing files
# ---------------------------------------------------------------------------------------------------


def test_missing_images_error_lists_paths(tmp_path):
    split = make_split(["cat", "dog"])
    dataset_dir = write_dataset(tmp_path, "oxford_pets", split)
    (dataset_dir / "images" / "dog" / "dog_0001.jpg").unlink()
    (dataset_dir / "images" / "cat" / "cat_0005.jpg").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_oxford_pets(tmp_path)
    message = str(error.value)
    assert "2 of 12 images" in message
    assert "cat/cat_0005.jpg" in message
    assert "dog/dog_0001.jpg" in message
    assert "skip_missing=True" in message


def test_skip_missing_logs_and_drops(tmp_path, caplog):
    split = make_split(["cat", "dog"])
    dataset_dir = write_dataset(tmp_path, "oxford_pets", split)
    (dataset_dir / "images" / "dog" / "dog_0001.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="fl2ora.data.coop_splits"):
        data = load_oxford_pets(tmp_path, skip_missing=True)
    assert "Skipping 1 of 12 images" in caplog.text
    assert len(data.train) == 5
    np.testing.assert_array_equal(data.train.labels, [0, 0, 0, 1, 1])
    assert dataset_dir / "images" / "dog" / "dog_0001.jpg" not in data.train.sources


def test_class_without_images_rejected(tmp_path):
    split = make_split(["cat", "dog"])
    dataset_dir = write_dataset(tmp_path, "oxford_pets", split)
    for path in (dataset_dir / "images" / "dog").iterdir():
        if path.name in ("dog_0004.jpg", "dog_0005.jpg"):
            path.unlink()
    with pytest.raises(ValueError, match=r"Classes \[1\] \(\['dog'\]\) of split 'test'.*no images"):
        load_oxford_pets(tmp_path, skip_missing=True)


def test_missing_image_folder_lists_expected(tmp_path):
    (tmp_path / "flowers").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_flowers102(tmp_path / "flowers")
    message = str(error.value)
    assert "image folder jpg/ not found" in message
    assert str(tmp_path / "flowers" / "oxford_flowers") in message
    assert "<root>/split_zhou_OxfordFlowers.json" in message


def test_missing_split_file_names_path(tmp_path):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        load_dtd(tmp_path)
    assert str(tmp_path / "dtd" / "split_zhou_DescribableTextures.json") in str(error.value)
    assert "split_path=" in str(error.value)


def test_missing_root_and_split_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Caltech101 root not found.*101_ObjectCategories"):
        load_caltech101(tmp_path / "absent")
    (tmp_path / "caltech-101" / "101_ObjectCategories").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Split file not found"):
        load_caltech101(tmp_path, split_path=tmp_path / "absent.json")


# ---------------------------------------------------------------------------------------------------
# Invalid split files and arguments
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("{not json", "not valid JSON"),
        (json.dumps([["a.jpg", 0, "a"]]), "must be a JSON object"),
        (json.dumps({"train": []}), "must be a JSON object with lists 'train', 'test'"),
        (json.dumps({"train": [["a.jpg", "0", "a"]], "test": []}), r"train\[0\] is"),
        (json.dumps({"train": [["a.jpg", True, "a"]], "test": []}), r"train\[0\] is"),
        (json.dumps({"train": [["a.jpg", -1, "a"]], "test": []}), "non-negative int label"),
        (json.dumps({"train": [["a.jpg", 0]], "test": []}), r"train\[0\] is"),
        (json.dumps({"train": [["a.jpg", 0, "a"]], "test": [["b.jpg", 0, "b"]]}), "label 0 is named 'a'"),
        (json.dumps({"train": [["a.jpg", 0, "a"], ["c.jpg", 2, "c"]], "test": []}), r"ids \[1\] never occur"),
        (json.dumps({"train": [["/etc/a.jpg", 0, "a"]], "test": []}), "must be relative"),
        (json.dumps({"train": [["../a.jpg", 0, "a"]], "test": []}), "without '..'"),
    ],
)
def test_read_split_file_invalid(tmp_path, content, fragment):
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=fragment):
        read_split_file(path)


@pytest.mark.parametrize(
    "name,kwargs,error,fragment",
    [
        ("caltech", {}, ValueError, r"Unknown split dataset 'caltech'.*'caltech101'"),
        ("dtd", {"download": True}, ValueError, "cannot be downloaded"),
    ],
)
def test_load_split_dataset_invalid(tmp_path, name, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        load_split_dataset(name, tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Real Caltech-101
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_caltech(tmp_path_factory):
    if not REAL_CALTECH.is_file():
        pytest.skip(f"Caltech-101 archive not found at {REAL_CALTECH}")
    return load_caltech101(REAL_CALTECH, cache_dir=tmp_path_factory.mktemp("caltech-cache"))


@pytest.mark.slow
def test_real_caltech101_split(real_caltech):
    data = real_caltech
    assert data.num_classes == 100
    assert len(data.train) == 4_128
    assert len(data.val) == 1_649
    assert len(data.test) == 2_465
    assert data.template == "a photo of a {}."

    # Names and folders read from the split file inside the archive with the json module.
    split_file = Path(data.train.sources[0]).parents[2] / "split_zhou_Caltech101.json"
    raw = json.loads(split_file.read_text())
    folder_to_name = {relpath.split("/")[0]: name for entries in raw.values() for relpath, _, name in entries}
    assert folder_to_name["Faces"] == "face"
    assert folder_to_name["car_side"] == "car_side"
    assert data.classnames[0] == "face"
    assert data.classnames[data.classnames.index("car side")] == "car side"
    assert "BACKGROUND_Google" not in folder_to_name

    for split, samples in (("train", data.train), ("val", data.val), ("test", data.test)):
        assert all(Path(source).is_file() for source in samples.sources), split
        expected = [(name, label) for relpath, label, name in raw[split]]
        observed = [
            (folder_to_name[Path(source).parent.name], int(label))
            for source, label in zip(samples.sources, samples.labels)
        ]
        assert observed == expected, split
    image, _ = data.test[0]
    assert image.shape[0] == 3
    assert max(image.shape[1:]) <= 160
