"""Seeded client sampling."""

import pytest

from fl2ora.federated.sampling import client_seed, num_sampled, sample_clients


@pytest.mark.parametrize(
    ("clients", "fraction", "expected"),
    [(100, 0.1, 10), (10, 0.5, 5), (10, 0.05, 1), (3, 1.0, 3), (7, 0.3, 2), (4, 0.125, 1)],
)
def test_num_sampled_rounds_fraction(clients, fraction, expected):
    assert num_sampled(clients, fraction) == expected


def test_sampling_is_deterministic_and_varies_by_round():
    first = sample_clients(100, 0.1, round_index=3, seed=7)
    assert first == sample_clients(100, 0.1, round_index=3, seed=7)
    assert len(first) == 10 and len(set(first)) == 10
    assert first == sorted(first)
    assert all(0 <= c < 100 for c in first)
    rounds = {tuple(sample_clients(100, 0.1, round_index=r, seed=7)) for r in range(1, 11)}
    assert len(rounds) > 1
    assert sample_clients(100, 0.1, round_index=3, seed=8) != first


def test_all_clients_first_round_option():
    assert sample_clients(20, 0.1, round_index=1, seed=0, all_clients_first_round=True) == list(range(20))
    assert len(sample_clients(20, 0.1, round_index=2, seed=0, all_clients_first_round=True)) == 2


def test_client_seed_depends_on_every_key():
    seeds = {client_seed(0, 1, 0), client_seed(1, 1, 0), client_seed(0, 2, 0), client_seed(0, 1, 1)}
    assert len(seeds) == 4
    assert client_seed(0, 1, 0) == client_seed(0, 1, 0)


@pytest.mark.parametrize(
    ("clients", "fraction", "round_index", "match"),
    [(0, 0.1, 1, "num_clients"), (10, 0.0, 1, r"fraction must be in \(0, 1\]"), (10, 1.5, 1, "fraction"), (10, 0.1, 0, "1-based")],
)
def test_sampling_invalid(clients, fraction, round_index, match):
    with pytest.raises(ValueError, match=match):
        sample_clients(clients, fraction, round_index, seed=0)
