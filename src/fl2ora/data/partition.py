"""Split a dataset's sample indices between federated clients.

Two schemes are offered:

- ``dirichlet``: label skew as in NIID-Bench (Li et al., "Federated Learning on Non-IID Data Silos:
  An Experimental Study", ICDE 2022). For each class a share per client is drawn from
  Dir(beta * ones(K)); smaller beta gives more skewed clients. The same shares split the class's test
  samples, so each client's test split has the class proportions of its training split.
- ``iid``: a uniform random split into near-equal parts.

Both return a :class:`ClientPartition` holding index arrays into the train and test sets. K is the
number of clients, N the number of samples.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

PartitionMethod = Literal["dirichlet", "iid"]


@dataclass
class ClientPartition:
    """Train and test sample indices of each client, and the settings that produced them.

    Attributes:
        train_indices: one sorted int64 array per client, indices into the training set.
        test_indices: one sorted int64 array per client, indices into the test set.
        method: partition scheme, ``"dirichlet"`` or ``"iid"``.
        seed: seed of ``numpy.random.default_rng`` that drew the partition.
        beta: Dirichlet concentration, or None for ``"iid"``.
        min_samples: minimum train and test samples per client that was requested.
        attempts: number of draws made before every client reached ``min_samples`` (1 for ``"iid"``).
    """

    train_indices: list[np.ndarray]
    test_indices: list[np.ndarray]
    method: PartitionMethod
    seed: int
    beta: float | None = None
    min_samples: int = 0
    attempts: int = 1

    @property
    def num_clients(self) -> int:
        """Number of clients K."""
        return len(self.train_indices)

    def class_counts(
        self, labels_train: np.ndarray, labels_test: np.ndarray, num_classes: int
    ) -> dict[str, Any]:
        """Count each client's samples per class, in a JSON-serialisable form for saving with a run.

        Args:
            labels_train: (N_train,) int labels of the training set these indices point into.
            labels_test: (N_test,) int labels of the test set.
            num_classes: number of classes C; labels must lie in [0, C).

        Returns:
            A dict with the partition settings (``method``, ``seed``, ``beta``, ``min_samples``,
            ``attempts``, ``num_clients``, ``num_classes``) and ``train`` and ``test``: one list of C
            ints per client.

        Raises:
            ValueError: if a label lies outside [0, num_classes).
        """
        labels_train = np.asarray(labels_train)
        labels_test = np.asarray(labels_test)
        train_counts = [_count_classes(labels_train[idx], num_classes, "labels_train") for idx in self.train_indices]
        test_counts = [_count_classes(labels_test[idx], num_classes, "labels_test") for idx in self.test_indices]
        return {
            "method": self.method,
            "seed": int(self.seed),
            "beta": None if self.beta is None else float(self.beta),
            "min_samples": int(self.min_samples),
            "attempts": int(self.attempts),
            "num_clients": self.num_clients,
            "num_classes": int(num_classes),
            "train": train_counts,
            "test": test_counts,
        }


def _count_classes(labels: np.ndarray, num_classes: int, name: str) -> list[int]:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} contains labels outside [0, {num_classes}): min {labels.min()}, max {labels.max()}. "
            "Pass the number of classes of the dataset as num_classes."
        )
    return [int(c) for c in np.bincount(labels, minlength=num_classes)]


def _validate_labels(labels: np.ndarray | list[int], name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class ids, got shape {array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must contain integer class ids, got dtype {array.dtype}.")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must contain non-negative class ids, got {array.min()}.")
    return array.astype(np.int64, copy=False)


def _validate_common(
    train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, min_samples: int
) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}.")
    if isinstance(min_samples, bool) or not isinstance(min_samples, numbers.Integral) or min_samples < 0:
        raise ValueError(f"min_samples must be an int >= 0, got {min_samples!r}. Use 0 to allow empty clients.")
    for name, labels in (("training", train_labels), ("test", test_labels)):
        if num_clients > len(labels):
            raise ValueError(
                f"num_clients={num_clients} is more than the {len(labels)} {name} samples, so some clients "
                f"would get none. Use at most {len(labels)} clients or a larger dataset."
            )
        if num_clients * min_samples > len(labels):
            raise ValueError(
                f"{num_clients} clients with min_samples={min_samples} need {num_clients * min_samples} "
                f"{name} samples, but there are only {len(labels)}. Lower min_samples to at most "
                f"{len(labels) // num_clients} or use fewer clients."
            )


def _sorted_int64(indices: list[np.ndarray] | np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(indices, dtype=np.int64))


def dirichlet_partition(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    beta: float = 0.5,
    min_samples: int = 10,
    seed: int = 0,
    max_tries: int = 1000,
) -> ClientPartition:
    """Split train and test indices between clients with Dirichlet label skew (NIID-Bench).

    For each class c, in increasing class-id order, one attempt:

    1. shuffles the class's train indices and its test indices,
    2. draws shares p ~ Dir(beta * ones(K)) over the K clients,
    3. sets to zero the share of every client that already has >= N_train / K training samples,
       and renormalises the rest,
    4. cuts the shuffled train indices at ``floor(cumsum(p) * n_train_c)`` and the shuffled test
       indices at ``floor(cumsum(p) * n_test_c)``, so both splits follow the same shares.

    An attempt is kept when every client has at least ``min_samples`` train and ``min_samples`` test
    samples. Otherwise the next attempt continues the same random stream, so the result depends only on
    the inputs and ``seed``.

    Args:
        train_labels: (N_train,) int class ids of the training set.
        test_labels: (N_test,) int class ids of the test set.
        num_clients: number of clients K, >= 1.
        beta: Dirichlet concentration, > 0. The study uses 0.5.
        min_samples: minimum train samples and minimum test samples per client, >= 0.
        seed: seed of ``numpy.random.default_rng``.
        max_tries: maximum number of attempts, >= 1.

    Returns:
        A :class:`ClientPartition` with sorted index arrays. Every train and every test index is
        assigned to exactly one client.

    Raises:
        ValueError: on invalid arguments, or when no attempt within ``max_tries`` met ``min_samples``.
    """
    train_labels = _validate_labels(train_labels, "train_labels")
    test_labels = _validate_labels(test_labels, "test_labels")
    _validate_common(train_labels, test_labels, num_clients, min_samples)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}. The study uses 0.5.")
    if isinstance(max_tries, bool) or not isinstance(max_tries, numbers.Integral) or max_tries < 1:
        raise ValueError(f"max_tries must be an int >= 1, got {max_tries!r}.")

    rng = np.random.default_rng(seed)
    classes = np.union1d(np.unique(train_labels), np.unique(test_labels))
    train_by_class = [np.flatnonzero(train_labels == c) for c in classes]
    test_by_class = [np.flatnonzero(test_labels == c) for c in classes]
    num_train = len(train_labels)
    best_minimum = -1

    for attempt in range(1, max_tries + 1):
        client_train: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        client_test: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        train_sizes = np.zeros(num_clients, dtype=np.int64)
        test_sizes = np.zeros(num_clients, dtype=np.int64)
        drawn_all_classes = True

        for class_train, class_test in zip(train_by_class, test_by_class):
            class_train = rng.permutation(class_train)
            class_test = rng.permutation(class_test)
            shares = rng.dirichlet(np.full(num_clients, float(beta)))

            # A client that already has its even share of the training set gets nothing more.
            shares = shares * (train_sizes < num_train / num_clients)
            total = shares.sum()
            if total <= 0:
                # Every client still below N/K drew a share that underflowed to 0 (possible for tiny
                # beta), so this class cannot be placed. The attempt counts as failed.
                drawn_all_classes = False
                break
            cumulative = np.cumsum(shares / total)

            train_cuts = (cumulative * len(class_train)).astype(np.int64)[:-1]
            test_cuts = (cumulative * len(class_test)).astype(np.int64)[:-1]
            for client, part in enumerate(np.split(class_train, train_cuts)):
                client_train[client].append(part)
                train_sizes[client] += len(part)
            for client, part in enumerate(np.split(class_test, test_cuts)):
                client_test[client].append(part)
                test_sizes[client] += len(part)

        if not drawn_all_classes:
            continue
        minimum = int(min(train_sizes.min(), test_sizes.min()))
        best_minimum = max(best_minimum, minimum)
        if minimum >= min_samples:
            logger.info(
                "Dirichlet partition: %d clients, beta=%s, seed=%s, accepted attempt %d, "
                "train sizes %d..%d, test sizes %d..%d",
                num_clients, beta, seed, attempt,
                train_sizes.min(), train_sizes.max(), test_sizes.min(), test_sizes.max(),
            )
            return ClientPartition(
                train_indices=[_sorted_int64(np.concatenate(parts)) for parts in client_train],
                test_indices=[_sorted_int64(np.concatenate(parts)) for parts in client_test],
                method="dirichlet",
                seed=seed,
                beta=float(beta),
                min_samples=int(min_samples),
                attempts=attempt,
            )

    best = "none (every attempt had a class that could not be placed)" if best_minimum < 0 else best_minimum
    raise ValueError(
        f"Dirichlet partition failed: no attempt in max_tries={max_tries} gave each of num_clients={num_clients} "
        f"clients at least min_samples={min_samples} train and test samples with beta={beta}. The best "
        f"minimum reached was {best}. Lower min_samples, use fewer clients or a larger beta."
    )


def iid_partition(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    seed: int = 0,
    min_samples: int = 0,
) -> ClientPartition:
    """Split train and test indices between clients uniformly at random.

    Each set is shuffled with ``numpy.random.default_rng(seed)`` and cut by ``numpy.array_split``, so
    client sizes differ by at most 1.

    Args:
        train_labels: (N_train,) int class ids of the training set (only their number is used).
        test_labels: (N_test,) int class ids of the test set.
        num_clients: number of clients K, >= 1.
        seed: seed of ``numpy.random.default_rng``.
        min_samples: minimum train samples and minimum test samples per client, >= 0.

    Returns:
        A :class:`ClientPartition` with sorted index arrays.

    Raises:
        ValueError: on invalid arguments, or when floor(N / K) < min_samples for train or test.
    """
    train_labels = _validate_labels(train_labels, "train_labels")
    test_labels = _validate_labels(test_labels, "test_labels")
    _validate_common(train_labels, test_labels, num_clients, min_samples)

    rng = np.random.default_rng(seed)
    train_parts = np.array_split(rng.permutation(len(train_labels)), num_clients)
    test_parts = np.array_split(rng.permutation(len(test_labels)), num_clients)
    logger.info(
        "IID partition: %d clients, seed=%s, %d train and %d test samples",
        num_clients, seed, len(train_labels), len(test_labels),
    )
    return ClientPartition(
        train_indices=[_sorted_int64(part) for part in train_parts],
        test_indices=[_sorted_int64(part) for part in test_parts],
        method="iid",
        seed=seed,
        beta=None,
        min_samples=int(min_samples),
        attempts=1,
    )


def partition(
    method: PartitionMethod,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    *,
    beta: float = 0.5,
    min_samples: int = 10,
    seed: int = 0,
    max_tries: int = 1000,
) -> ClientPartition:
    """Split train and test indices between clients with the named scheme.

    Args:
        method: ``"dirichlet"`` (see :func:`dirichlet_partition`) or ``"iid"`` (see
            :func:`iid_partition`, which ignores ``beta`` and ``max_tries``).
        train_labels: (N_train,) int class ids of the training set.
        test_labels: (N_test,) int class ids of the test set.
        num_clients: number of clients K, >= 1.
        beta: Dirichlet concentration, > 0.
        min_samples: minimum train samples and minimum test samples per client, >= 0.
        seed: seed of ``numpy.random.default_rng``.
        max_tries: maximum number of Dirichlet attempts, >= 1.

    Returns:
        A :class:`ClientPartition`.

    Raises:
        ValueError: on an unknown method or invalid arguments.
    """
    if method == "dirichlet":
        return dirichlet_partition(
            train_labels, test_labels, num_clients,
            beta=beta, min_samples=min_samples, seed=seed, max_tries=max_tries,
        )
    if method == "iid":
        return iid_partition(train_labels, test_labels, num_clients, seed=seed, min_samples=min_samples)
    raise ValueError(f"Unknown partition method {method!r}. Available: 'dirichlet', 'iid'.")
