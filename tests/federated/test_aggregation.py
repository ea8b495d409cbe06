"""FedAvg and the weighted average against numpy."""

import numpy as np
import pytest
import torch

from fl2ora.federated.aggregation import fedavg, weighted_average


def random_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)}


@pytest.mark.parametrize("sizes", [[1], [10, 30], [7, 7, 7], [100, 1, 50, 3]])
def test_fedavg_matches_numpy_weighted_mean(sizes):
    states = [random_state(seed) for seed in range(len(sizes))]
    result = fedavg(states, sizes)
    for name in ("a", "b"):
        stacked = np.stack([s[name].numpy().astype(np.float64) for s in states])
        expected = np.average(stacked, axis=0, weights=np.array(sizes, dtype=np.float64))
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert result[name].dtype == torch.float32


def test_fedavg_hand_example():
    # (1 * [0, 3] + 3 * [4, 3]) / 4 = [3, 3]
    result = fedavg([{"w": torch.tensor([0.0, 3.0])}, {"w": torch.tensor([4.0, 3.0])}], [1, 3])
    assert result["w"].tolist() == [3.0, 3.0]


def test_fedavg_does_not_modify_inputs():
    states = [random_state(0), random_state(1)]
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    fedavg(states, [2, 5])
    for state, copy in zip(states, copies):
        assert all(torch.equal(state[k], copy[k]) for k in state)


@pytest.mark.parametrize(
    ("states", "sizes", "match"),
    [
        ([], [], "zero updates"),
        ([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], [1, 1], "different tensor names"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], [1, 1], r"shape \(3,\)"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(2)}], [1], "2 updates but 1 weights"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(2)}], [1, 0], "positive example count"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(2)}], [1, -4], "positive example count"),
    ],
)
def test_fedavg_invalid_inputs(states, sizes, match):
    with pytest.raises(ValueError, match=match):
        fedavg(states, sizes)


@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [float("inf"), 1.0], [0.0, 0.0], [-1.0, 2.0]])
def test_weighted_average_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="finite, >= 0 and not all zero"):
        weighted_average([{"a": torch.zeros(2)}, {"a": torch.ones(2)}], weights)
