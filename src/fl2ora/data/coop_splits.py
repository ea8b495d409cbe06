"""Datasets split by a CoOp split file: Caltech101, OxfordPets, Flowers102, DTD and Food101.

CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022) and the prompt-learning
code built on it store each dataset as an image folder plus a file ``split_zhou_<Name>.json``::

    {"train": [[relative path, label, class name], ...], "val": [...], "test": [...]}

Paths are relative to the image folder, labels are 0-based class ids and every entry repeats its class
name. The layouts, as in CoOp's ``DATASETS.md``:

==============  ==================  ========================  ==================================
dataset         CoOp folder         image folder              split file
==============  ==================  ========================  ==================================
caltech101      ``caltech-101/``    ``101_ObjectCategories``  ``split_zhou_Caltech101.json``
oxford_pets     ``oxford_pets/``    ``images``                ``split_zhou_OxfordPets.json``
flowers102      ``oxford_flowers/`` ``jpg``                   ``split_zhou_OxfordFlowers.json``
dtd             ``dtd/``            ``images``                ``split_zhou_DescribableTextures.json``
food101         ``food-101/``       ``images``                ``split_zhou_Food101.json``
==============  ==================  ========================  ==================================
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from fl2ora.data.datasets import ImageClassificationData, ImageSamples, _resolve_archive

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
_MISSING_SHOWN = 5  # missing paths quoted in an error message


@dataclass(frozen=True)
class SplitDatasetSpec:
    """File layout and prompt template of a CoOp-style dataset.

    Attributes:
        name: registry name, e.g. ``"caltech101"``.
        title: name used in messages, e.g. ``"Caltech101"``.
        dataset_dir: CoOp's folder for the dataset, e.g. ``"caltech-101"``.
        image_dir: folder inside ``dataset_dir`` that split paths are relative to.
        split_file: split file name inside ``dataset_dir``.
        template: CoOp's prompt template for the dataset.
    """

    name: str
    title: str
    dataset_dir: str
    image_dir: str
    split_file: str
    template: str


SPLIT_DATASETS: dict[str, SplitDatasetSpec] = {
    spec.name: spec
    for spec in (
        SplitDatasetSpec(
            "caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
            "split_zhou_Caltech101.json", "a photo of a {}.",
        ),
        SplitDatasetSpec(
            "oxford_pets", "OxfordPets", "oxford_pets", "images",
            "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet.",
        ),
        SplitDatasetSpec(
            "flowers102", "Flowers102", "oxford_flowers", "jpg",
            "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower.",
        ),
        SplitDatasetSpec(
            "dtd", "DTD", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.",
        ),
        SplitDatasetSpec(
            "food101", "Food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.",
        ),
    )
}


@dataclass
class SplitFile:
    """A parsed split file.

    Attributes:
        path: the file read.
        entries: split name (``"train"``, ``"val"``, ``"test"``) to its ``(relative path, label)`` pairs,
            in file order. ``"val"`` is absent when the file has no val list.
        classnames: class name of each label as written in the file, e.g. ``"car_side"``.
    """

    path: Path
    entries: dict[str, list[tuple[str, int]]]
    classnames: list[str]


def readable_classname(name: str) -> str:
    """Replace underscores by spaces, as CoOp does before filling a prompt (``"car_side"`` -> ``"car side"``)."""
    return " ".join(name.replace("_", " ").split())


def _check_relative_path(path: Path, split: str, index: int, relpath: str) -> None:
    pure = PurePosixPath(relpath.replace("\\", "/"))
    if not relpath or pure.is_absolute() or ".." in pure.parts:
        raise ValueError(
            f"{path}: {split}[{index}] has path {relpath!r}. Split paths must be relative to the image "
            "folder, non-empty and without '..'."
        )


def read_split_file(path: str | Path) -> SplitFile:
    """Read and check a ``split_zhou_<Name>.json`` file without touching the images.

    Args:
        path: the split file.

    Returns:
        The entries of each split and the class names ordered by label.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: if the file is not valid JSON, lacks ``train`` or ``test``, has an entry that is
            not ``[relative path, int label, class name]``, gives one label two class names, or its
            labels are not exactly 0..C-1.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Split file not found: {path}. Pass the path of a split_zhou_<Name>.json file.")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Split file {path} is not valid JSON: {error}.") from error
    if not isinstance(content, dict) or not {"train", "test"} <= set(content):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"Split file {path} must be a JSON object with lists 'train', 'test' and optionally 'val', "
            f"got {found}."
        )

    names_by_label: dict[int, str] = {}
    entries: dict[str, list[tuple[str, int]]] = {}
    for split in SPLIT_NAMES:
        if split not in content:
            continue
        pairs: list[tuple[str, int]] = []
        for index, entry in enumerate(content[split]):
            valid = (
                isinstance(entry, (list, tuple))
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[1], int)
                and not isinstance(entry[1], bool)
                and entry[1] >= 0
                and isinstance(entry[2], str)
            )
            if not valid:
                raise ValueError(
                    f"{path}: {split}[{index}] is {entry!r}. Each entry must be "
                    "[relative path, non-negative int label, class name]."
                )
            relpath, label, classname = entry
            _check_relative_path(path, split, index, relpath)
            known = names_by_label.setdefault(label, classname)
            if known != classname:
                raise ValueError(
                    f"{path}: label {label} is named {known!r} and, at {split}[{index}], {classname!r}. "
                    "Each label needs one class name."
                )
            pairs.append((relpath, label))
        entries[split] = pairs

    num_classes = len(names_by_label)
    if sorted(names_by_label) != list(range(num_classes)):
        absent = sorted(set(range(max(names_by_label, default=-1) + 1)) - set(names_by_label))
        raise ValueError(
            f"{path}: labels must be 0..C-1 with every id used, but ids {absent[:10]} never occur "
            f"(largest label {max(names_by_label, default=None)})."
        )
    classnames = [names_by_label[label] for label in range(num_classes)]
    return SplitFile(path=path, entries=entries, classnames=classnames)


def find_listed_images(
    image_root: Path, relpaths: Sequence[str], listing: str, skip_missing: bool = False
) -> np.ndarray:
    """Check that each listed image exists under ``image_root``.

    Args:
        image_root: folder the paths are relative to.
        relpaths: (N,) relative image paths.
        listing: the list file or split the paths come from, quoted in messages.
        skip_missing: log the number of missing images instead of raising.

    Returns:
        (N,) bool, True where ``image_root / relpath`` is a file.

    Raises:
        FileNotFoundError: if an image is missing and ``skip_missing`` is False. The message gives the
            count and the first few missing paths.
    """
    found = np.fromiter((os.path.isfile(image_root / relpath) for relpath in relpaths), dtype=bool, count=len(relpaths))
    missing = [relpaths[i] for i in np.flatnonzero(~found)]
    if missing and not skip_missing:
        first_missing = ", ".join(missing[:_MISSING_SHOWN])
        raise FileNotFoundError(
            f"{len(missing)} of {len(relpaths)} images listed in {listing} are missing under {image_root}, "
            f"e.g. {first_missing}. Each listed path must exist relative to {image_root}. Point root at the complete "
            "dataset, or pass skip_missing=True to leave the missing images out."
        )
    if missing:
        logger.warning(
            "Skipping %d of %d images listed in %s that are missing under %s (first: %s)",
            len(missing), len(relpaths), listing, image_root, missing[0],
        )
    return found


def _find_dataset_dir(folder: Path, spec: SplitDatasetSpec) -> tuple[Path | None, list[Path]]:
    """Return the folder containing ``spec.image_dir`` (or None) and the folders searched."""
    candidates = [folder, folder / spec.dataset_dir]
    if folder.name == spec.image_dir:
        candidates.insert(0, folder.parent)
    if folder.is_dir():
        subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subfolders) == 1 and subfolders[0] not in candidates:
            candidates.append(subfolders[0])
    for candidate in candidates:
        if (candidate / spec.image_dir).is_dir():
            return candidate, candidates
    return None, candidates


def load_split_dataset(
    name: str,
    root: str | Path,
    split_path: str | Path | None = None,
    skip_missing: bool = False,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageClassificationData:
    """Load a CoOp-style dataset from its image folder and split file.

    ``root`` may be the dataset folder, which contains the image folder and usually the split file. It
    may also be the folder above, containing CoOp's folder name such as ``caltech-101/``, any folder
    whose only subfolder is the dataset folder, or a ``.tar.gz`` archive of any of these.

    Args:
        name: a key of :data:`SPLIT_DATASETS`, e.g. ``"caltech101"``.
        root: dataset folder or archive.
        split_path: the split file, if it is not ``<dataset folder>/split_zhou_<Name>.json``.
        skip_missing: leave out listed images that do not exist (logged) instead of raising.
        download: must be False, because these datasets are not downloaded.
        cache_dir: where archives are unpacked; defaults to ``$FL2ORA_CACHE`` or ``~/.cache/fl2ora``.

    Returns:
        Train, val and test samples with labels from the split file, readable class names ordered by
        label (underscores replaced by spaces) and the dataset's CoOp template.

    Raises:
        FileNotFoundError: if ``root``, the image folder, the split file or a listed image is missing.
        ValueError: if ``name`` is unknown, ``download`` is True, the split file is malformed, or a
            class listed in a split has no images left after skipping missing ones.
    """
    spec = SPLIT_DATASETS.get(name)
    if spec is None:
        raise ValueError(f"Unknown split dataset {name!r}. Available: {sorted(SPLIT_DATASETS)}.")
    layout = (
        f"Expected <root>/{spec.image_dir}/<path listed in the split file> and <root>/{spec.split_file} "
        f"(also accepted under <root>/{spec.dataset_dir}/), or a .tar.gz archive of that folder."
    )
    if download:
        raise ValueError(
            f"{spec.title} cannot be downloaded. Set download=False and point root at a local copy. {layout}"
        )
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"{spec.title} root not found: {root_path}. {layout}")

    folder = _resolve_archive(root_path, cache_dir)
    dataset_dir, searched = _find_dataset_dir(folder, spec)
    if dataset_dir is None:
        raise FileNotFoundError(
            f"{spec.title} image folder {spec.image_dir}/ not found in any of "
            f"{[str(p) for p in searched]}. {layout}"
        )
    image_root = dataset_dir / spec.image_dir

    if split_path is None:
        split_file_path = dataset_dir / spec.split_file
        if not split_file_path.is_file():
            raise FileNotFoundError(
                f"{spec.title} split file not found: {split_file_path}. Put CoOp's {spec.split_file} there "
                "or pass split_path=<path of the file>."
            )
    else:
        split_file_path = Path(split_path).expanduser()
    split_file = read_split_file(split_file_path)

    # Check every listed path at once so that one error counts all missing images.
    listed = [(split, relpath, label) for split, pairs in split_file.entries.items() for relpath, label in pairs]
    found = find_listed_images(image_root, [relpath for _, relpath, _ in listed], str(split_file_path), skip_missing)

    samples: dict[str, ImageSamples] = {}
    for split in split_file.entries:
        present = [
            (relpath, label) for (entry_split, relpath, label), ok in zip(listed, found) if entry_split == split and ok
        ]
        listed_labels = {label for _, label in split_file.entries[split]}
        emptied = sorted(listed_labels - {label for _, label in present})
        if emptied:
            names = [split_file.classnames[label] for label in emptied[:_MISSING_SHOWN]]
            raise ValueError(
                f"Classes {emptied[:_MISSING_SHOWN]} ({names}) of split {split!r} in {split_file_path} have no "
                f"images under {image_root} ({len(emptied)} classes in all). Restore their images."
            )
        samples[split] = ImageSamples(
            [image_root / relpath for relpath, _ in present],
            np.asarray([label for _, label in present], dtype=np.int64),
        )

    data = ImageClassificationData(
        train=samples["train"],
        test=samples["test"],
        classnames=[readable_classname(classname) for classname in split_file.classnames],
        template=spec.template,
        name=spec.name,
        val=samples.get("val"),
    )
    logger.info(
        "Loaded %s from %s with %s: %d classes, %d train, %d val and %d test images",
        spec.title, image_root, split_file_path.name, data.num_classes, len(data.train),
        len(data.val) if data.val is not None else 0, len(data.test),
    )
    return data


def load_caltech101(
    root: str | Path,
    split_path: str | Path | None = None,
    skip_missing: bool = False,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageClassificationData:
    """Load Caltech101 from ``101_ObjectCategories/`` and ``split_zhou_Caltech101.json``.

    See :func:`load_split_dataset` for the arguments. CoOp's split uses 100 classes: it leaves out
    ``BACKGROUND_Google`` and names classes readably (folder ``Faces`` is class ``face``).
    """
    return load_split_dataset("caltech101", root, split_path, skip_missing, download, cache_dir)


def load_oxford_pets(
    root: str | Path,
    split_path: str | Path | None = None,
    skip_missing: bool = False,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageClassificationData:
    """Load OxfordPets (37 breeds) from ``images/`` and ``split_zhou_OxfordPets.json``.

    See :func:`load_split_dataset` for the arguments.
    """
    return load_split_dataset("oxford_pets", root, split_path, skip_missing, download, cache_dir)


def load_flowers102(
    root: str | Path,
    split_path: str | Path | None = None,
    skip_missing: bool = False,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageClassificationData:
    """Load Flowers102 from ``jpg/`` and ``split_zhou_OxfordFlowers.json``.

    See :func:`load_split_dataset` for the arguments.
    """
    return load_split_dataset("flowers102", root, split_path, skip_missing, download, cache_dir)


def load_dtd(
    root: str | Path,
    split_path: str | Path | None = None,
    skip_missing: bool = False,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageClassificationData:
    """Load DTD (47 textures) from ``images/`` and ``split_zhou_DescribableTextures.json``.

    See :func:`load_split_dataset` for the arguments.
    """
    return load_split_dataset("dtd", root, split_path, skip_missing, download, cache_dir)


def load_food101(
    root: str | Path,
    split_path: str | Path | None = None,
    skip_missing: bool = False,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageClassificationData:
    """Load Food101 from ``images/`` and ``split_zhou_Food101.json``.

    See :func:`load_split_dataset` for the arguments.
    """
    # NOTE: Food-101's own split lists (meta/train.txt, meta/test.txt) are not read. CoOp's split file
    # divides all images of each class 50/20/30 into train, val and test instead.
    return load_split_dataset("food101", root, split_path, skip_missing, download, cache_dir)
