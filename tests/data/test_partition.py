"""Tests for fl2ora.data.partition: Dirichlet (NIID-Bench) and IID client splits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fl2ora.data.partition import ClientPartition, dirichlet_partition, iid_partition, partition

NUM_CLASSES = 10


def make_labels(per_class: list[int], seed: int) -> np.ndarray:
    """Shuffled labels with per_class[c] samples of class c."""
    labels = np.repeat(np.arange(len(per_class)), per_class)
    return np.random.default_rng(seed).permutation(labels)


@pytest.fixture(scope="module")
def labels() -> tuple[np.ndarray, np.ndarray]:
    # Unequal class sizes, test set about a fifth of the training set.
    train = make_labels([500, 450, 400, 520, 480, 300, 610, 500, 390, 450], seed=1)
    test = make_labels([100, 90, 80, 104, 96, 60, 122, 100, 78, 90], seed=2)
    return train, test


def per_client_counts(indices: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """(K, C) class counts per client."""
    return np.stack([np.bincount(labels[idx], minlength=NUM_CLASSES) for idx in indices])


SETTINGS = [
    # (num_clients, beta, min_samples)
    (10, 0.5, 10),
    (20, 0.5, 5),
    (5, 0.1, 10),
    (30, 1.0, 2),
    (8, 100.0, 10),
]


@pytest.mark.parametrize("num_clients,beta,min_samples", SETTINGS)
def test_dirichlet_min_samples(labels, num_clients, beta, min_samples):
    train, test = labels
    result = dirichlet_partition(train, test, num_clients, beta=beta, min_samples=min_samples, seed=3)
    assert result.num_clients == num_clients
    assert len(result.test_indices) == num_clients
    assert min(len(idx) for idx in result.train_indices) >= min_samples
    assert min(len(idx) for idx in result.test_indices) >= min_samples


@pytest.mark.parametrize("num_clients,beta,min_samples", SETTINGS)
def test_dirichlet_uses_every_index_once(labels, num_clients, beta, min_samples):
    train, test = labels
    result = dirichlet_partition(train, test, num_clients, beta=beta, min_samples=min_samples, seed=4)
    all_train = np.concatenate(result.train_indices)
    all_test = np.concatenate(result.test_indices)
    assert len(all_train) == len(train)
    assert len(all_test) == len(test)
    np.testing.assert_array_equal(np.sort(all_train), np.arange(len(train)))
    np.testing.assert_array_equal(np.sort(all_test), np.arange(len(test)))
    for idx in result.train_indices + result.test_indices:
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0), "indices must be sorted and unique within a client"


def test_dirichlet_deterministic_for_seed(labels):
    train, test = labels
    first = dirichlet_partition(train, test, 10, beta=0.5, min_samples=5, seed=7)
    second = dirichlet_partition(train, test, 10, beta=0.5, min_samples=5, seed=7)
    other = dirichlet_partition(train, test, 10, beta=0.5, min_samples=5, seed=8)
    for a, b in zip(first.train_indices + first.test_indices, second.train_indices + second.test_indices):
        np.testing.assert_array_equal(a, b)
    assert first.attempts == second.attempts
    assert any(
        not np.array_equal(a, b) for a, b in zip(first.train_indices, other.train_indices)
    ), "a different seed should give a different partition"


@pytest.mark.parametrize("num_clients,beta,min_samples", SETTINGS)
def test_dirichlet_test_split_follows_train_shares(labels, num_clients, beta, min_samples):
    """Re-derive each test cut from the train cut with the floor(cumsum(p) * n) arithmetic.

    For class c with n train and m test samples, client j's cumulative train count is
    T_j = floor(P_j * n) and its cumulative test count is S_j = floor(P_j * m), where P_j is the
    cumulative share. T_j bounds P_j to [T_j / n, (T_j + 1) / n), so S_j must lie in
    [floor(T_j * m / n), ceil((T_j + 1) * m / n) - 1].
    """
    train, test = labels
    result = dirichlet_partition(train, test, num_clients, beta=beta, min_samples=min_samples, seed=5)
    train_counts = per_client_counts(result.train_indices, train)  # (K, C)
    test_counts = per_client_counts(result.test_indices, test)  # (K, C)
    for c in range(NUM_CLASSES):
        n = int((train == c).sum())
        m = int((test == c).sum())
        cum_train = np.cumsum(train_counts[:, c])
        cum_test = np.cumsum(test_counts[:, c])
        assert cum_train[-1] == n
        assert cum_test[-1] == m
        for j in range(num_clients - 1):
            low = math.floor(cum_train[j] * m / n)
            high = math.ceil((cum_train[j] + 1) * m / n) - 1
            assert low <= cum_test[j] <= high, f"class {c} client {j}: S={cum_test[j]} not in [{low}, {high}]"

        # Per client, the test count is the train count scaled by m / n, up to the two floors.
        np.testing.assert_allclose(test_counts[:, c], train_counts[:, c] * m / n, atol=2.0)


@pytest.mark.parametrize("num_clients,beta,min_samples", SETTINGS)
def test_dirichlet_zeroing_rule(labels, num_clients, beta, min_samples):
    """A client gets samples of class c only while it has fewer than N / K training samples."""
    train, test = labels
    result = dirichlet_partition(train, test, num_clients, beta=beta, min_samples=min_samples, seed=6)
    train_counts = per_client_counts(result.train_indices, train)  # (K, C)
    even_share = len(train) / num_clients
    largest_class = np.bincount(train).max()
    for j in range(num_clients):
        assert train_counts[j].sum() < even_share + largest_class
        # Classes are placed in increasing id order, so the size before class c is the sum over
        # classes < c.
        held_before = np.concatenate([[0], np.cumsum(train_counts[j])[:-1]])
        received = train_counts[j] > 0
        assert np.all(held_before[received] < even_share), f"client {j} received a class after reaching N/K"


def test_dirichlet_small_beta_more_skewed(labels):
    """Per-client label distributions are more concentrated for small beta (lower mean entropy)."""
    train, test = labels

    def mean_entropy(beta: float) -> float:
        result = dirichlet_partition(train, test, 10, beta=beta, min_samples=1, seed=0)
        counts = per_client_counts(result.train_indices, train).astype(float)
        probs = counts / counts.sum(axis=1, keepdims=True)
        logs = np.log(np.where(probs > 0, probs, 1.0))
        return float(-(probs * logs).sum(axis=1).mean())

    assert mean_entropy(0.1) < mean_entropy(1.0) < mean_entropy(100.0)
    assert mean_entropy(100.0) > 0.95 * math.log(NUM_CLASSES)


def test_dirichlet_error_when_minimum_unreachable(labels):
    train, test = labels
    with pytest.raises(ValueError) as info:
        dirichlet_partition(train, test, 20, beta=0.01, min_samples=20, seed=0, max_tries=5)
    message = str(info.value)
    assert "num_clients=20" in message
    assert "beta=0.01" in message
    assert "min_samples=20" in message
    assert "best minimum reached was" in message
    assert "Lower min_samples" in message
    assert "larger beta" in message


def test_dirichlet_error_when_too_few_samples(labels):
    train, test = labels
    with pytest.raises(ValueError, match=r"50 clients with min_samples=1000 need 50000"):
        dirichlet_partition(train, test, 50, beta=0.5, min_samples=1000, seed=0)


def test_iid_sizes_and_coverage(labels):
    train, test = labels
    result = iid_partition(train, test, 7, seed=0)
    train_sizes = [len(idx) for idx in result.train_indices]
    test_sizes = [len(idx) for idx in result.test_indices]
    assert max(train_sizes) - min(train_sizes) <= 1
    assert max(test_sizes) - min(test_sizes) <= 1
    assert sum(train_sizes) == len(train)
    assert min(train_sizes) == len(train) // 7
    np.testing.assert_array_equal(np.sort(np.concatenate(result.train_indices)), np.arange(len(train)))
    np.testing.assert_array_equal(np.sort(np.concatenate(result.test_indices)), np.arange(len(test)))
    assert result.method == "iid"
    assert result.beta is None


def test_iid_deterministic_for_seed(labels):
    train, test = labels
    first = iid_partition(train, test, 4, seed=1)
    second = iid_partition(train, test, 4, seed=1)
    other = iid_partition(train, test, 4, seed=2)
    for a, b in zip(first.train_indices + first.test_indices, second.train_indices + second.test_indices):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.train_indices[0], other.train_indices[0])


def test_partition_dispatch(labels):
    train, test = labels
    via_dispatch = partition("dirichlet", train, test, 6, beta=0.3, min_samples=4, seed=9)
    direct = dirichlet_partition(train, test, 6, beta=0.3, min_samples=4, seed=9)
    for a, b in zip(via_dispatch.train_indices, direct.train_indices):
        np.testing.assert_array_equal(a, b)
    iid = partition("iid", train, test, 6, seed=9)
    np.testing.assert_array_equal(iid.test_indices[2], iid_partition(train, test, 6, seed=9).test_indices[2])


def test_class_counts_json(labels):
    train, test = labels
    result = dirichlet_partition(train, test, 5, beta=0.5, min_samples=5, seed=2)
    counts = result.class_counts(train, test, NUM_CLASSES)
    restored = json.loads(json.dumps(counts))
    assert restored["method"] == "dirichlet"
    assert restored["beta"] == 0.5
    assert restored["seed"] == 2
    assert restored["num_clients"] == 5
    assert restored["attempts"] == result.attempts
    for j in range(5):
        expected_train = [int(np.sum(train[result.train_indices[j]] == c)) for c in range(NUM_CLASSES)]
        expected_test = [int(np.sum(test[result.test_indices[j]] == c)) for c in range(NUM_CLASSES)]
        assert restored["train"][j] == expected_train
        assert restored["test"][j] == expected_test
    assert np.sum(restored["train"]) == len(train)


def test_class_counts_rejects_label_outside_range(labels):
    train, test = labels
    result = iid_partition(train, test, 2, seed=0)
    with pytest.raises(ValueError, match="outside"):
        result.class_counts(train, test, num_classes=5)


def test_client_partition_num_clients():
    result = ClientPartition([np.arange(2), np.arange(2, 4)], [np.arange(1), np.arange(1, 2)], "iid", seed=0)
    assert result.num_clients == 2


SMALL_TRAIN = np.repeat(np.arange(2), 10)
SMALL_TEST = np.repeat(np.arange(2), 5)

INVALID = [
    # (keyword overrides, expected message fragment)
    ({"num_clients": 0}, "num_clients must be an int >= 1"),
    ({"num_clients": -3}, "num_clients must be an int >= 1"),
    ({"num_clients": 2.5}, "num_clients must be an int >= 1"),
    ({"num_clients": True}, "num_clients must be an int >= 1"),
    ({"beta": 0.0}, "beta must be a finite number > 0"),
    ({"beta": -1.0}, "beta must be a finite number > 0"),
    ({"beta": float("nan")}, "beta must be a finite number > 0"),
    ({"beta": float("inf")}, "beta must be a finite number > 0"),
    ({"min_samples": -1}, "min_samples must be an int >= 0"),
    ({"max_tries": 0}, "max_tries must be an int >= 1"),
    ({"num_clients": 21, "min_samples": 0}, "more than the 20 training samples"),
    ({"num_clients": 11, "min_samples": 0}, "more than the 10 test samples"),
    ({"num_clients": 4, "min_samples": 3}, "need 12 test samples"),
    ({"train_labels": SMALL_TRAIN.reshape(2, 10)}, "train_labels must be a 1-D array"),
    ({"train_labels": SMALL_TRAIN.astype(float)}, "train_labels must contain integer class ids"),
    ({"test_labels": SMALL_TEST - 1}, "test_labels must contain non-negative class ids"),
    ({"method": "pathological"}, "Unknown partition method 'pathological'"),
]


@pytest.mark.parametrize("overrides,fragment", INVALID)
def test_invalid_inputs(overrides, fragment):
    arguments = {
        "method": "dirichlet",
        "train_labels": SMALL_TRAIN,
        "test_labels": SMALL_TEST,
        "num_clients": 2,
        "beta": 0.5,
        "min_samples": 1,
        "seed": 0,
        "max_tries": 10,
    }
    arguments.update(overrides)
    method = arguments.pop("method")
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        partition(method, **arguments)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"num_clients": 0}, "num_clients must be an int >= 1"),
        ({"num_clients": 21}, "more than the 20 training samples"),
        ({"min_samples": 6}, "need 12 test samples"),
    ],
)
def test_iid_invalid_inputs(overrides, fragment):
    arguments = {"num_clients": 2, "seed": 0, "min_samples": 0}
    arguments.update(overrides)
    with pytest.raises(ValueError, match=fragment):
        iid_partition(SMALL_TRAIN, SMALL_TEST, **arguments)
