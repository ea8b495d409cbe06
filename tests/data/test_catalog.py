"""Tests for fl2ora.data.catalog: CIFAR-100 on generated fixtures and the dataset registries."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl2ora.data import catalog
from fl2ora.data.catalog import (
    CIFAR100_CLASSES,
    DOMAIN_DATASET_LOADERS,
    load_cifar100,
    load_domain_dataset,
)
from fl2ora.data.datasets import DATASET_LOADERS, load_dataset
from fl2ora.data.pacs import PACS_CLASSES, PACS_DOMAINS


def write_fake_cifar100(root: Path, train_count: int = 12, test_count: int = 5, seed: int = 0) -> dict:
    """Write root/cifar-100-python/{train,test,meta} in the CIFAR-100 python format.

    Returns each file's (data, fine labels); data is (n, 3072) uint8, channel-major planes of 32 x 32.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, count in (("train", train_count), ("test", test_count)):
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(0, 100, size=count)]
        entry = {
            "filenames": [f"img_{i}.png" for i in range(count)],
            "batch_label": f"fake {name}",
            "fine_labels": fine,
            "coarse_labels": [label // 5 for label in fine],
            "data": data,
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
        written[name] = (data, fine)
    meta = {"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": [f"super{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return written


def write_cifar100_folders(root: Path, classes=CIFAR100_CLASSES) -> None:
    """Write root/{train,test}/<fine label>/0.png, each image one gray level per class id."""
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (label, label, label)).save(root / split / name / "0.png")


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """Accept fake files: torchvision compares each file with the MD5 of the official release."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


# ---------------------------------------------------------------------------------------------------
# CIFAR-100
# ---------------------------------------------------------------------------------------------------


def test_cifar100_class_list():
    assert len(CIFAR100_CLASSES) == 100
    assert len(set(CIFAR100_CLASSES)) == 100
    # The fine labels of CIFAR-100 are numbered in alphabetical order.
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)


def test_cifar100_torchvision_layout(tmp_path, skip_cifar_md5):
    root = tmp_path / "outer" / "cifar"
    written = write_fake_cifar100(root)
    data = load_cifar100(root)
    assert data.name == "cifar100"
    assert data.template == "a photo of a {}."
    assert data.classnames[1] == "aquarium fish"
    assert data.classnames[58] == "pickup truck"
    assert len(data.train) == 12
    assert len(data.test) == 5
    np.testing.assert_array_equal(data.train.labels, written["train"][1])
    np.testing.assert_array_equal(data.test.labels, written["test"][1])

    expected = written["train"][0][7].reshape(3, 32, 32).astype(np.float32) / 255
    image, label = data.train[7]
    assert label == written["train"][1][7]
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)

    # The cifar-100-python folder itself, and a folder whose only subfolder contains it, are accepted as root.
    assert len(load_cifar100(root / "cifar-100-python").test) == 5
    assert len(load_cifar100(tmp_path / "outer").train) == 12


def test_cifar100_archive_of_batches(tmp_path, skip_cifar_md5):
    written = write_fake_cifar100(tmp_path / "src")
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    data = load_dataset("cifar100", archive, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.test.labels, written["test"][1])


def test_cifar100_download_when_requested(tmp_path, monkeypatch, skip_cifar_md5):
    from torchvision.datasets import CIFAR100

    calls = []

    def fake_download(self):
        calls.append(self.root)
        if not (Path(self.root) / "cifar-100-python").is_dir():
            write_fake_cifar100(Path(self.root), train_count=3, test_count=2)

    monkeypatch.setattr(CIFAR100, "download", fake_download)
    data = load_cifar100(tmp_path / "new", download=True)
    assert len(data.train) == 3
    assert calls == [str(tmp_path / "new")] * 2


def test_cifar100_bad_checksum(tmp_path):
    write_fake_cifar100(tmp_path)
    with pytest.raises(ValueError, match=r"torchvision could not read CIFAR-100.*download=True"):
        load_cifar100(tmp_path)


def test_cifar100_wrong_meta(tmp_path, skip_cifar_md5):
    write_fake_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, handle)
    with pytest.raises(ValueError, match="does not contain CIFAR-100"):
        load_cifar100(tmp_path)


@pytest.mark.parametrize("subfolder", ["", "cifar100"])
def test_cifar100_image_folders(tmp_path, subfolder):
    write_cifar100_folders(tmp_path / "root" / subfolder)
    data = load_cifar100(tmp_path / "root")
    np.testing.assert_array_equal(data.train.labels, np.arange(100))
    assert Path(data.train.sources[1]).parent.name == "aquarium_fish"
    assert data.classnames[1] == "aquarium fish"
    image, label = data.test[42]
    assert label == 42
    torch.testing.assert_close(image, torch.full((3, 4, 4), 42 / 255))


@pytest.mark.parametrize(
    "setup,error,fragment",
    [
        ("absent", FileNotFoundError, r"CIFAR-100 root not found.*cifar-100-python.*download=True"),
        ("empty", ValueError, r"No CIFAR-100 layout found.*train/<class>.*\.tar\.gz"),
        ("wrong_classes", ValueError, r"missing \['worm'\], unexpected \['worms'\]"),
    ],
)
def test_cifar100_errors(tmp_path, setup, error, fragment):
    root = tmp_path / setup
    if setup == "empty":
        root.mkdir()
    if setup == "wrong_classes":
        write_cifar100_folders(root, [*CIFAR100_CLASSES[:-1], "worms"])
    with pytest.raises(error, match=fragment):
        load_cifar100(root)


# ---------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------


def test_dataset_registry_names():
    expected = {"cifar10", "image_folder", "cifar100", "caltech101", "oxford_pets", "flowers102", "dtd", "food101"}
    assert set(DATASET_LOADERS) == expected
    assert DATASET_LOADERS["cifar100"] is load_cifar100
    assert set(DOMAIN_DATASET_LOADERS) == {"pacs", "office_home", "vlcs"}


def test_load_dataset_split_dataset(tmp_path):
    image_dir = tmp_path / "dtd" / "images" / "banded"
    image_dir.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(image_dir / "banded_0001.jpg")
    split = {"train": [["banded/banded_0001.jpg", 0, "banded"]], "test": [["banded/banded_0001.jpg", 0, "banded"]]}
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    data = load_dataset("dtd", tmp_path)
    assert data.prompts() == ["banded texture."]
    with pytest.raises(ValueError, match="cannot be downloaded"):
        load_dataset("dtd", tmp_path, download=True)


def write_tiny_pacs(root: Path) -> None:
    (root / "splits").mkdir(parents=True)
    for domain in PACS_DOMAINS:
        lines = {"train": [], "crossval": [], "test": []}
        for label, name in enumerate(PACS_CLASSES):
            (root / domain / name).mkdir(parents=True)
            for n in range(2):
                Image.new("RGB", (4, 4)).save(root / domain / name / f"{n}.jpg")
                line = f"{domain}/{name}/{n}.jpg {label + 1}"
                lines["train" if n == 0 else "crossval"].append(line)
                lines["test"].append(line)
        for split, split_lines in lines.items():
            (root / "splits" / f"{domain}_{split}_kfold.txt").write_text("\n".join(split_lines))


def test_load_domain_dataset_forwards_options(tmp_path):
    write_tiny_pacs(tmp_path)
    data = load_domain_dataset("pacs", tmp_path, domains=["photo"], pacs_test_split="test_kfold")
    assert data.domains == ["photo"]
    assert len(data.per_domain["photo"].test) == 14
    assert len(data.per_domain["photo"].train) == 7


@pytest.mark.parametrize(
    "name,options,fragment",
    [
        ("officehome", {}, r"Unknown domain dataset 'officehome'.*'office_home', 'pacs', 'vlcs'"),
        ("pacs", {"seed": 1}, r"Options \['seed'\] are not accepted by the 'pacs' loader"),
        ("vlcs", {"pacs_test_split": "crossval"}, r"not accepted by the 'vlcs' loader.*'test_fraction'"),
        ("office_home", {"download": True}, "cannot be downloaded"),
    ],
)
def test_load_domain_dataset_invalid(tmp_path, name, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_domain_dataset(name, tmp_path, **options)


def test_catalog_importable_from_package():
    import fl2ora.data as data_package

    assert data_package.load_domain_dataset is catalog.load_domain_dataset
    assert "cifar100" in data_package.DATASET_LOADERS
