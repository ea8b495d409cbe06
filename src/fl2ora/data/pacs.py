"""PACS (Li et al., "Deeper, Broader and Artier Domain Generalization", ICCV 2017) with its k-fold lists.

Layout: ``<root>/<domain>/<class>/<file>`` with domains ``art_painting``, ``cartoon``, ``photo`` and
``sketch``, and the official lists ``<root>/splits/<domain>_{train,crossval,test}_kfold.txt``, one
``<domain>/<class>/<file> <label>`` a line with 1-based labels. The lists may also sit directly in
``<root>`` and the images under ``<root>/kfold/``. The layout is also accepted under ``<root>/pacs/``,
under the only subfolder of ``<root>``, or as a ``.tar.gz`` archive.

In the official lists ``train`` and ``crossval`` are disjoint and together cover the domain, while
``test`` lists every image of the domain. The in-domain test split is therefore ``crossval`` by default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from fl2ora.data.coop_splits import find_listed_images
from fl2ora.data.datasets import DEFAULT_TEMPLATE, ImageClassificationData, ImageSamples, _resolve_archive
from fl2ora.data.domains import DomainData, _candidate_roots, _check_download, _select_domains

logger = logging.getLogger(__name__)

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
PacsTestSplit = Literal["crossval", "test_kfold"]


def _find_pacs_dirs(candidates: Sequence[Path]) -> tuple[Path, Path] | None:
    """Return (image root, list folder) of the first candidate that has both, else None."""
    for candidate in candidates:
        list_dirs = [d for d in (candidate / "splits", candidate) if any(d.glob("*_train_kfold.txt"))]
        image_roots = [d for d in (candidate, candidate / "kfold") if any((d / x).is_dir() for x in PACS_DOMAINS)]
        if list_dirs and image_roots:
            return image_roots[0], list_dirs[0]
    return None


def _read_pacs_list(path: Path) -> list[tuple[str, int]]:
    """Read ``<relative path> <1-based label>`` lines, returning (path, 0-based label) pairs."""
    if not path.is_file():
        raise FileNotFoundError(
            f"PACS list not found: {path}. Expected <root>/splits/<domain>_{{train,crossval,test}}_kfold.txt "
            "from the official PACS k-fold split."
        )
    pairs: list[tuple[str, int]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        relpath = fields[0].lstrip("/") if fields else ""
        if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) < 1 or ".." in PurePosixPath(relpath).parts:
            raise ValueError(
                f"{path}, line {number}: {line!r}. Each line must be '<domain>/<class>/<file> <label>' with "
                "a relative path and a 1-based integer label."
            )
        pairs.append((relpath, int(fields[1]) - 1))
    return pairs


def _pacs_classnames(lists: Mapping[Path, list[tuple[str, int]]]) -> list[str]:
    """Name each label by the class folder of its images, checking that every list agrees."""
    names: dict[int, str] = {}
    for path, pairs in lists.items():
        for relpath, label in pairs:
            folder = PurePosixPath(relpath).parent.name
            known = names.setdefault(label, folder)
            if known != folder:
                raise ValueError(
                    f"{path}: label {label + 1} is used for class folders {known!r} and {folder!r}. "
                    "Each label must name one class."
                )
    if sorted(names) != list(range(len(names))):
        raise ValueError(
            f"PACS labels must be 1..C with every id used, got {sorted(label + 1 for label in names)} in "
            f"{[str(p) for p in lists]}."
        )
    return [names[label] for label in range(len(names))]


def _listed_samples(
    image_root: Path, pairs: list[tuple[str, int]], listing: Path, skip_missing: bool, classnames: Sequence[str]
) -> ImageSamples:
    found = find_listed_images(image_root, [relpath for relpath, _ in pairs], str(listing), skip_missing)
    present = [pair for pair, ok in zip(pairs, found) if ok]
    emptied = sorted({label for _, label in pairs} - {label for _, label in present})
    if emptied:
        raise ValueError(
            f"Classes {[classnames[label] for label in emptied]} listed in {listing} have no images under "
            f"{image_root}. Restore their images."
        )
    return ImageSamples(
        [image_root / relpath for relpath, _ in present], np.asarray([label for _, label in present], dtype=np.int64)
    )


def load_pacs(
    root: str | Path,
    domains: Sequence[str] | None = None,
    pacs_test_split: PacsTestSplit = "crossval",
    skip_missing: bool = False,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> DomainData:
    """Load PACS with the official k-fold lists: train on ``train_kfold``, test on a held-out list.

    Args:
        root: PACS folder, its parent, or a ``.tar.gz`` archive (see the module docstring).
        domains: domains to load, in any order; None loads all four.
        pacs_test_split: list used as each domain's test split. ``"crossval"`` (default) is the
            held-out list (about 10% of the domain), disjoint from ``train_kfold``. ``"test_kfold"`` reproduces
            the reference code and keeps ``crossval`` as val.
        skip_missing: leave out listed images that do not exist (logged) instead of raising.
        download: must be False, because PACS is not downloaded.
        cache_dir: where archives are unpacked; defaults to ``$FL2ORA_CACHE`` or ``~/.cache/fl2ora``.

    Returns:
        The domains in the order art_painting, cartoon, photo, sketch (those requested), with
        class ids from the lists' labels minus 1 (dog, elephant, giraffe, guitar, horse, house,
        person in the official lists).

    Raises:
        FileNotFoundError: if ``root``, the image folders, a list or a listed image is missing.
        ValueError: if ``pacs_test_split`` or ``domains`` is invalid, ``download`` is True, or a list
            is malformed.
    """
    _check_download("PACS", download)
    if pacs_test_split not in ("crossval", "test_kfold"):
        raise ValueError(f"pacs_test_split must be 'crossval' or 'test_kfold', got {pacs_test_split!r}.")
    selected = _select_domains("PACS", PACS_DOMAINS, domains)
    layout = (
        "Expected <root>/<domain>/<class>/<image> for domains art_painting, cartoon, photo and sketch, and "
        "<root>/splits/<domain>_{train,crossval,test}_kfold.txt (also accepted under <root>/pacs/), "
        "or a .tar.gz archive of that folder."
    )
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"PACS root not found: {root_path}. {layout}")
    candidates = _candidate_roots(_resolve_archive(root_path, cache_dir), ("pacs", "PACS"))
    found_dirs = _find_pacs_dirs(candidates)
    if found_dirs is None:
        searched = [str(p) for p in candidates] or [str(root_path)]
        raise FileNotFoundError(f"No PACS images and k-fold lists found in any of {searched}. {layout}")
    image_root, list_dir = found_dirs

    if pacs_test_split == "test_kfold":
        # NOTE: <domain>_test_kfold.txt lists every image of the domain, train_kfold included, so this
        # test split scores training images. It exists only to reproduce the reference code's numbers.
        logger.warning(
            "PACS is tested on test_kfold, which contains every train_kfold image, so test scores include "
            "training images"
        )
    list_names = {"train": "train", "test": pacs_test_split.removesuffix("_kfold")}
    if pacs_test_split == "test_kfold":
        list_names["val"] = "crossval"
    lists = {
        (domain, split): list_dir / f"{domain}_{name}_kfold.txt"
        for domain in selected
        for split, name in list_names.items()
    }
    entries = {key: _read_pacs_list(path) for key, path in lists.items()}
    classnames = _pacs_classnames({lists[key]: pairs for key, pairs in entries.items()})

    per_domain: dict[str, ImageClassificationData] = {}
    for domain in selected:
        samples = {
            split: _listed_samples(image_root, entries[domain, split], lists[domain, split], skip_missing, classnames)
            for split in list_names
        }
        per_domain[domain] = ImageClassificationData(
            samples["train"], samples["test"], classnames, DEFAULT_TEMPLATE, f"pacs/{domain}", samples.get("val")
        )
        logger.info(
            "Loaded PACS %s: %d train and %d test (%s) images",
            domain, len(samples["train"]), len(samples["test"]), pacs_test_split,
        )
    return DomainData(selected, per_domain, classnames, DEFAULT_TEMPLATE, "pacs")
