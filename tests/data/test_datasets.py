"""Tests for fl2ora.data.datasets and fl2ora.data.archive on generated fixtures and the real archive."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl2ora.data import archive as archive_module
from fl2ora.data.archive import COMPLETE_MARKER, extract_archive
from fl2ora.data.datasets import (
    CIFAR10_CLASSES,
    ImageClassificationData,
    ImageSamples,
    load_cifar10,
    load_dataset,
    load_image_folder,
    subsample_per_class,
)

REAL_CIFAR10 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10.tar.gz"


def class_color(label: int) -> tuple[int, int, int]:
    return (10 * label + 5, 255 - 20 * label, (37 * label) % 256)


def write_image_folders(
    root: Path, classes: list[str], train_per_class: int = 3, test_per_class: int = 2, size: int = 8
) -> None:
    """Write root/{train,test}/<class>/<i>.png, each image one constant color per class (lossless)."""
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (size, size), class_color(label)).save(folder / f"{i:04d}.png")


def make_tar(path: Path, source: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return path


# ---------------------------------------------------------------------------------------------------
# ImageSamples and subsampling
# ---------------------------------------------------------------------------------------------------


def test_image_samples_from_arrays():
    arrays = [np.full((4, 5, 3), value, dtype=np.uint8) for value in (0, 128, 255)]
    samples = ImageSamples(arrays, [2, 0, 1])
    image, label = samples[1]
    assert label == 0
    assert image.shape == (3, 4, 5)
    torch.testing.assert_close(image, torch.full((3, 4, 5), 128 / 255))
    assert samples.labels.dtype == np.int64


def test_image_samples_grayscale_file_becomes_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (6, 6), 77).save(path)
    image, _ = ImageSamples([path], [0])[0]
    assert image.shape == (3, 6, 6)
    torch.testing.assert_close(image, torch.full((3, 6, 6), 77 / 255))


def test_image_samples_subset_shares_sources():
    arrays = [np.full((2, 2, 3), value, dtype=np.uint8) for value in range(5)]
    samples = ImageSamples(arrays, [0, 1, 2, 3, 4])
    part = samples.subset(np.array([4, 1]))
    assert len(part) == 2
    assert part.sources[0] is samples.sources[4]
    np.testing.assert_array_equal(part.labels, [4, 1])
    assert part[0][1] == 4


def test_image_samples_with_transform():
    samples = ImageSamples([np.zeros((3, 3, 3), dtype=np.uint8)], [0])
    sized = samples.with_transform(lambda image: torch.tensor(image.size))
    assert samples.transform is None
    assert torch.equal(sized[0][0], torch.tensor([3, 3]))
    assert sized.sources[0] is samples.sources[0]


@pytest.mark.parametrize(
    "sources,labels,fragment",
    [
        ([np.zeros((2, 2, 3), np.uint8)], [0, 1], "one label per image"),
        ([np.zeros((2, 2, 3), np.uint8)], [[0]], "1-D array of integer class ids"),
        ([np.zeros((2, 2, 3), np.uint8)], [0.5], "1-D array of integer class ids"),
    ],
)
def test_image_samples_invalid(sources, labels, fragment):
    with pytest.raises(ValueError, match=fragment):
        ImageSamples(sources, labels)


@pytest.mark.parametrize("indices", [[0, 3], [-1], [[0]], [0.5]])
def test_image_samples_subset_invalid(indices):
    samples = ImageSamples([np.zeros((2, 2, 3), np.uint8)] * 3, [0, 1, 2])
    with pytest.raises(ValueError, match="indices must"):
        samples.subset(indices)


def test_subsample_per_class_counts():
    labels = np.array([0] * 7 + [1] * 2 + [2] * 5 + [0] * 3)
    chosen = subsample_per_class(labels, max_per_class=4, seed=0)
    counts = np.bincount(labels[chosen], minlength=3)
    np.testing.assert_array_equal(counts, [4, 2, 4])
    assert np.all(np.diff(chosen) > 0)
    assert chosen.dtype == np.int64


def test_subsample_per_class_deterministic():
    labels = np.repeat(np.arange(4), 50)
    first = subsample_per_class(labels, 10, seed=1)
    np.testing.assert_array_equal(first, subsample_per_class(labels, 10, seed=1))
    assert not np.array_equal(first, subsample_per_class(labels, 10, seed=2))


@pytest.mark.parametrize("max_per_class", [0, -1, 2.5, True])
def test_subsample_per_class_invalid(max_per_class):
    with pytest.raises(ValueError, match="max_per_class must be a positive int"):
        subsample_per_class(np.arange(3), max_per_class)


def test_data_subsample_and_prompts():
    arrays = [np.zeros((2, 2, 3), np.uint8)] * 6
    data = ImageClassificationData(
        ImageSamples(arrays, [0, 0, 0, 1, 1, 1]), ImageSamples(arrays[:2], [0, 1]), ["cat", "sea lion"],
        "a photo of a {}.", "toy",
    )
    small = data.subsample(max_train_per_class=2, max_test_per_class=None, seed=0)
    np.testing.assert_array_equal(np.bincount(small.train.labels), [2, 2])
    assert len(small.test) == 2
    assert data.prompts() == ["a photo of a cat.", "a photo of a sea lion."]
    assert data.num_classes == 2


@pytest.mark.parametrize(
    "template,classnames,fragment",
    [
        ("a photo", ["a", "b"], "exactly one"),
        ("{} and {}", ["a", "b"], "exactly one"),
        ("a photo of a {}.", ["a"], "only 1 class names"),
    ],
)
def test_data_invalid(template, classnames, fragment):
    samples = ImageSamples([np.zeros((2, 2, 3), np.uint8)] * 2, [0, 1])
    with pytest.raises(ValueError, match=fragment):
        ImageClassificationData(samples, samples, classnames, template, "toy")


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------


def test_load_image_folder(tmp_path):
    classes = ["sea_lion", "apple", "zebra"]
    write_image_folders(tmp_path / "toy", classes)
    data = load_image_folder(tmp_path / "toy")
    # Sorted folders: apple, sea_lion, zebra.
    assert data.classnames == ["apple", "sea lion", "zebra"]
    assert data.name == "toy"
    assert data.template == "a photo of a {}."
    assert len(data.train) == 9
    assert len(data.test) == 6
    np.testing.assert_array_equal(data.train.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])

    # Label 1 is "sea_lion", written with class_color(0) because it was first in `classes`.
    image, label = data.train[3]
    assert label == 1
    expected = torch.tensor(class_color(0), dtype=torch.float32).view(3, 1, 1) / 255
    torch.testing.assert_close(image, expected.expand(3, 8, 8))


def test_load_image_folder_mapping_and_template(tmp_path):
    write_image_folders(tmp_path, ["n01", "n02"])
    data = load_image_folder(tmp_path, template="art of the {}.", classnames={"n01": "goldfish"})
    assert data.classnames == ["goldfish", "n02"]
    assert data.prompts() == ["art of the goldfish.", "art of the n02."]


def test_load_image_folder_single_subfolder_and_archive(tmp_path):
    write_image_folders(tmp_path / "src" / "toy", ["a", "b"])
    via_parent = load_image_folder(tmp_path / "src")
    assert via_parent.name == "toy"
    archive = make_tar(tmp_path / "toy.tar.gz", tmp_path / "src" / "toy", "toy")
    via_archive = load_image_folder(archive, cache_dir=tmp_path / "cache")
    assert len(via_archive.train) == len(via_parent.train)
    np.testing.assert_array_equal(via_archive.test.labels, via_parent.test.labels)
    assert str(via_archive.train.sources[0]).startswith(str(tmp_path / "cache"))


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "missing")

    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="No train/ and test/ folders"):
        load_image_folder(tmp_path / "flat")

    write_image_folders(tmp_path / "mismatch", ["a", "b"])
    (tmp_path / "mismatch" / "test" / "c").mkdir()
    with pytest.raises(ValueError, match=r"only in test \['c'\]"):
        load_image_folder(tmp_path / "mismatch")

    write_image_folders(tmp_path / "empty", ["a", "b"])
    for path in (tmp_path / "empty" / "train" / "b").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="No images"):
        load_image_folder(tmp_path / "empty")

    write_image_folders(tmp_path / "ok", ["a", "b"])
    with pytest.raises(ValueError, match=r"do not exist.*\['typo'\]"):
        load_image_folder(tmp_path / "ok", classnames={"typo": "x"})


# ---------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------


def write_fake_cifar_batches(root: Path, per_batch: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write root/cifar-10-batches-py in the CIFAR python format and return each file's (data, labels).

    data is (n, 3072) uint8, each row 1024 red, then 1024 green, then 1024 blue values, rows of 32.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
        entry = {
            "batch_label": f"fake {name}",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
        written[name] = (data, labels)
    meta = {"num_cases_per_batch": per_batch, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return written


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """Accept fake batch files: torchvision compares each file with the MD5 of the official release."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_cifar10_torchvision_layout(tmp_path, skip_cifar_md5):
    written = write_fake_cifar_batches(tmp_path)
    data = load_cifar10(tmp_path)
    assert data.classnames == list(CIFAR10_CLASSES)
    assert data.name == "cifar10"
    assert len(data.train) == 20
    assert len(data.test) == 4

    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_array_equal(data.train.labels, train_labels)
    np.testing.assert_array_equal(data.test.labels, written["test_batch"][1])

    # Sample 5 is row 1 of data_batch_2: channel-major planes of 32 x 32.
    expected = written["data_batch_2"][0][1].reshape(3, 32, 32).astype(np.float32) / 255
    image, label = data.train[5]
    assert label == written["data_batch_2"][1][1]
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(data.test.load_image(3)), written["test_batch"][0][3].reshape(3, 32, 32).transpose(1, 2, 0))

    # The batches folder itself is accepted as root.
    assert len(load_cifar10(tmp_path / "cifar-10-batches-py").train) == 20


def test_cifar10_torchvision_layout_archive(tmp_path, skip_cifar_md5):
    written = write_fake_cifar_batches(tmp_path / "src")
    archive = make_tar(tmp_path / "batches.tar.gz", tmp_path / "src", "cifar-python")
    data = load_cifar10(archive, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.test.labels, written["test_batch"][1])
    assert len(data.train) == 20


def test_cifar10_torchvision_layout_bad_checksum(tmp_path):
    write_fake_cifar_batches(tmp_path)
    with pytest.raises(ValueError, match=r"torchvision could not read CIFAR-10.*download=true"):
        load_cifar10(tmp_path)


def test_cifar10_torchvision_layout_wrong_classes(tmp_path, skip_cifar_md5):
    write_fake_cifar_batches(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle)
    with pytest.raises(ValueError, match="does not contain CIFAR-10"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("subfolder", ["", "cifar10"])
def test_cifar10_image_folders(tmp_path, subfolder):
    write_image_folders(tmp_path / "root" / subfolder, list(CIFAR10_CLASSES), train_per_class=2, test_per_class=1)
    data = load_cifar10(tmp_path / "root")
    assert data.classnames == list(CIFAR10_CLASSES)
    assert data.template == "a photo of a {}."
    np.testing.assert_array_equal(data.train.labels, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(data.test.labels, np.arange(10))
    assert Path(data.train.sources[2]).parent.name == "automobile"


def test_cifar10_archive(tmp_path):
    write_image_folders(tmp_path / "src" / "cifar10", list(CIFAR10_CLASSES), train_per_class=1, test_per_class=1)
    archive = make_tar(tmp_path / "cifar10.tar.gz", tmp_path / "src" / "cifar10", "cifar10")
    data = load_dataset("cifar10", archive, cache_dir=tmp_path / "cache")
    assert len(data.train) == 10
    np.testing.assert_array_equal(data.test.labels, np.arange(10))
    image, label = data.test[9]
    assert label == 9
    expected = torch.tensor(class_color(9), dtype=torch.float32).view(3, 1, 1) / 255
    torch.testing.assert_close(image, expected.expand(3, 8, 8))


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download=true"):
        load_cifar10(tmp_path / "missing")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"No CIFAR-10 layout found.*\.tar\.gz"):
        load_cifar10(tmp_path / "empty")

    wrong = [name for name in CIFAR10_CLASSES if name != "truck"] + ["lorry"]
    write_image_folders(tmp_path / "wrong", wrong, train_per_class=1, test_per_class=1)
    with pytest.raises(ValueError, match=r"missing \['truck'\], unexpected \['lorry'\]"):
        load_cifar10(tmp_path / "wrong")


def test_load_dataset_registry(tmp_path):
    write_image_folders(tmp_path, ["a", "b"])
    assert load_dataset("image_folder", tmp_path).classnames == ["a", "b"]
    with pytest.raises(ValueError, match=r"Unknown dataset 'cifar11'.*'cifar10'.*'image_folder'"):
        load_dataset("cifar11", tmp_path)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        load_dataset("image_folder", tmp_path, download=True)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CIFAR10.is_file(), reason=f"CIFAR-10 archive not found at {REAL_CIFAR10}")
def test_real_cifar10_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("FL2ORA_CACHE", str(tmp_path / "cache"))
    data = load_cifar10(REAL_CIFAR10)
    assert data.classnames == list(CIFAR10_CLASSES)
    assert len(data.train) == 50_000
    assert len(data.test) == 10_000
    np.testing.assert_array_equal(np.bincount(data.train.labels), [5_000] * 10)
    np.testing.assert_array_equal(np.bincount(data.test.labels), [1_000] * 10)
    for index in (0, 49_999):
        image, label = data.train[index]
        assert image.shape == (3, 32, 32)
        assert Path(data.train.sources[index]).parent.name == CIFAR10_CLASSES[label]
    assert str(data.train.sources[0]).startswith(str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------
# Archive extraction
# ---------------------------------------------------------------------------------------------------


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_extract_archive_once(tmp_path, monkeypatch):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "a.txt").write_text("hello")
    archive = make_tar(tmp_path / "pkg.tar.gz", tmp_path / "src" / "pkg", "pkg")
    monkeypatch.setenv("FL2ORA_CACHE", str(tmp_path / "cache"))

    target = extract_archive(archive)
    stat = archive.stat()
    assert target == tmp_path / "cache" / f"pkg-{stat.st_size}-{stat.st_mtime_ns}"
    assert (target / "pkg" / "a.txt").read_text() == "hello"
    assert (target / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [target.name], "no staging folder left"

    # The second call must not open the archive again.
    def fail_open(*args, **kwargs):
        raise AssertionError("archive was read again")

    monkeypatch.setattr(archive_module.tarfile, "open", fail_open)
    assert extract_archive(archive) == target


def test_extract_archive_replaces_incomplete_folder(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("new")
    archive = make_tar(tmp_path / "data.tgz", tmp_path / "src", "data")
    stat = archive.stat()
    stale = tmp_path / "cache" / f"data-{stat.st_size}-{stat.st_mtime_ns}"
    (stale / "data").mkdir(parents=True)
    (stale / "data" / "partial.txt").write_text("half")

    target = extract_archive(archive, cache_dir=tmp_path / "cache")
    assert target == stale
    assert (target / "data" / "a.txt").read_text() == "new"
    assert not (target / "data" / "partial.txt").exists()


@pytest.mark.parametrize(
    "member,fragment",
    [
        ("../evil.txt", "contains '..'"),
        ("ok/../../evil.txt", "contains '..'"),
        ("/tmp/fl2ora-evil.txt", "absolute path"),
    ],
)
def test_extract_archive_rejects_unsafe_paths(tmp_path, member, fragment):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_bytes(tar, "fine.txt")
        add_bytes(tar, member)
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ValueError, match=fragment):
        extract_archive(archive, cache_dir=cache)
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert list(cache.iterdir()) == [], "nothing may stay in the cache after a rejected archive"


def test_extract_archive_rejects_symlink(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("data/passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="is a link"):
        extract_archive(archive, cache_dir=tmp_path / "cache")


def test_extract_archive_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="Archive not found"):
        extract_archive(tmp_path / "nope.tar.gz", cache_dir=tmp_path / "cache")
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="Cannot read archive"):
        extract_archive(corrupt, cache_dir=tmp_path / "cache")
