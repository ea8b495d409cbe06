"""Seeded client sampling, keyed on client ids so every runtime samples the same clients."""

from __future__ import annotations

import math

import numpy as np


def num_sampled(num_clients: int, fraction: float) -> int:
    """Return how many clients a round samples: ``max(1, round(fraction * K))``."""
    return max(1, min(num_clients, int(math.floor(fraction * num_clients + 0.5))))


def sample_clients(
    num_clients: int,
    fraction: float,
    round_index: int,
    seed: int,
    all_clients_first_round: bool = False,
) -> list[int]:
    """Choose the clients trained in one round, without replacement.

    The draw depends only on ``(seed, round_index)``, so a resumed or distributed
    run samples the same clients as an uninterrupted in-process one.

    Args:
        num_clients: K, the number of clients.
        fraction: share of clients per round, in (0, 1].
        round_index: 1-based round number.
        seed: run seed.
        all_clients_first_round: return every client in round 1.

    Returns:
        Sorted client ids.

    Raises:
        ValueError: on a fraction outside (0, 1], K < 1 or a round below 1.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients!r}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    if round_index < 1:
        raise ValueError(f"round_index is 1-based, got {round_index!r}.")
    if all_clients_first_round and round_index == 1:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_index])
    chosen = rng.choice(num_clients, size=num_sampled(num_clients, fraction), replace=False)
    return sorted(int(c) for c in chosen)


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """Derive the seed of one client's local update (data order, dropout)."""
    return int(np.random.default_rng([seed, round_index, client_id, 7]).integers(0, 2**31 - 1))
