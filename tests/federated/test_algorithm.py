"""Dispatch of the aggregation rules, with the state the runtime keeps."""

import pytest
import torch

from fl2ora.federated.aggregation import fedavg
from fl2ora.federated.algorithm import FederatedAlgorithm
from fl2ora.federated.client import ClientUpdate
from fl2ora.federated.rules import fednova_aggregate


def update(client_id: int, values: list[float], examples: int, steps: int) -> ClientUpdate:
    return ClientUpdate(client_id, {"w": torch.tensor(values)}, examples, steps, 0.5)


GLOBAL = {"w": torch.tensor([1.0, -1.0])}
UPDATES = [update(0, [2.0, 0.0], 10, 4), update(1, [0.0, 1.0], 30, 2)]


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_aggregate_by_size(name):
    algorithm = FederatedAlgorithm(name, num_clients=4, momentum=0.9, mu=0.1)
    new, server = algorithm.aggregate(GLOBAL, UPDATES, None)
    torch.testing.assert_close(new["w"], fedavg([u.state for u in UPDATES], [10, 30])["w"])
    # (10 * 2 + 30 * 0) / 40 = 0.5 and (10 * 0 + 30 * 1) / 40 = 0.75
    torch.testing.assert_close(new["w"], torch.tensor([0.5, 0.75]))
    assert server is None


def test_fednova_uses_steps_and_momentum():
    algorithm = FederatedAlgorithm("fednova", num_clients=4, momentum=0.5)
    new, _ = algorithm.aggregate(GLOBAL, UPDATES, None)
    expected = fednova_aggregate(GLOBAL, [u.state for u in UPDATES], [10, 30], [4, 2], 0.5)
    torch.testing.assert_close(new["w"], expected["w"])
    assert not torch.allclose(new["w"], torch.tensor([0.5, 0.75]))


def test_feddyn_keeps_client_and_server_state():
    alpha = 0.1
    algorithm = FederatedAlgorithm("feddyn", num_clients=2, momentum=0.0, alpha=alpha)
    client_state = algorithm.init_client_state(GLOBAL)
    server_state = algorithm.init_server_state(GLOBAL)
    assert torch.equal(client_state.gradient["w"], torch.zeros(2))

    new_client = algorithm.update_client_state(client_state, UPDATES[0], GLOBAL)
    # g <- g - alpha * (theta_k - theta_global) = -0.1 * ([2, 0] - [1, -1]) = [-0.1, -0.1]
    torch.testing.assert_close(new_client.gradient["w"], torch.tensor([-0.1, -0.1]))

    new_global, new_server = algorithm.aggregate(GLOBAL, UPDATES, server_state)
    # h = -alpha / m * sum(theta_k - theta) = -0.05 * ([1, 1] + [-1, 2]) = [0, -0.15]
    torch.testing.assert_close(new_server.h["w"], torch.tensor([0.0, -0.15]))
    # theta = mean(theta_k) - h / alpha = [1, 0.5] - [0, -1.5] = [1, 2]
    torch.testing.assert_close(new_global["w"], torch.tensor([1.0, 2.0]))


def test_penalties_only_for_fedprox_and_feddyn():
    device = torch.device("cpu")
    parameters = {"w": torch.tensor([3.0, -1.0], requires_grad=True)}
    prox = FederatedAlgorithm("fedprox", 2, 0.9, mu=0.5).client_penalty(GLOBAL, None, device)
    # mu / 2 * ||[2, 0]||^2 = 0.25 * 4 = 1
    assert prox(parameters).item() == pytest.approx(1.0)
    assert FederatedAlgorithm("fedavg", 2, 0.9).client_penalty(GLOBAL, None, device) is None
    assert FederatedAlgorithm("fednova", 2, 0.9).client_penalty(GLOBAL, None, device) is None
    dyn = FederatedAlgorithm("feddyn", 2, 0.9, alpha=0.1)
    penalty = dyn.client_penalty(GLOBAL, dyn.init_client_state(GLOBAL), device)
    # -<0, theta> + alpha / 2 * ||[2, 0]||^2 = 0.05 * 4 = 0.2
    assert penalty(parameters).item() == pytest.approx(0.2)


def test_unknown_rule_rejected():
    with pytest.raises(ValueError, match="Unknown aggregation 'fedsgd'"):
        FederatedAlgorithm("fedsgd", 2, 0.9).aggregate(GLOBAL, UPDATES, None)
