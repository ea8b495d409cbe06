"""Tests for fl2ora.data.pacs on a generated PACS tree and the real PACS archive."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl2ora.data.pacs import PACS_CLASSES, PACS_DOMAINS, load_pacs

REAL_PACS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pacs.tar.gz"
REAL_COUNTS = {"art_painting": 2_048, "cartoon": 2_344, "photo": 1_670, "sketch": 3_929}


def write_pacs(root: Path, per_class: int = 3, lists_dir: str = "splits", image_dir: str = "") -> Path:
    """Write root/<image_dir>/<domain>/<class>/<n>.png and the k-fold lists in root/<lists_dir>.

    The last image of each class goes to crossval, the others to train, and test lists all of them.
    """
    (root / lists_dir).mkdir(parents=True, exist_ok=True)
    for domain in PACS_DOMAINS:
        lines: dict[str, list[str]] = {"train": [], "crossval": [], "test": []}
        for label, name in enumerate(PACS_CLASSES):
            folder = root / image_dir / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                Image.new("RGB", (4, 4), (30 * label, 0, 0)).save(folder / f"{n}.png")
                line = f"{domain}/{name}/{n}.png {label + 1}"
                lines["crossval" if n == per_class - 1 else "train"].append(line)
                lines["test"].append(line)
        for split, split_lines in lines.items():
            (root / lists_dir / f"{domain}_{split}_kfold.txt").write_text("\n".join(split_lines) + "\n")
    return root


def file_set(paths) -> set[str]:
    return {str(p) for p in paths}


def test_pacs_default_crossval(tmp_path):
    write_pacs(tmp_path / "pacs")
    data = load_pacs(tmp_path)
    assert data.domains == list(PACS_DOMAINS)
    assert data.classnames == list(PACS_CLASSES)
    assert data.template == "a photo of a {}."
    assert data.name == "pacs"
    for domain in PACS_DOMAINS:
        split = data.per_domain[domain]
        assert len(split.train) == 14
        assert len(split.test) == 7
        assert split.val is None
        np.testing.assert_array_equal(split.test.labels, np.arange(7))
        assert not file_set(split.train.sources) & file_set(split.test.sources)
        # Each label matches the class folder of its image.
        for source, label in zip(split.train.sources, split.train.labels):
            assert Path(source).parent.name == PACS_CLASSES[label]


def test_pacs_test_kfold_contains_train(tmp_path, caplog):
    write_pacs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fl2ora.data.pacs"):
        data = load_pacs(tmp_path, domains=["sketch"], pacs_test_split="test_kfold")
    assert "contains every train_kfold image" in caplog.text
    sketch = data.per_domain["sketch"]
    assert len(sketch.test) == 21
    assert file_set(sketch.train.sources) <= file_set(sketch.test.sources)
    assert len(sketch.val) == 7


def test_pacs_domain_subset_order(tmp_path):
    write_pacs(tmp_path)
    data = load_pacs(tmp_path, domains=["sketch", "art_painting"])
    assert data.domains == ["art_painting", "sketch"]
    assert list(data.per_domain) == ["art_painting", "sketch"]


def test_pacs_kfold_layout(tmp_path):
    # Images under kfold/ and lists beside it, as in the original distribution.
    write_pacs(tmp_path / "PACS", lists_dir="", image_dir="kfold")
    data = load_pacs(tmp_path)
    assert Path(data.per_domain["photo"].train.sources[0]).parts[-4] == "kfold"


def test_pacs_missing_image_and_skip(tmp_path, caplog):
    write_pacs(tmp_path)
    (tmp_path / "cartoon" / "dog" / "0.png").unlink()
    expected = r"1 of 14 images listed in .*cartoon_train_kfold.txt.*cartoon/dog/0.png"
    with pytest.raises(FileNotFoundError, match=expected):
        load_pacs(tmp_path, domains=["cartoon"])
    with caplog.at_level(logging.WARNING, logger="fl2ora.data.coop_splits"):
        data = load_pacs(tmp_path, domains=["cartoon"], skip_missing=True)
    assert len(data.per_domain["cartoon"].train) == 13
    assert "Skipping 1 of 14" in caplog.text


def test_pacs_missing_list_names_path(tmp_path):
    write_pacs(tmp_path)
    (tmp_path / "splits" / "photo_crossval_kfold.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"PACS list not found: .*photo_crossval_kfold.txt"):
        load_pacs(tmp_path)


def test_pacs_missing_layout_lists_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_pacs(tmp_path / "empty")
    message = str(error.value)
    assert "No PACS images and k-fold lists" in message
    assert "<root>/splits/<domain>_{train,crossval,test}_kfold.txt" in message
    with pytest.raises(FileNotFoundError, match="PACS root not found"):
        load_pacs(tmp_path / "absent")


@pytest.mark.parametrize(
    "line,fragment",
    [
        ("photo/dog/0.png", "line 1"),
        ("photo/dog/0.png one", "1-based integer label"),
        ("photo/dog/0.png 0", "1-based integer label"),
        ("../photo/dog/0.png 1", "relative path"),
    ],
)
def test_pacs_malformed_list(tmp_path, line, fragment):
    write_pacs(tmp_path)
    (tmp_path / "splits" / "photo_train_kfold.txt").write_text(line + "\n")
    with pytest.raises(ValueError, match=fragment):
        load_pacs(tmp_path, domains=["photo"])


def test_pacs_label_conflict(tmp_path):
    write_pacs(tmp_path)
    (tmp_path / "splits" / "photo_train_kfold.txt").write_text("photo/dog/0.png 1\nphoto/horse/0.png 1\n")
    with pytest.raises(ValueError, match="label 1 is used for class folders 'dog' and 'horse'"):
        load_pacs(tmp_path, domains=["photo"])


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"pacs_test_split": "test"}, "pacs_test_split must be 'crossval' or 'test_kfold'"),
        ({"domains": ["painting"]}, r"unknown domains \['painting'\]"),
        ({"domains": "photo"}, "non-empty list"),
        ({"domains": []}, "non-empty list"),
        ({"download": True}, "cannot be downloaded"),
    ],
)
def test_pacs_invalid_arguments(tmp_path, kwargs, fragment):
    write_pacs(tmp_path)
    with pytest.raises(ValueError, match=fragment):
        load_pacs(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Real PACS
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs_cache(tmp_path_factory) -> Path:
    if not REAL_PACS.is_file():
        pytest.skip(f"PACS archive not found at {REAL_PACS}")
    return tmp_path_factory.mktemp("pacs-cache")


def domain_files(data, domain: str) -> set[str]:
    """Every image file on disk in the domain's folder, found by walking it."""
    domain_dir = Path(data.per_domain[domain].train.sources[0]).parents[1]
    assert domain_dir.name == domain
    return {str(p) for p in domain_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_real_pacs_crossval(pacs_cache):
    data = load_pacs(REAL_PACS, cache_dir=pacs_cache)
    assert data.domains == list(PACS_DOMAINS)
    assert data.classnames == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    for domain, count in REAL_COUNTS.items():
        split = data.per_domain[domain]
        train, test = file_set(split.train.sources), file_set(split.test.sources)
        assert len(train) + len(test) == count, domain
        assert not train & test, domain
        assert train | test == domain_files(data, domain), domain
        for source, label in zip(split.test.sources, split.test.labels):
            assert Path(source).parent.name == data.classnames[label]


@pytest.mark.slow
def test_real_pacs_test_kfold_defect(pacs_cache):
    data = load_pacs(REAL_PACS, pacs_test_split="test_kfold", cache_dir=pacs_cache)
    for domain, count in REAL_COUNTS.items():
        split = data.per_domain[domain]
        train, test = file_set(split.train.sources), file_set(split.test.sources)
        assert len(test) == count, domain
        # The documented defect: the official test list contains every training image.
        assert train <= test, domain
        assert file_set(split.val.sources) == test - train, domain
