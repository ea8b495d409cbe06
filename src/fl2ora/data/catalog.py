"""The study's datasets by name: CIFAR-100 and the registries of every loader.

Importing this module adds CIFAR-100 and the CoOp-style datasets of :mod:`fl2ora.data.coop_splits`
to :data:`fl2ora.data.datasets.DATASET_LOADERS`, so :func:`fl2ora.data.datasets.load_dataset` finds
them. ``import fl2ora.data`` imports it. Domain datasets return a
:class:`~fl2ora.data.domains.DomainData` instead and have their own registry,
:data:`DOMAIN_DATASET_LOADERS`, used by :func:`load_domain_dataset`.

Registry names, loaders and prompt templates (CoOp's templates for the CoOp datasets):

- ``cifar10``: :func:`fl2ora.data.datasets.load_cifar10`, ``"a photo of a {}."``
- ``cifar100``: :func:`load_cifar100`, ``"a photo of a {}."``
- ``caltech101``: :func:`fl2ora.data.coop_splits.load_caltech101`, ``"a photo of a {}."``
- ``oxford_pets``: :func:`fl2ora.data.coop_splits.load_oxford_pets`, ``"a photo of a {}, a type of pet."``
- ``flowers102``: :func:`fl2ora.data.coop_splits.load_flowers102`, ``"a photo of a {}, a type of flower."``
- ``dtd``: :func:`fl2ora.data.coop_splits.load_dtd`, ``"{} texture."``
- ``food101``: :func:`fl2ora.data.coop_splits.load_food101`, ``"a photo of {}, a type of food."``
- domain datasets ``pacs``, ``office_home`` and ``vlcs``: :func:`fl2ora.data.pacs.load_pacs`,
  :func:`fl2ora.data.domains.load_office_home` and :func:`fl2ora.data.domains.load_vlcs`, all
  ``"a photo of a {}."``
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fl2ora.data.coop_splits import (
    load_caltech101,
    load_dtd,
    load_flowers102,
    load_food101,
    load_oxford_pets,
    readable_classname,
)
from fl2ora.data.datasets import (
    DATASET_LOADERS,
    DEFAULT_TEMPLATE,
    ImageClassificationData,
    ImageSamples,
    _class_folders,
    _find_split_root,
    _read_split,
    _resolve_archive,
)
from fl2ora.data.domains import DomainData, load_office_home, load_vlcs
from fl2ora.data.pacs import load_pacs

logger = logging.getLogger(__name__)

# The fine label names of CIFAR-100 in label order, as in the meta file of cifar-100-python.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
_CIFAR100_BATCHES = "cifar-100-python"
_CIFAR100_LAYOUTS = (
    "Expected one of: (a) torchvision's layout <root>/cifar-100-python/ with train, test and meta; "
    "(b) image folders <root>/train/<class>/* and <root>/test/<class>/* named by the 100 CIFAR-100 fine "
    "labels (e.g. aquarium_fish), also accepted under <root>/cifar100/, or (c) the path of a .tar.gz "
    "archive that unpacks to (a) or (b)."
)
_CIFAR100_FIX = (
    "Pass download=True to download layout (a) with torchvision, or set root to a CIFAR-100 .tar.gz "
    "archive or to the folder it unpacks to."
)


def _load_cifar100_batches(root: Path, download: bool) -> ImageClassificationData:
    """Read torchvision's ``<root>/cifar-100-python`` with ``torchvision.datasets.CIFAR100``."""
    from torchvision.datasets import CIFAR100

    splits: dict[str, ImageSamples] = {}
    for split in ("train", "test"):
        try:
            dataset = CIFAR100(str(root), train=split == "train", download=download)
        except RuntimeError as error:
            # torchvision raises RuntimeError when a file is missing or fails its MD5 check.
            raise ValueError(
                f"torchvision could not read CIFAR-100 from {root / _CIFAR100_BATCHES}: {error}. "
                f"Delete that folder and pass download=True, or use another layout. {_CIFAR100_LAYOUTS}"
            ) from error
        if list(dataset.classes) != list(CIFAR100_CLASSES):
            raise ValueError(
                f"{root / _CIFAR100_BATCHES}/meta lists fine labels {dataset.classes[:5]}... "
                f"({len(dataset.classes)} in all), expected CIFAR-100's 100 names {list(CIFAR100_CLASSES[:5])}... "
                f"The folder does not contain CIFAR-100. {_CIFAR100_FIX}"
            )
        # dataset.data is (N, 32, 32, 3) uint8. The list contains one view per sample, without copying.
        splits[split] = ImageSamples(list(dataset.data), np.asarray(dataset.targets, dtype=np.int64))
    return ImageClassificationData(
        splits["train"], splits["test"], [readable_classname(c) for c in CIFAR100_CLASSES], DEFAULT_TEMPLATE, "cifar100"
    )


def _load_cifar100_folders(split_root: Path) -> ImageClassificationData:
    """Read ``split_root/{train,test}/<fine label>/`` with class ids in CIFAR-100's label order."""
    for split in ("train", "test"):
        folders = {p.name for p in _class_folders(split_root / split)}
        if folders != set(CIFAR100_CLASSES):
            raise ValueError(
                f"Class folders in {split_root / split} do not match CIFAR-100: missing "
                f"{sorted(set(CIFAR100_CLASSES) - folders)}, unexpected {sorted(folders - set(CIFAR100_CLASSES))}. "
                f"{_CIFAR100_LAYOUTS}"
            )
    return ImageClassificationData(
        train=_read_split(split_root / "train", CIFAR100_CLASSES),
        test=_read_split(split_root / "test", CIFAR100_CLASSES),
        classnames=[readable_classname(c) for c in CIFAR100_CLASSES],
        template=DEFAULT_TEMPLATE,
        name="cifar100",
    )


def load_cifar100(
    root: str | Path, download: bool = False, cache_dir: str | Path | None = None
) -> ImageClassificationData:
    """Load CIFAR-100 (fine labels) from torchvision's layout, image folders or an archive of either.

    Accepted ``root`` values, tried in this order:

    1. a ``.tar.gz`` (or other tar) archive, unpacked once into ``cache_dir``, whose contents are
       then searched as below;
    2. a folder containing ``cifar-100-python/`` (or that folder itself, or one subfolder holding
       it), read with ``torchvision.datasets.CIFAR100``, which checks each file's MD5;
    3. a folder containing ``train/<class>/`` and ``test/<class>/``, or ``cifar100/train`` and
       ``cifar100/test``, with the 100 fine label names as folder names;
    4. with ``download=True``, any other folder (created if missing): torchvision downloads layout 2
       into it.

    Class ids follow CIFAR-100's fine label order (alphabetical: apple, aquarium_fish, baby, ...) in
    every layout, and the readable names replace ``_`` by a space (``aquarium fish``).

    Args:
        root: dataset folder or archive path.
        download: whether torchvision may download the dataset when no local copy is found.
        cache_dir: where archives are unpacked; defaults to ``$FL2ORA_CACHE`` or ``~/.cache/fl2ora``.

    Returns:
        CIFAR-100 with 100 class names and the template ``"a photo of a {}."``.

    Raises:
        FileNotFoundError: if ``root`` does not exist and ``download`` is False.
        ValueError: if ``root`` matches no layout, the class folders differ from CIFAR-100's, or
            torchvision rejects the files.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists() and not download:
        raise FileNotFoundError(f"CIFAR-100 root not found: {root_path}. {_CIFAR100_LAYOUTS} {_CIFAR100_FIX}")
    folder = _resolve_archive(root_path, cache_dir) if root_path.exists() else root_path

    batches_parent: Path | None = None
    if folder.name == _CIFAR100_BATCHES and folder.is_dir():
        batches_parent = folder.parent
    elif (folder / _CIFAR100_BATCHES).is_dir():
        batches_parent = folder
    elif folder.is_dir():
        # One level deeper, as in an archive whose members start with <name>/cifar-100-python/.
        subfolders = [p for p in folder.iterdir() if p.is_dir() and (p / _CIFAR100_BATCHES).is_dir()]
        batches_parent = subfolders[0] if len(subfolders) == 1 else None

    if batches_parent is not None:
        data = _load_cifar100_batches(batches_parent, download)
        source = batches_parent / _CIFAR100_BATCHES
    else:
        split_root = _find_split_root(folder, preferred_subfolder="cifar100") if folder.is_dir() else None
        if split_root is not None:
            data = _load_cifar100_folders(split_root)
            source = split_root
        elif download:
            logger.info("No local CIFAR-100 found in %s, so torchvision downloads it", folder)
            data = _load_cifar100_batches(folder, download=True)
            source = folder / _CIFAR100_BATCHES
        else:
            raise ValueError(f"No CIFAR-100 layout found in {root_path}. {_CIFAR100_LAYOUTS} {_CIFAR100_FIX}")

    logger.info("Loaded CIFAR-100 from %s: %d train and %d test images", source, len(data.train), len(data.test))
    return data


# ---------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------

CATALOG_LOADERS: dict[str, Callable[..., ImageClassificationData]] = {
    "cifar100": load_cifar100,
    "caltech101": load_caltech101,
    "oxford_pets": load_oxford_pets,
    "flowers102": load_flowers102,
    "dtd": load_dtd,
    "food101": load_food101,
}
# Registered here rather than in datasets.py, because these loaders import datasets.py.
DATASET_LOADERS.update(CATALOG_LOADERS)

DOMAIN_DATASET_LOADERS: dict[str, Callable[..., DomainData]] = {
    "pacs": load_pacs,
    "office_home": load_office_home,
    "vlcs": load_vlcs,
}


def load_domain_dataset(
    name: str,
    root: str | Path,
    download: bool = False,
    cache_dir: str | Path | None = None,
    **options: Any,
) -> DomainData:
    """Load a domain dataset by its registered name.

    Args:
        name: one of ``"pacs"``, ``"office_home"`` and ``"vlcs"`` (see :data:`DOMAIN_DATASET_LOADERS`).
        root: dataset folder or archive path.
        download: must be False, because none of these datasets is downloaded.
        cache_dir: where archives are unpacked; defaults to ``$FL2ORA_CACHE`` or ``~/.cache/fl2ora``.
        **options: passed to the loader, e.g. ``domains``, ``seed``, ``test_fraction`` or
            ``pacs_test_split``.

    Returns:
        The loaded :class:`~fl2ora.data.domains.DomainData`.

    Raises:
        ValueError: if ``name`` is not registered, an option is not accepted by its loader, or as
            raised by the loader.
        FileNotFoundError: as raised by the loader.
    """
    loader = DOMAIN_DATASET_LOADERS.get(name)
    if loader is None:
        raise ValueError(f"Unknown domain dataset {name!r}. Available: {sorted(DOMAIN_DATASET_LOADERS)}.")
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("root", "download", "cache_dir")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"Options {unknown} are not accepted by the {name!r} loader. Accepted: {accepted}.")
    return loader(root, download=download, cache_dir=cache_dir, **options)
