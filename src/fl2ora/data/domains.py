"""Domain-shift datasets as one train and test split per domain: the shared container, OfficeHome and VLCS.

Each loader returns a :class:`DomainData` whose ``per_domain`` entries share the class names and the
prompt template ``"a photo of a {}."``. PACS, which has official split lists, is in
:mod:`fl2ora.data.pacs`. Accepted layouts here:

- OfficeHome: ``<root>/{Art,Clipart,Product,Real_World}/<class>/<file>``, 65 classes. ``Real World``
  (the original archive's spelling) is accepted for ``Real_World``. There is no official split, so each
  domain is split by :func:`stratified_split`.
- VLCS: ``<root>/{CALTECH,LABELME,PASCAL,SUN}/<class>/<file>`` or
  ``<root>/{Caltech101,LabelMe,SUN09,VOC2007}/<class>/<file>``, 5 classes. A domain folder with
  ``train/`` and ``test/`` (and optionally ``crossval/``, read as val) subfolders is used as split. A
  domain folder with only ``full/`` is split like one without subfolders, by :func:`stratified_split`.

Both layouts are also accepted under a named subfolder of ``root`` (``OfficeHome/``, ``VLCS/``), under
its only subfolder, or as a ``.tar.gz`` archive.
"""

from __future__ import annotations

import logging
import math
import numbers
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fl2ora.data.coop_splits import readable_classname
from fl2ora.data.datasets import (
    DEFAULT_TEMPLATE,
    IMAGE_EXTENSIONS,
    ImageClassificationData,
    ImageSamples,
    _class_folders,
    _list_images,
    _resolve_archive,
)

logger = logging.getLogger(__name__)


@dataclass
class DomainData:
    """A dataset with one :class:`ImageClassificationData` per domain and shared classes.

    Attributes:
        domains: domain names in the dataset's usual order, e.g. ``["art_painting", "cartoon", ...]``.
        per_domain: each domain's train and test samples (and val where the layout has one).
        classnames: readable name of each class id, the same in every domain.
        template: prompt with one ``{}`` for the class name.
        name: dataset name, e.g. ``"pacs"``.
    """

    domains: list[str]
    per_domain: dict[str, ImageClassificationData]
    classnames: list[str]
    template: str
    name: str

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError(f"{self.name}: domains is empty. Pass at least one domain.")
        if set(self.domains) != set(self.per_domain) or len(set(self.domains)) != len(self.domains):
            raise ValueError(
                f"{self.name}: domains {self.domains} must list each key of per_domain "
                f"{sorted(self.per_domain)} exactly once."
            )
        for domain, data in self.per_domain.items():
            if data.classnames != self.classnames or data.template != self.template:
                raise ValueError(
                    f"{self.name}: domain {domain!r} has class names {data.classnames} and template "
                    f"{data.template!r}, but the dataset has {self.classnames} and {self.template!r}. "
                    "Every domain must share them."
                )

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classnames)


def stratified_split(
    labels: np.ndarray | Sequence[int], test_fraction: float = 0.2, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and test with the same class proportions.

    Each class with n samples puts ``floor(test_fraction * n + 0.5)`` random samples in test, but at
    least one when n >= 2 and always at least one in train. Classes are visited in increasing id
    order with one ``numpy.random.default_rng(seed)``.

    Args:
        labels: (N,) int class ids.
        test_fraction: share of each class that goes to test, in (0, 1).
        seed: seed of ``numpy.random.default_rng``; an int or a sequence of ints.

    Returns:
        (train indices, test indices), each sorted int64; together they are a partition of range(N).

    Raises:
        ValueError: if ``test_fraction`` is not in (0, 1) or ``labels`` is not 1-D integer.

    Example:
        >>> train, test = stratified_split([0] * 10 + [1] * 5, test_fraction=0.2)
        >>> len(train), len(test)
        (12, 3)
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}. Try 0.2.")
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}.")

    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    test_parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for class_id in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == class_id))
        n = len(members)
        n_test = min(max(math.floor(test_fraction * n + 0.5), 1 if n >= 2 else 0), n - 1)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return np.sort(np.concatenate(train_parts)).astype(np.int64), np.sort(np.concatenate(test_parts)).astype(np.int64)


def _domain_seed(seed: int, domain: str) -> list[int]:
    """Seed a domain's split by ``seed`` and the domain name, so it does not depend on the other domains loaded."""
    return [seed, zlib.crc32(domain.encode())]


def _check_download(title: str, download: bool) -> None:
    if download:
        raise ValueError(f"{title} cannot be downloaded. Set download=False and point root at a local copy.")


def _candidate_roots(folder: Path, dataset_dirs: Sequence[str]) -> list[Path]:
    """Return ``folder``, its subfolders named in ``dataset_dirs`` and its only subfolder, if any."""
    candidates = [folder] + [folder / name for name in dataset_dirs]
    if folder.is_dir():
        subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subfolders) == 1 and subfolders[0] not in candidates:
            candidates.append(subfolders[0])
    return [p for p in candidates if p.is_dir()]


def _select_domains(title: str, available: Sequence[str], domains: Sequence[str] | None) -> list[str]:
    if domains is None:
        return list(available)
    if isinstance(domains, str) or not domains:
        raise ValueError(f"{title}: domains must be a non-empty list of domain names, got {domains!r}.")
    unknown = [d for d in domains if d not in available]
    if unknown:
        raise ValueError(f"{title}: unknown domains {unknown}. Available: {list(available)}.")
    return [d for d in available if d in domains]


# ---------------------------------------------------------------------------------------------------
# OfficeHome and VLCS: class folders per domain
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FolderDomainSpec:
    name: str
    title: str
    namings: tuple[tuple[str, ...], ...]  # the domain names of each accepted naming, in usual order
    dataset_dirs: tuple[str, ...]  # subfolders of root that may contain the domains
    num_classes: int
    folder_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other folder names of a domain

    def folders(self, domain: str) -> tuple[str, ...]:
        return (domain, *self.folder_aliases.get(domain, ()))


_OFFICE_HOME = _FolderDomainSpec(
    "office_home", "OfficeHome", (("Art", "Clipart", "Product", "Real_World"),),
    ("OfficeHome", "office_home", "OfficeHomeDataset_10072016"), 65, {"Real_World": ("Real World",)},
)
_VLCS = _FolderDomainSpec(
    "vlcs", "VLCS", (("CALTECH", "LABELME", "PASCAL", "SUN"), ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    ("VLCS", "vlcs"), 5,
)


def _class_images(split_dir: Path) -> dict[str, list[Path]]:
    """Map each class folder of ``split_dir`` to its sorted images, rejecting an empty class folder."""
    images = {folder.name: _list_images(folder) for folder in _class_folders(split_dir)}
    if not images:
        raise ValueError(f"No class folders found in {split_dir}. Expected {split_dir}/<class>/<image>.")
    empty = [name for name, files in images.items() if not files]
    if empty:
        raise ValueError(
            f"Class folders {empty} in {split_dir} contain no images ({', '.join(IMAGE_EXTENSIONS)}). "
            "Every class folder needs at least one image."
        )
    return images


def _read_domain(domain_dir: Path) -> tuple[dict[str, dict[str, list[Path]]], bool]:
    """Return the domain's class images per sub-split, and whether they still need a seeded split.

    Sub-splits are ``train``/``test`` (plus ``crossval`` as ``val``) when both exist, else the one
    pool ``full/`` or the domain folder itself, returned under ``"all"``.
    """
    if (domain_dir / "train").is_dir() and (domain_dir / "test").is_dir():
        parts = {"train": _class_images(domain_dir / "train"), "test": _class_images(domain_dir / "test")}
        if (domain_dir / "crossval").is_dir():
            parts["val"] = _class_images(domain_dir / "crossval")
        return parts, False
    pool = domain_dir / "full" if (domain_dir / "full").is_dir() else domain_dir
    return {"all": _class_images(pool)}, True


def _find_domain_dirs(
    spec: _FolderDomainSpec, candidates: Sequence[Path], domains: Sequence[str] | None
) -> dict[str, Path]:
    """Return the domain folders of the first candidate and naming that has every requested domain, else {}."""
    for candidate in candidates:
        for naming in spec.namings:
            if domains is not None and not set(domains) <= set(naming):
                continue
            requested = _select_domains(spec.title, naming, domains)
            present: dict[str, Path] = {}
            for domain in requested:
                existing = [candidate / name for name in spec.folders(domain) if (candidate / name).is_dir()]
                if existing:
                    present[domain] = existing[0]
            if len(present) == len(requested):
                return present
    return {}


def _check_split_arguments(test_fraction: float, seed: int) -> None:
    """Check the seeded split's arguments even when every domain comes with its own split."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}. Try 0.2.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")


def _samples(images: Mapping[str, list[Path]], class_ids: Mapping[str, int]) -> ImageSamples:
    sources = [path for folder in sorted(images) for path in images[folder]]
    labels = [class_ids[folder] for folder in sorted(images) for _ in images[folder]]
    return ImageSamples(sources, np.asarray(labels, dtype=np.int64))


def _load_folder_domains(
    spec: _FolderDomainSpec,
    root: str | Path,
    domains: Sequence[str] | None,
    test_fraction: float,
    seed: int,
    classnames: Mapping[str, str] | None,
    download: bool,
    cache_dir: str | Path | None,
) -> DomainData:
    _check_download(spec.title, download)
    namings = " or ".join("{" + ",".join(naming) + "}" for naming in spec.namings)
    layout = (
        f"Expected <root>/{namings}/<class>/<image> (optionally with train/ and test/, or full/, between the "
        f"domain and class folders), also accepted under <root>/{spec.dataset_dirs[0]}/, or a .tar.gz archive."
    )
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise FileNotFoundError(f"{spec.title} root not found: {root_path}. {layout}")

    _check_split_arguments(test_fraction, seed)
    if domains is not None:
        _select_domains(spec.title, [name for naming in spec.namings for name in naming], domains)
    candidates = _candidate_roots(_resolve_archive(root_path, cache_dir), spec.dataset_dirs)
    domain_dirs = _find_domain_dirs(spec, candidates, domains)
    if not domain_dirs:
        raise FileNotFoundError(
            f"No {spec.title} domain folders{'' if domains is None else f' for {list(domains)}'} found in any of "
            f"{[str(p) for p in candidates] or [str(root_path)]}. {layout}"
        )

    parts = {domain: _read_domain(path) for domain, path in domain_dirs.items()}
    reference_domain = next(iter(parts))
    folders = sorted(next(iter(parts[reference_domain][0].values())))
    for domain, (splits, _) in parts.items():
        for split, images in splits.items():
            if sorted(images) != folders:
                raise ValueError(
                    f"{spec.title}: class folders of {domain_dirs[domain]} ({split}) differ from those of "
                    f"{domain_dirs[reference_domain]}: missing {sorted(set(folders) - set(images))}, unexpected "
                    f"{sorted(set(images) - set(folders))}. Every domain needs the same class folders."
                )
    if len(folders) != spec.num_classes:
        logger.warning("%s has %d classes, not the usual %d: %s", spec.title, len(folders), spec.num_classes, folders)

    mapping = dict(classnames or {})
    unknown = sorted(set(mapping) - set(folders))
    if unknown:
        raise ValueError(f"classnames names class folders that do not exist: {unknown}. Available: {folders}.")
    if not mapping and all(folder.isdigit() for folder in folders):
        logger.warning(
            "%s class folders are numbers %s, so prompts will contain numbers. Pass classnames={folder: name}",
            spec.title, folders,
        )
    readable = [mapping.get(folder, readable_classname(folder).lower()) for folder in folders]
    class_ids = {folder: index for index, folder in enumerate(folders)}

    per_domain: dict[str, ImageClassificationData] = {}
    for domain, (splits, needs_split) in parts.items():
        if needs_split:
            pool = _samples(splits["all"], class_ids)
            train_indices, test_indices = stratified_split(pool.labels, test_fraction, _domain_seed(seed, domain))
            train, test, val = pool.subset(train_indices), pool.subset(test_indices), None
        else:
            train, test = _samples(splits["train"], class_ids), _samples(splits["test"], class_ids)
            val = _samples(splits["val"], class_ids) if "val" in splits else None
        per_domain[domain] = ImageClassificationData(
            train, test, readable, DEFAULT_TEMPLATE, f"{spec.name}/{domain}", val
        )
        logger.info(
            "Loaded %s %s from %s: %d train and %d test images (%s)",
            spec.title, domain, domain_dirs[domain], len(train), len(test),
            f"seeded split, test_fraction={test_fraction}, seed={seed}" if needs_split else "folder split",
        )
    return DomainData(list(domain_dirs), per_domain, readable, DEFAULT_TEMPLATE, spec.name)


def load_office_home(
    root: str | Path,
    domains: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    classnames: Mapping[str, str] | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> DomainData:
    """Load OfficeHome: 4 domains of 65 classes, each split into train and test by a seeded draw.

    Class ids follow the sorted class folder names. The readable name of a class is
    ``classnames[folder]`` if given, else the folder name lower-cased with ``_`` replaced by a space
    (``Alarm_Clock`` becomes ``alarm clock``).

    Args:
        root: OfficeHome folder, its parent, or a ``.tar.gz`` archive (see the module docstring).
        domains: domains to load from Art, Clipart, Product and Real_World; None loads all four.
        test_fraction: share of each class of a domain that goes to test, in (0, 1).
        seed: seed of the split. A domain's split depends only on ``seed`` and the domain name.
        classnames: optional map from class folder name to readable name.
        download: must be False, because OfficeHome is not downloaded.
        cache_dir: where archives are unpacked; defaults to ``$FL2ORA_CACHE`` or ``~/.cache/fl2ora``.

    Returns:
        The requested domains in the order Art, Clipart, Product, Real_World.

    Raises:
        FileNotFoundError: if ``root`` or a domain folder is missing.
        ValueError: if a class folder is empty, the domains' class folders differ, or an argument is
            invalid.
    """
    return _load_folder_domains(_OFFICE_HOME, root, domains, test_fraction, seed, classnames, download, cache_dir)


def load_vlcs(
    root: str | Path,
    domains: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    classnames: Mapping[str, str] | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> DomainData:
    """Load VLCS: 4 domains of 5 classes (bird, car, chair, dog, person).

    Domain folders are ``CALTECH, LABELME, PASCAL, SUN`` or ``Caltech101, LabelMe, SUN09, VOC2007``,
    and the domain names returned are the folder names found. A domain's ``train/`` and ``test/``
    subfolders are used when both exist, with ``crossval/`` as val. Otherwise the domain (or its
    ``full/`` subfolder) is split as in :func:`load_office_home`, which also documents the arguments
    and class names.

    Returns:
        The requested domains in the naming's order as listed above.
    """
    return _load_folder_domains(_VLCS, root, domains, test_fraction, seed, classnames, download, cache_dir)
