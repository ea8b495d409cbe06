"""Image classification datasets: samples, class names, the prompt template and their loaders.

A loader returns an :class:`ImageClassificationData` with a train and a test :class:`ImageSamples`.
Supported sources:

- ``cifar10``: torchvision's ``cifar-10-batches-py`` folder, image folders
  ``<root>/{train,test}/<class>/*.jpg``, or a ``.tar.gz`` archive of either.
- ``image_folder``: any ``<root>/{train,test}/<class>/*`` tree, or a ``.tar.gz`` archive of one.

Archives are unpacked once into a cache folder by :func:`fl2ora.data.archive.extract_archive`.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from fl2ora.data.archive import extract_archive, is_archive

logger = logging.getLogger(__name__)

ImageSource = str | Path | np.ndarray
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATE = "a photo of a {}."
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_CIFAR10_BATCHES = "cifar-10-batches-py"
_CIFAR10_LAYOUTS = (
    "Expected one of: (a) torchvision's layout <root>/cifar-10-batches-py/ with data_batch_1..5, "
    "test_batch and batches.meta; (b) image folders <root>/train/<class>/*.jpg and "
    "<root>/test/<class>/*.jpg with the 10 CIFAR-10 class names, also accepted under <root>/cifar10/, "
    "or (c) the path of a .tar.gz archive that unpacks to (a) or (b)."
)
_CIFAR10_FIX = (
    "Pass data.download=true to download layout (a) with torchvision, or set data.root to a CIFAR-10 "
    ".tar.gz archive or to the folder it unpacks to."
)


class ImageSamples(Dataset):
    """Labelled images, each read from a file or a uint8 array when it is indexed.

    Attributes:
        sources: one entry per sample, a file path or a (H, W, 3) uint8 RGB array.
        labels: (N,) int64 class ids.
        transform: callable from an RGB PIL image to a tensor. Without one, ``__getitem__``
            returns ``torchvision.transforms.functional.to_tensor`` of the image: (3, H, W) float in
            [0, 1].
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        labels: Sequence[int] | np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(
                f"labels must be a 1-D array of integer class ids, got shape {labels.shape} dtype {labels.dtype}."
            )
        if len(sources) != len(labels):
            raise ValueError(f"Got {len(sources)} image sources but {len(labels)} labels. Pass one label per image.")
        self.sources: list[ImageSource] = list(sources)
        self.labels: np.ndarray = labels.astype(np.int64, copy=False)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def load_image(self, index: int) -> Image.Image:
        """Open sample ``index`` as an RGB PIL image."""
        source = self.sources[index]
        if isinstance(source, np.ndarray):
            return Image.fromarray(source).convert("RGB")
        with Image.open(source) as image:
            return image.convert("RGB")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(index)
        tensor = self.transform(image) if self.transform is not None else TF.to_tensor(image)
        return tensor, int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSamples:
        """Return the samples at ``indices`` (in that order), sharing sources and the transform.

        Raises:
            ValueError: if ``indices`` is not 1-D integer or an index is out of range.
        """
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} dtype {indices.dtype}.")
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise ValueError(
                f"indices must lie in [0, {len(self)}), got min {indices.min()} and max {indices.max()}."
            )
        return ImageSamples([self.sources[i] for i in indices], self.labels[indices], self.transform)

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor] | None) -> ImageSamples:
        """Return the same samples with another transform."""
        return ImageSamples(self.sources, self.labels, transform)


@dataclass
class ImageClassificationData:
    """A dataset's train and test samples, readable class names and prompt template.

    Attributes:
        train: training samples.
        test: test samples.
        classnames: readable name of each class id, as written into prompts (e.g. ``"automobile"``).
        template: prompt with exactly one ``{}`` for the class name, e.g. ``"a photo of a {}."``.
        name: dataset name, e.g. ``"cifar10"``.
        val: validation samples, or None when the dataset has no val split.
    """

    train: ImageSamples
    test: ImageSamples
    classnames: list[str]
    template: str
    name: str
    val: ImageSamples | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise ValueError(
                f"template must contain exactly one '{{}}' for the class name, got {self.template!r}. "
                f"Example: {DEFAULT_TEMPLATE!r}."
            )
        for split, samples in (("train", self.train), ("test", self.test), ("val", self.val)):
            if samples is not None and len(samples) and samples.labels.max() >= len(self.classnames):
                raise ValueError(
                    f"{split} labels go up to {samples.labels.max()} but only {len(self.classnames)} class "
                    "names were given. Pass one name per class id."
                )

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classnames)

    def prompts(self) -> list[str]:
        """Return the template filled with each class name, in class-id order."""
        return [self.template.format(name) for name in self.classnames]

    def subsample(
        self, max_train_per_class: int | None, max_test_per_class: int | None, seed: int = 0
    ) -> ImageClassificationData:
        """Return a copy keeping at most the given number of samples per class in each split.

        See :func:`subsample_per_class`. None keeps a split whole. The val split is kept whole.
        """
        train, test = self.train, self.test
        if max_train_per_class is not None:
            train = train.subset(subsample_per_class(train.labels, max_train_per_class, seed))
        if max_test_per_class is not None:
            test = test.subset(subsample_per_class(test.labels, max_test_per_class, seed))
        return ImageClassificationData(train, test, list(self.classnames), self.template, self.name, self.val)


def subsample_per_class(labels: np.ndarray | Sequence[int], max_per_class: int, seed: int = 0) -> np.ndarray:
    """Choose at most ``max_per_class`` random samples of each class.

    Classes are visited in increasing id order with one ``numpy.random.default_rng(seed)``, so the
    choice depends only on the labels, ``max_per_class`` and ``seed``. The result is sorted, so the
    kept samples stay in dataset order.

    Args:
        labels: (N,) int class ids.
        max_per_class: maximum samples kept per class, >= 1. A class with fewer keeps all of them.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        (M,) int64 sorted indices into ``labels``.

    Raises:
        ValueError: if ``max_per_class`` is not a positive int or ``labels`` is not 1-D integer.

    Example:
        >>> subsample_per_class([0, 0, 0, 1, 2, 2], max_per_class=5).tolist()
        [0, 1, 2, 3, 4, 5]
        >>> len(subsample_per_class([0, 0, 0, 1, 2, 2], max_per_class=1))
        3
    """
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, numbers.Integral) or max_per_class < 1:
        raise ValueError(
            f"max_per_class must be a positive int, got {max_per_class!r}. Leave the setting unset to keep every sample."
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}.")

    rng = np.random.default_rng(seed)
    chosen_per_class: list[np.ndarray] = []
    for class_id in np.unique(labels):
        members = np.flatnonzero(labels == class_id)
        if len(members) > max_per_class:
            members = rng.choice(members, size=max_per_class, replace=False)
        chosen_per_class.append(members)
    if not chosen_per_class:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen_per_class)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------


def _resolve_archive(root: str | Path, cache_dir: str | Path | None) -> Path:
    """Unpack ``root`` into the cache if it is an archive file, and return the folder to search."""
    root = Path(root).expanduser()
    if root.is_file() and is_archive(root):
        return extract_archive(root, cache_dir)
    return root


def _has_splits(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _find_split_root(root: Path, preferred_subfolder: str | None = None) -> Path | None:
    """Return the folder containing ``train/`` and ``test/``: ``root``, a preferred or sole subfolder, or None."""
    if _has_splits(root):
        return root
    if preferred_subfolder is not None and _has_splits(root / preferred_subfolder):
        return root / preferred_subfolder
    subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    if len(subfolders) == 1 and _has_splits(subfolders[0]):
        return subfolders[0]
    return None


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _list_images(class_dir: Path) -> list[Path]:
    return sorted(
        (p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )


def _read_split(split_dir: Path, folder_names: Sequence[str]) -> ImageSamples:
    """Collect the images of ``split_dir/<folder>/`` with label = position of the folder in ``folder_names``."""
    sources: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folder_names):
        images = _list_images(split_dir / folder)
        if not images:
            raise ValueError(
                f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {split_dir / folder}. "
                "Every class folder needs at least one image."
            )
        sources.extend(images)
        labels.extend([label] * len(images))
    return ImageSamples(sources, np.asarray(labels, dtype=np.int64))


def load_image_folder(
    root: str | Path,
    template: str = DEFAULT_TEMPLATE,
    classnames: Mapping[str, str] | None = None,
    name: str | None = None,
    cache_dir: str | Path | None = None,
) -> ImageClassificationData:
    """Load a ``<root>/{train,test}/<class>/<image>`` tree.

    Class ids follow the sorted folder names, which must be the same in ``train`` and ``test``. The
    readable name of a class is ``classnames[folder]`` if given, else the folder name with ``_``
    replaced by a space. ``root`` may also be a folder whose only subfolder contains ``train`` and
    ``test``, or a ``.tar.gz`` archive of such a tree.

    Args:
        root: dataset folder or archive.
        template: prompt with one ``{}`` for the class name.
        classnames: optional map from folder name to readable class name.
        name: dataset name; defaults to the name of the folder containing ``train`` and ``test``.
        cache_dir: where archives are unpacked; defaults to ``$FL2ORA_CACHE`` or ``~/.cache/fl2ora``.

    Returns:
        The loaded :class:`ImageClassificationData`.

    Raises:
        FileNotFoundError: if ``root`` does not exist.
        ValueError: if the layout is malformed, a class folder is empty, or ``classnames`` names a
            folder that does not exist.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(
            f"Dataset root not found: {root_path}. Expected <root>/train/<class>/* and <root>/test/<class>/*, "
            "or a .tar.gz archive of that tree."
        )
    split_root = _find_split_root(_resolve_archive(root_path, cache_dir))
    if split_root is None:
        raise ValueError(
            f"No train/ and test/ folders found in {root_path}. Expected <root>/train/<class>/* and "
            "<root>/test/<class>/* (or the same under a single subfolder of <root>, or a .tar.gz archive)."
        )

    train_folders = [p.name for p in _class_folders(split_root / "train")]
    test_folders = [p.name for p in _class_folders(split_root / "test")]
    if not train_folders:
        raise ValueError(f"No class folders found in {split_root / 'train'}. Expected train/<class>/<image>.")
    if train_folders != test_folders:
        only_train = sorted(set(train_folders) - set(test_folders))
        only_test = sorted(set(test_folders) - set(train_folders))
        raise ValueError(
            f"Class folders differ between {split_root / 'train'} and {split_root / 'test'}: only in train "
            f"{only_train}, only in test {only_test}. Both splits need the same class folders."
        )

    mapping = dict(classnames or {})
    unknown = sorted(set(mapping) - set(train_folders))
    if unknown:
        raise ValueError(
            f"classnames names folders that do not exist in {split_root / 'train'}: {unknown}. "
            f"Available folders: {train_folders}."
        )
    readable = [mapping.get(folder, folder.replace("_", " ")) for folder in train_folders]

    data = ImageClassificationData(
        train=_read_split(split_root / "train", train_folders),
        test=_read_split(split_root / "test", train_folders),
        classnames=readable,
        template=template,
        name=name if name is not None else split_root.name,
    )
    logger.info(
        "Loaded image folders %s: %d classes, %d train and %d test images",
        split_root, data.num_classes, len(data.train), len(data.test),
    )
    return data


# ---------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------


def _load_cifar10_batches(root: Path, download: bool) -> ImageClassificationData:
    """Read torchvision's ``<root>/cifar-10-batches-py`` with ``torchvision.datasets.CIFAR10``."""
    from torchvision.datasets import CIFAR10

    splits: dict[str, ImageSamples] = {}
    for split in ("train", "test"):
        try:
            dataset = CIFAR10(str(root), train=split == "train", download=download)
        except RuntimeError as error:
            # torchvision raises RuntimeError when a batch file is missing or fails its MD5 check.
            raise ValueError(
                f"torchvision could not read CIFAR-10 from {root / _CIFAR10_BATCHES}: {error}. "
                f"Delete that folder and pass data.download=true, or use another layout. {_CIFAR10_LAYOUTS}"
            ) from error
        if list(dataset.classes) != list(CIFAR10_CLASSES):
            raise ValueError(
                f"{root / _CIFAR10_BATCHES}/batches.meta lists classes {dataset.classes}, expected "
                f"{list(CIFAR10_CLASSES)}. The folder does not contain CIFAR-10. {_CIFAR10_FIX}"
            )
        # dataset.data is (N, 32, 32, 3) uint8. The list holds one view per sample, without copying.
        splits[split] = ImageSamples(list(dataset.data), np.asarray(dataset.targets, dtype=np.int64))
    return ImageClassificationData(
        splits["train"], splits["test"], list(CIFAR10_CLASSES), DEFAULT_TEMPLATE, "cifar10"
    )


def _load_cifar10_folders(split_root: Path) -> ImageClassificationData:
    """Read ``split_root/{train,test}/<class>/`` with class ids in CIFAR-10's standard order."""
    for split in ("train", "test"):
        folders = {p.name for p in _class_folders(split_root / split)}
        if folders != set(CIFAR10_CLASSES):
            raise ValueError(
                f"Class folders in {split_root / split} do not match CIFAR-10: missing "
                f"{sorted(set(CIFAR10_CLASSES) - folders)}, unexpected {sorted(folders - set(CIFAR10_CLASSES))}. "
                f"{_CIFAR10_LAYOUTS}"
            )
    return ImageClassificationData(
        train=_read_split(split_root / "train", CIFAR10_CLASSES),
        test=_read_split(split_root / "test", CIFAR10_CLASSES),
        classnames=list(CIFAR10_CLASSES),
        template=DEFAULT_TEMPLATE,
        name="cifar10",
    )


def load_cifar10(
    root: str | Path, download: bool = False, cache_dir: str | Path | None = None
) -> ImageClassificationData:
    """Load CIFAR-10 from torchvision's layout, image folders or an archive of either.

    Accepted ``root`` values, tried in this order:

    1. a ``.tar.gz`` (or other tar) archive, unpacked once into ``cache_dir``, whose contents are
       then searched as below;
    2. a folder containing ``cifar-10-batches-py/`` (or that folder itself), read with
       ``torchvision.datasets.CIFAR10``, which checks each file's MD5;
    3. a folder containing ``train/<class>/`` and ``test/<class>/``, or ``cifar10/train`` and
       ``cifar10/test``, with the 10 CIFAR-10 class folder names;
    4. with ``download=True``, any other folder (created if missing): torchvision downloads layout 2
       into it.

    Class ids follow CIFAR-10's standard order (airplane, automobile, bird, cat, deer, dog, frog,
    horse, ship, truck) in every layout.

    Args:
        root: dataset folder or archive path.
        download: whether torchvision may download the dataset when no local copy is found.
        cache_dir: where archives are unpacked; defaults to ``$FL2ORA_CACHE`` or ``~/.cache/fl2ora``.

    Returns:
        CIFAR-10 with 10 class names and the template ``"a photo of a {}."``.

    Raises:
        FileNotFoundError: if ``root`` does not exist and ``download`` is False.
        ValueError: if ``root`` matches no layout, the class folders differ from CIFAR-10's, or
            torchvision rejects the batch files.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists() and not download:
        raise FileNotFoundError(f"CIFAR-10 root not found: {root_path}. {_CIFAR10_LAYOUTS} {_CIFAR10_FIX}")
    folder = _resolve_archive(root_path, cache_dir) if root_path.exists() else root_path

    batches_parent: Path | None = None
    if folder.name == _CIFAR10_BATCHES and folder.is_dir():
        batches_parent = folder.parent
    elif (folder / _CIFAR10_BATCHES).is_dir():
        batches_parent = folder
    elif folder.is_dir():
        # One level deeper, as in an archive whose members start with <name>/cifar-10-batches-py/.
        subfolders = [p for p in folder.iterdir() if p.is_dir() and (p / _CIFAR10_BATCHES).is_dir()]
        batches_parent = subfolders[0] if len(subfolders) == 1 else None

    if batches_parent is not None:
        data = _load_cifar10_batches(batches_parent, download)
        source = batches_parent / _CIFAR10_BATCHES
    else:
        split_root = _find_split_root(folder, preferred_subfolder="cifar10") if folder.is_dir() else None
        if split_root is not None:
            data = _load_cifar10_folders(split_root)
            source = split_root
        elif download:
            logger.info("No local CIFAR-10 found in %s, so torchvision downloads it", folder)
            data = _load_cifar10_batches(folder, download=True)
            source = folder / _CIFAR10_BATCHES
        else:
            raise ValueError(f"No CIFAR-10 layout found in {root_path}. {_CIFAR10_LAYOUTS} {_CIFAR10_FIX}")

    logger.info("Loaded CIFAR-10 from %s: %d train and %d test images", source, len(data.train), len(data.test))
    return data


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def _load_image_folder_entry(
    root: str | Path, download: bool = False, cache_dir: str | Path | None = None
) -> ImageClassificationData:
    if download:
        raise ValueError(
            "Dataset 'image_folder' cannot be downloaded. Set data.download=false and point data.root at "
            "a local <root>/{train,test}/<class>/ tree."
        )
    return load_image_folder(root, cache_dir=cache_dir)


# fl2ora.data.catalog adds cifar100, caltech101, oxford_pets, flowers102, dtd and food101 when it is
# imported, which ``import fl2ora.data`` does. Its loaders import this module, so they cannot be listed here.
DATASET_LOADERS: dict[str, Callable[..., ImageClassificationData]] = {
    "cifar10": load_cifar10,
    "image_folder": _load_image_folder_entry,
}


def load_dataset(
    name: str, root: str | Path, download: bool = False, cache_dir: str | Path | None = None
) -> ImageClassificationData:
    """Load a dataset by its registered name.

    Args:
        name: a key of :data:`DATASET_LOADERS`: ``"cifar10"``, ``"image_folder"`` or a dataset that
            :mod:`fl2ora.data.catalog` registers, such as ``"cifar100"`` or ``"caltech101"``.
        root: dataset folder or archive path.
        download: whether the loader may download missing data (only ``"cifar10"`` and ``"cifar100"`` can).
        cache_dir: where archives are unpacked; defaults to ``$FL2ORA_CACHE`` or ``~/.cache/fl2ora``.

    Returns:
        The loaded :class:`ImageClassificationData`.

    Raises:
        ValueError: if ``name`` is not registered, or as raised by the loader.
        FileNotFoundError: as raised by the loader.
    """
    loader: Any = DATASET_LOADERS.get(name)
    if loader is None:
        raise ValueError(f"Unknown dataset {name!r}. Available: {sorted(DATASET_LOADERS)}.")
    return loader(root, download=download, cache_dir=cache_dir)
