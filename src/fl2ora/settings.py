"""The study's federated settings: which images each client trains and is tested on.

- ``label_skew``: one dataset, Dirichlet (or IID) split of every class's training and
  test images across clients (CIFAR-10/100 in the study).
- ``domain_skew``: a dataset with domains (PACS, OfficeHome, VLCS); each domain is
  split by Dirichlet label skew across ``clients_per_domain`` clients and every
  client is tested on held-out images of its own domain; results per domain.
- ``leave_one_domain_out``: as domain skew without the held-out domain, which is
  scored as a whole after training (domain generalisation).
- ``base_to_new``: the first half of the classes (rounded up) are base classes,
  dealt to clients disjointly, K shots each; the rest are new classes, never trained,
  scored against the new classes' names.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from fl2ora.config import ConfigError, RunConfig
from fl2ora.data import ImageSamples, load_dataset, partition, subsample_per_class
from fl2ora.data.catalog import load_domain_dataset
from fl2ora.data.validation import drop_unreadable_splits

logger = logging.getLogger(__name__)


@dataclass
class ClientSplits:
    """Sample pools and each client's indices into them."""

    name: str
    classnames: list[str]
    """Names of the classes the model is trained on (the base classes in base-to-new)."""
    template: str
    train: ImageSamples
    test: ImageSamples
    client_train: list[np.ndarray]
    """For client k, indices into ``train``."""
    client_test: list[np.ndarray]
    """For client k, indices into ``test``: its local test split."""
    class_counts: dict
    groups: dict[str, list[int]] = field(default_factory=dict)
    """Named groups of client ids reported together (the clients of each domain)."""
    heldout: dict[str, np.ndarray] = field(default_factory=dict)
    """Evaluation-only sets, name -> indices into ``test`` (the left-out domain)."""
    client_classes: list[np.ndarray] | None = None
    """Base-to-new: the classes of each client, scored against only those names."""
    new_classnames: list[str] | None = None
    """Base-to-new: names of the new classes."""
    new_test: ImageSamples | None = None
    """Base-to-new: test images of the new classes, labels in ``[0, len(new_classnames))``."""


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: str, download: bool):
    # Sweeps build many experiments on one dataset; listing its files once is enough.
    return load_dataset(name, root, download=download)


def _subsample(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    if limit is None:
        return np.arange(len(labels))
    return np.sort(subsample_per_class(labels, limit, seed))


def _partition_counts(config: RunConfig, train_labels: np.ndarray, test_labels: np.ndarray, clients: int, seed: int):
    if clients > len(train_labels) or clients > len(test_labels):
        raise ConfigError(
            f"{clients} clients exceed the {len(train_labels)} training or {len(test_labels)} test samples "
            "available. Lower partition.num_clients (or setting.clients_per_domain) or raise data.max_*_per_class."
        )
    return partition(
        config.partition.method,
        train_labels,
        test_labels,
        num_clients=clients,
        beta=config.partition.beta,
        min_samples=config.partition.min_samples,
        seed=seed,
        max_tries=config.partition.max_tries,
    )


def _label_skew(config: RunConfig) -> ClientSplits:
    data = _load_cached(config.data.dataset, config.data.root, config.data.download)
    train_pool = _subsample(data.train.labels, config.data.max_train_per_class, config.seed)
    test_pool = _subsample(data.test.labels, config.data.max_test_per_class, config.seed + 1)
    train_pool, test_pool = drop_unreadable_splits(
        [("training", data.train, train_pool), ("test", data.test, test_pool)], config.data.bad_images
    )
    train_labels, test_labels = data.train.labels[train_pool], data.test.labels[test_pool]
    split = _partition_counts(config, train_labels, test_labels, config.partition.num_clients, config.seed)
    return ClientSplits(
        name=data.name,
        classnames=data.classnames,
        template=data.template,
        train=data.train,
        test=data.test,
        client_train=[train_pool[rows] for rows in split.train_indices],
        client_test=[test_pool[rows] for rows in split.test_indices],
        class_counts=split.class_counts(train_labels, test_labels, len(data.classnames)),
    )


def _concatenate(parts: list[ImageSamples]) -> tuple[ImageSamples, list[int]]:
    """Join sample lists; returns the joined samples and each part's offset."""
    sources, labels, offsets = [], [], []
    for part in parts:
        offsets.append(len(sources))
        sources.extend(part.sources)
        labels.extend(part.labels.tolist())
    return ImageSamples(sources, np.asarray(labels, dtype=np.int64)), offsets


def _domains(config: RunConfig) -> ClientSplits:
    setting = config.setting
    options = {}
    if config.data.dataset == "pacs":
        options["pacs_test_split"] = setting.pacs_test_split
    dataset = load_domain_dataset(config.data.dataset, config.data.root, download=config.data.download, **options)
    domains = list(setting.domains) if setting.domains else list(dataset.domains)
    unknown = sorted(set(domains) - set(dataset.domains))
    if unknown:
        raise ConfigError(f"setting.domains {unknown} are not domains of {dataset.name}: {dataset.domains}.")
    heldout_domain = None
    if setting.kind == "leave_one_domain_out":
        heldout_domain = setting.held_out_domain
        if heldout_domain not in dataset.domains:
            raise ConfigError(
                f"setting.held_out_domain must be one of {dataset.domains} for leave_one_domain_out, "
                f"got {heldout_domain!r}."
            )
        domains = [d for d in domains if d != heldout_domain]

    # Every image the run reads is checked at once, so one error lists the unreadable files of
    # all domains and splits before any domain is partitioned.
    checks = []
    for domain in domains:
        data = dataset.per_domain[domain]
        train_pool = _subsample(data.train.labels, config.data.max_train_per_class, config.seed)
        test_pool = _subsample(data.test.labels, config.data.max_test_per_class, config.seed + 1)
        checks += [(f"{domain} training", data.train, train_pool), (f"{domain} test", data.test, test_pool)]
    heldout_pool = None
    if heldout_domain is not None:
        # The unseen domain is scored on all its images, training and test lists alike.
        target = dataset.per_domain[heldout_domain]
        heldout_pool, _ = _concatenate([target.train, target.test])
        limit = config.data.max_test_per_class
        checks.append(("held-out", heldout_pool, _subsample(heldout_pool.labels, limit, config.seed + 2)))
    kept = drop_unreadable_splits(checks, config.data.bad_images)

    client_train, client_test, groups = [], [], {}
    counts: dict = {"domains": {}, "train": [], "test": []}
    train_all, train_offsets = _concatenate([dataset.per_domain[d].train for d in domains])
    test_all, test_offsets = _concatenate([dataset.per_domain[d].test for d in domains])
    for position, domain in enumerate(domains):
        data = dataset.per_domain[domain]
        train_pool, test_pool = kept[2 * position], kept[2 * position + 1]
        train_labels, test_labels = data.train.labels[train_pool], data.test.labels[test_pool]
        split = _partition_counts(
            config, train_labels, test_labels, setting.clients_per_domain, config.seed + 1000 * (position + 1)
        )
        first = len(client_train)
        for rows in split.train_indices:
            client_train.append(train_offsets[position] + train_pool[rows])
        for rows in split.test_indices:
            client_test.append(test_offsets[position] + test_pool[rows])
        groups[domain] = list(range(first, len(client_train)))
        domain_counts = split.class_counts(train_labels, test_labels, len(dataset.classnames))
        counts["domains"][domain] = groups[domain]
        counts["train"].extend(domain_counts["train"])
        counts["test"].extend(domain_counts["test"])

    heldout = {}
    if heldout_pool is not None:
        test_all, extra_offsets = _concatenate([test_all, heldout_pool])
        heldout[heldout_domain] = extra_offsets[1] + kept[-1]
        counts["held_out_domain"] = heldout_domain
    counts["num_clients"] = len(client_train)
    logger.info("Domain setting on %s: clients per domain %s", dataset.name, groups)
    return ClientSplits(
        name=dataset.name,
        classnames=dataset.classnames,
        template=dataset.template,
        train=train_all,
        test=test_all,
        client_train=client_train,
        client_test=client_test,
        class_counts=counts,
        groups=groups,
        heldout=heldout,
    )


def split_base_new(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the base classes (first half, rounded up) and the new classes.

    >>> [c.tolist() for c in split_base_new(5)]
    [[0, 1, 2], [3, 4]]
    """
    base = math.ceil(num_classes / 2)
    return np.arange(base), np.arange(base, num_classes)


def sample_shots(labels: np.ndarray, classes: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Pick exactly ``shots`` training indices of each class in ``classes`` (seeded).

    Raises:
        ConfigError: when a class has fewer than ``shots`` images.
    """
    rng = np.random.default_rng([seed, 23])
    chosen = []
    for cls in classes:
        candidates = np.flatnonzero(labels == cls)
        if len(candidates) < shots:
            raise ConfigError(
                f"Class {int(cls)} has {len(candidates)} training images, fewer than setting.shots={shots}. "
                "Lower setting.shots."
            )
        chosen.append(np.sort(rng.choice(candidates, size=shots, replace=False)))
    return np.concatenate(chosen) if chosen else np.array([], dtype=np.int64)


def _base_to_new(config: RunConfig) -> ClientSplits:
    data = _load_cached(config.data.dataset, config.data.root, config.data.download)
    base, new = split_base_new(len(data.classnames))
    clients = config.partition.num_clients
    if clients > len(base):
        raise ConfigError(
            f"partition.num_clients={clients} exceeds the {len(base)} base classes of {data.name}; "
            "each client needs at least one base class."
        )
    # Base classes dealt to clients disjointly, in a seeded order.
    order = np.random.default_rng([config.seed, 29]).permutation(base)
    client_classes = [np.sort(part) for part in np.array_split(order, clients)]
    test_limit = config.data.max_test_per_class
    checks = []
    for classes in client_classes:
        shots = sample_shots(data.train.labels, classes, config.setting.shots, config.seed)
        in_classes = np.flatnonzero(np.isin(data.test.labels, classes))
        rows = in_classes[_subsample(data.test.labels[in_classes], test_limit, config.seed + 1)]
        checks += [("training", data.train, shots), ("test", data.test, rows)]
    new_rows = np.flatnonzero(np.isin(data.test.labels, new))
    new_rows = new_rows[_subsample(data.test.labels[new_rows], test_limit, config.seed + 1)]
    checks.append(("new-class test", data.test, new_rows))

    # One check of every split, so one error lists the unreadable training and test files.
    kept = drop_unreadable_splits(checks, config.data.bad_images)
    client_train, client_test, new_rows = kept[0:-1:2], kept[1:-1:2], kept[-1]
    for client, rows in enumerate(client_train):
        if len(rows) == 0:
            raise ConfigError(
                f"Client {client} has no readable training image left: all its {config.setting.shots} shots per "
                f"class of classes {client_classes[client].tolist()} were skipped as unreadable "
                "(data.bad_images=skip). Replace the damaged files or use fewer clients."
            )
    new_test = ImageSamples([data.test.sources[i] for i in new_rows], data.test.labels[new_rows] - len(base))

    num_base = len(base)
    counts = {
        "base_classes": base.tolist(),
        "new_classes": new.tolist(),
        "client_classes": [c.tolist() for c in client_classes],
        "shots": config.setting.shots,
        "train": [np.bincount(data.train.labels[rows], minlength=num_base).tolist() for rows in client_train],
        "test": [np.bincount(data.test.labels[rows], minlength=num_base).tolist() for rows in client_test],
        "new_test": np.bincount(new_test.labels, minlength=len(new)).tolist(),
    }
    return ClientSplits(
        name=data.name,
        classnames=[data.classnames[c] for c in base],
        template=data.template,
        train=data.train,
        test=data.test,
        client_train=client_train,
        client_test=client_test,
        class_counts=counts,
        client_classes=client_classes,
        new_classnames=[data.classnames[c] for c in new],
        new_test=new_test,
    )


def build_splits(config: RunConfig) -> ClientSplits:
    """Build the client splits of ``config.setting.kind``.

    Raises:
        ConfigError: when the data cannot satisfy the setting.
    """
    kind = config.setting.kind
    if kind == "label_skew":
        return _label_skew(config)
    if kind in ("domain_skew", "leave_one_domain_out"):
        return _domains(config)
    if kind == "base_to_new":
        return _base_to_new(config)
    raise ConfigError(f"Unknown setting.kind {kind!r}.")
