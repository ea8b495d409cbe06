"""Tests for fl2ora.data.domains: stratified splits, DomainData, OfficeHome and VLCS on generated trees."""

from __future__ import annotations

import io
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl2ora.data.datasets import ImageClassificationData, ImageSamples
from fl2ora.data.domains import DomainData, load_office_home, load_vlcs, stratified_split

OFFICE_HOME_DOMAINS = ["Art", "Clipart", "Product", "Real_World"]
OFFICE_HOME_CLASSES = [
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar",
    "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser",
    "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer",
    "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse",
    "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin",
    "Radio", "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
    "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
]
VLCS_CLASSES = ["bird", "car", "chair", "dog", "person"]
_JPEG = io.BytesIO()
Image.new("RGB", (4, 4), (9, 99, 199)).save(_JPEG, format="JPEG")


def write_class_folders(folder: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            (folder / name / f"{n:05d}.jpg").write_bytes(_JPEG.getvalue())


# A few classes with awkward names, for the tests that do not need all 65.
SOME_CLASSES = ["Alarm_Clock", "Mug", "TV", "Table", "ToothBrush"]


def office_home_counts(classes: list[str]) -> dict[str, int]:
    """1 to 7 images per class, so the rounding of the test share is exercised."""
    return {name: 1 + index % 7 for index, name in enumerate(classes)}


def write_office_home(root: Path, real_world_folder: str = "Real_World", classes: list[str] = SOME_CLASSES) -> Path:
    for domain in OFFICE_HOME_DOMAINS:
        folder = real_world_folder if domain == "Real_World" else domain
        write_class_folders(root / folder, office_home_counts(classes))
    return root


def expected_test_count(n: int, fraction: float) -> int:
    """The documented rule: round half up, at least one test image from 2 images on, one train image kept."""
    if n == 1:
        return 0
    return min(max(int(fraction * n + 0.5), 1), n - 1)


# ---------------------------------------------------------------------------------------------------
# stratified_split
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.75])
def test_stratified_split_counts(fraction):
    counts = [1, 2, 3, 5, 10, 11]
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(3).shuffle(labels)
    train, test = stratified_split(labels, fraction, seed=4)

    assert train.dtype == np.int64
    assert np.all(np.diff(train) > 0)
    assert np.all(np.diff(test) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    test_counts = np.bincount(labels[test], minlength=len(counts))
    expected = [expected_test_count(n, fraction) for n in counts]
    np.testing.assert_array_equal(test_counts, expected)
    assert expected[4] == math.floor(fraction * 10 + 0.5)


def test_stratified_split_seeded():
    labels = np.repeat(np.arange(3), 20)
    first = stratified_split(labels, 0.2, seed=1)
    again = stratified_split(labels, 0.2, seed=1)
    other = stratified_split(labels, 0.2, seed=2)
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize(
    "labels,fraction,fragment",
    [
        ([0, 1], 0.0, "test_fraction must be a number in"),
        ([0, 1], 1.0, "test_fraction must be a number in"),
        ([0, 1], True, "test_fraction must be a number in"),
        ([0, 1], "0.2", "test_fraction must be a number in"),
        ([[0, 1]], 0.2, "1-D integer"),
        ([0.5, 1.0], 0.2, "1-D integer"),
    ],
)
def test_stratified_split_invalid(labels, fraction, fragment):
    with pytest.raises(ValueError, match=fragment):
        stratified_split(labels, fraction)


# ---------------------------------------------------------------------------------------------------
# DomainData
# ---------------------------------------------------------------------------------------------------


def tiny_data(classnames: list[str], template: str = "a photo of a {}.") -> ImageClassificationData:
    samples = ImageSamples([np.zeros((2, 2, 3), np.uint8)], [0])
    return ImageClassificationData(samples, samples, classnames, template, "toy")


@pytest.mark.parametrize(
    "domains,per_domain,fragment",
    [
        ([], {}, "domains is empty"),
        (["a"], {"b": tiny_data(["x"])}, "exactly once"),
        (["a", "a"], {"a": tiny_data(["x"])}, "exactly once"),
        (["a"], {"a": tiny_data(["y"])}, "must share"),
        (["a"], {"a": tiny_data(["x"], "{} art.")}, "must share"),
    ],
)
def test_domain_data_invalid(domains, per_domain, fragment):
    with pytest.raises(ValueError, match=fragment):
        DomainData(domains, per_domain, ["x"], "a photo of a {}.", "toy")


# ---------------------------------------------------------------------------------------------------
# OfficeHome
# ---------------------------------------------------------------------------------------------------


def test_office_home_seeded_split(tmp_path):
    write_office_home(tmp_path / "OfficeHome", classes=OFFICE_HOME_CLASSES)
    data = load_office_home(tmp_path)
    assert data.domains == OFFICE_HOME_DOMAINS
    assert data.num_classes == 65
    assert data.classnames[0] == "alarm clock"
    assert data.classnames[sorted(OFFICE_HOME_CLASSES).index("ToothBrush")] == "toothbrush"
    assert data.template == "a photo of a {}."

    counts = office_home_counts(OFFICE_HOME_CLASSES)
    folders = sorted(OFFICE_HOME_CLASSES)
    expected_test = [expected_test_count(counts[name], 0.2) for name in folders]
    for domain in OFFICE_HOME_DOMAINS:
        split = data.per_domain[domain]
        assert split.name == f"office_home/{domain}"
        np.testing.assert_array_equal(np.bincount(split.test.labels, minlength=65), expected_test)
        np.testing.assert_array_equal(
            np.bincount(split.train.labels, minlength=65) + expected_test, [counts[name] for name in folders]
        )
        assert not {str(p) for p in split.train.sources} & {str(p) for p in split.test.sources}
        for source, label in zip(split.train.sources, split.train.labels):
            assert Path(source).parent.name == folders[label]


def test_office_home_split_per_domain_stable(tmp_path):
    write_office_home(tmp_path, real_world_folder="Real World")
    full = load_office_home(tmp_path, seed=7)
    alone = load_office_home(tmp_path, domains=["Real_World"], seed=7)
    other_seed = load_office_home(tmp_path, domains=["Real_World"], seed=8)
    assert alone.domains == ["Real_World"]
    assert Path(alone.per_domain["Real_World"].train.sources[0]).parts[-3] == "Real World"
    assert alone.per_domain["Real_World"].test.sources == full.per_domain["Real_World"].test.sources
    assert other_seed.per_domain["Real_World"].test.sources != full.per_domain["Real_World"].test.sources


def test_office_home_archive_and_mapping(tmp_path):
    write_office_home(tmp_path / "src" / "OfficeHomeDataset_10072016")
    archive = tmp_path / "office_home.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "OfficeHomeDataset_10072016", arcname="OfficeHomeDataset_10072016")
    data = load_office_home(archive, test_fraction=0.5, classnames={"TV": "television"}, cache_dir=tmp_path / "cache")
    assert data.classnames == ["alarm clock", "mug", "television", "table", "toothbrush"]
    assert str(data.per_domain["Art"].test.sources[0]).startswith(str(tmp_path / "cache"))


def test_office_home_class_mismatch(tmp_path):
    write_office_home(tmp_path)
    (tmp_path / "Clipart" / "Zebra").mkdir()
    (tmp_path / "Clipart" / "Zebra" / "1.jpg").write_bytes(_JPEG.getvalue())
    with pytest.raises(ValueError, match=r"Clipart .*unexpected \['Zebra'\]"):
        load_office_home(tmp_path)


def test_office_home_empty_class(tmp_path):
    write_office_home(tmp_path)
    for path in (tmp_path / "Product" / "Mug").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"Class folders \['Mug'\] in .*Product contain no images"):
        load_office_home(tmp_path)


def test_office_home_missing_domain_lists_expected(tmp_path):
    write_office_home(tmp_path)
    for path in (tmp_path / "Product").rglob("*.jpg"):
        path.unlink()
    for path in sorted((tmp_path / "Product").iterdir()):
        path.rmdir()
    (tmp_path / "Product").rmdir()
    with pytest.raises(FileNotFoundError) as error:
        load_office_home(tmp_path)
    assert "No OfficeHome domain folders found" in str(error.value)
    assert "<root>/{Art,Clipart,Product,Real_World}/<class>/<image>" in str(error.value)
    # The other three domains still load.
    assert load_office_home(tmp_path, domains=["Art", "Clipart"]).domains == ["Art", "Clipart"]


def test_office_home_warns_on_class_count(tmp_path, caplog):
    for domain in OFFICE_HOME_DOMAINS:
        write_class_folders(tmp_path / domain, {"Mug": 2, "Pen": 2})
    with caplog.at_level(logging.WARNING, logger="fl2ora.data.domains"):
        data = load_office_home(tmp_path)
    assert data.classnames == ["mug", "pen"]
    assert "has 2 classes, not the usual 65" in caplog.text


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        ({"domains": ["Photo"]}, ValueError, r"unknown domains \['Photo'\]"),
        ({"test_fraction": 1.5}, ValueError, "test_fraction must be a number in"),
        ({"seed": -1}, ValueError, "seed must be a non-negative int"),
        ({"seed": 1.5}, ValueError, "seed must be a non-negative int"),
        ({"classnames": {"Typo": "x"}}, ValueError, r"do not exist: \['Typo'\]"),
        ({"download": True}, ValueError, "cannot be downloaded"),
    ],
)
def test_office_home_invalid_arguments(tmp_path, kwargs, error, fragment):
    for domain in OFFICE_HOME_DOMAINS:
        write_class_folders(tmp_path / domain, {"Mug": 2})
    with pytest.raises(error, match=fragment):
        load_office_home(tmp_path, **kwargs)


def test_office_home_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="OfficeHome root not found"):
        load_office_home(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------------
# VLCS
# ---------------------------------------------------------------------------------------------------


def test_vlcs_flat_seeded(tmp_path):
    for domain in ["CALTECH", "LABELME", "PASCAL", "SUN"]:
        write_class_folders(tmp_path / "VLCS" / domain, {name: 10 for name in VLCS_CLASSES})
    data = load_vlcs(tmp_path)
    assert data.domains == ["CALTECH", "LABELME", "PASCAL", "SUN"]
    assert data.classnames == VLCS_CLASSES
    for domain in data.domains:
        np.testing.assert_array_equal(np.bincount(data.per_domain[domain].test.labels), [2] * 5)
        np.testing.assert_array_equal(np.bincount(data.per_domain[domain].train.labels), [8] * 5)
        assert data.per_domain[domain].val is None


def test_vlcs_folder_splits(tmp_path):
    """DomainBed naming, one domain with train/test/crossval folders, one with full/, two flat."""
    write_class_folders(tmp_path / "Caltech101" / "train", {name: 3 for name in VLCS_CLASSES})
    write_class_folders(tmp_path / "Caltech101" / "test", {name: 2 for name in VLCS_CLASSES})
    write_class_folders(tmp_path / "Caltech101" / "crossval", {name: 1 for name in VLCS_CLASSES})
    write_class_folders(tmp_path / "LabelMe" / "full", {name: 5 for name in VLCS_CLASSES})
    for domain in ["SUN09", "VOC2007"]:
        write_class_folders(tmp_path / domain, {name: 5 for name in VLCS_CLASSES})
    data = load_vlcs(tmp_path)
    assert data.domains == ["Caltech101", "LabelMe", "SUN09", "VOC2007"]

    caltech = data.per_domain["Caltech101"]
    assert len(caltech.train) == 15
    assert len(caltech.test) == 10
    assert len(caltech.val) == 5
    assert all(Path(p).parts[-3] == "test" for p in caltech.test.sources)

    labelme = data.per_domain["LabelMe"]
    np.testing.assert_array_equal(np.bincount(labelme.test.labels), [1] * 5)
    assert all(Path(p).parts[-3] == "full" for p in labelme.train.sources)

    # The seeded split's arguments are checked even where a domain brings its own split.
    with pytest.raises(ValueError, match="test_fraction must be a number in"):
        load_vlcs(tmp_path, domains=["Caltech101"], test_fraction=0)


def test_vlcs_numbered_classes(tmp_path, caplog):
    for domain in ["CALTECH", "LABELME", "PASCAL", "SUN"]:
        write_class_folders(tmp_path / domain, {str(i): 2 for i in range(5)})
    with caplog.at_level(logging.WARNING, logger="fl2ora.data.domains"):
        numbered = load_vlcs(tmp_path)
    assert numbered.classnames == ["0", "1", "2", "3", "4"]
    assert "Pass classnames=" in caplog.text
    named = load_vlcs(tmp_path, classnames=dict(zip("01234", VLCS_CLASSES)))
    assert named.classnames == VLCS_CLASSES


def test_vlcs_mixed_naming_rejected(tmp_path):
    for domain in ["CALTECH", "LABELME", "PASCAL", "SUN"]:
        write_class_folders(tmp_path / domain, {"dog": 2})
    with pytest.raises(FileNotFoundError, match=r"No VLCS domain folders for \['CALTECH', 'SUN09'\]"):
        load_vlcs(tmp_path, domains=["CALTECH", "SUN09"])
