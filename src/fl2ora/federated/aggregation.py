"""Aggregation rules as pure functions over state dicts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def check_compatible(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Check that every state has the same tensor names and shapes as the first.

    Raises:
        ValueError: naming the first differing state, key or shape.
    """
    if not states:
        raise ValueError("Cannot aggregate zero updates; at least one client must reply.")
    reference = states[0]
    for index, state in enumerate(states[1:], start=1):
        if set(state) != set(reference):
            diff = sorted(set(state) ^ set(reference))
            raise ValueError(f"Update {index} has different tensor names than update 0: {diff[:5]}.")
        for name, tensor in state.items():
            if tensor.shape != reference[name].shape:
                raise ValueError(
                    f"Update {index} tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"update 0 has {tuple(reference[name].shape)}."
                )


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Average state dicts with non-negative weights, accumulated in float64.

    ``result[k] = sum_i w_i * states[i][k] / sum_i w_i``, cast back to the dtype of
    ``states[0][k]``.

    Raises:
        ValueError: on incompatible states, a length mismatch, or weights that are
            negative, non-finite or sum to zero.
    """
    check_compatible(states)
    if len(weights) != len(states):
        raise ValueError(f"Got {len(states)} updates but {len(weights)} weights.")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad or sum(weights) <= 0:
        raise ValueError(f"Aggregation weights must be finite, >= 0 and not all zero, got {list(weights)}.")
    total = float(sum(weights))
    result: StateDict = {}
    for name, first in states[0].items():
        accumulator = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            accumulator += state[name].detach().to("cpu", torch.float64) * (weight / total)
        result[name] = accumulator.to(first.dtype)
    return result


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], num_examples: Sequence[int]) -> StateDict:
    """FedAvg (McMahan et al. 2017): average weighted by each client's training-set size.

    >>> a = {"w": torch.tensor([0.0, 3.0])}
    >>> b = {"w": torch.tensor([4.0, 3.0])}
    >>> fedavg([a, b], [1, 3])["w"].tolist()
    [3.0, 3.0]

    Raises:
        ValueError: when a client reports a non-positive example count, or on
            incompatible states.
    """
    bad = [n for n in num_examples if not n > 0]
    if bad:
        raise ValueError(f"Every client must report a positive example count, got {list(num_examples)}.")
    return weighted_average(states, [float(n) for n in num_examples])
