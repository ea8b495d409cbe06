"""FedProx, FedDyn and FedNova against hand formulas, numpy and simulated SGD."""

import numpy as np
import pytest
import torch
from torch import nn

from fl2ora.federated.aggregation import fedavg
from fl2ora.federated.rules import (
    FedDynClientState,
    FedDynServerState,
    feddyn_aggregate,
    feddyn_client_alpha,
    feddyn_client_state_update,
    feddyn_penalty,
    fednova_aggregate,
    fednova_norm,
    init_feddyn_client_state,
    init_feddyn_server_state,
    proximal_penalty,
)


def random_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)}


def live_parameters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone().requires_grad_(True) for name, tensor in state.items()}


def train_linear(mu: float | None, steps: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train nn.Linear(4, 3) from a fixed start with SGD + momentum, optionally with the FedProx term.

    Returns the trained and the starting parameters.
    """
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 4, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        if mu is not None:
            loss = loss + proximal_penalty(dict(model.named_parameters()), start, mu)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, start


def squared_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[name] - b[name]).pow(2).sum()) for name in a)


# ---------------------------------------------------------------------------
# FedProx
# ---------------------------------------------------------------------------


def test_fedprox_mu_zero_matches_plain_training():
    plain, _ = train_linear(mu=None)
    prox, _ = train_linear(mu=0.0)
    for name in plain:
        assert torch.equal(plain[name], prox[name]), name


def test_fedprox_positive_mu_stays_closer_to_global():
    plain, start = train_linear(mu=None, steps=5)
    prox, _ = train_linear(mu=5.0, steps=5)
    assert squared_distance(prox, start) < squared_distance(plain, start)


@pytest.mark.parametrize("mu", [0.0, 0.01, 1.0, 3.5])
def test_proximal_penalty_value_and_gradient(mu):
    global_state = random_state(0)
    parameters = live_parameters(random_state(1))
    penalty = proximal_penalty(parameters, global_state, mu)
    penalty.backward()

    expected = 0.5 * mu * sum(
        np.sum((parameters[n].detach().numpy().astype(np.float64) - global_state[n].numpy()) ** 2)
        for n in global_state
    )
    assert penalty.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    for name in global_state:
        expected_grad = mu * (parameters[name].detach() - global_state[name])
        torch.testing.assert_close(parameters[name].grad, expected_grad)


def test_proximal_penalty_leaves_global_state_without_gradient():
    global_state = random_state(0)
    parameters = live_parameters(random_state(1))
    proximal_penalty(parameters, global_state, 1.0).backward()
    assert all(t.grad is None for t in global_state.values())


# ---------------------------------------------------------------------------
# FedNova
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1, 2, 5, 10])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_fednova_norm_matches_simulated_momentum_sgd(tau, rho):
    # Loss <g, w> has the constant gradient g, so tau steps of momentum SGD move w by -lr * ||a||_1 * g.
    lr = 0.1
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=lr, momentum=rho)
    for _ in range(tau):
        optimizer.zero_grad()
        (g * w).sum().backward()
        optimizer.step()
    simulated_norm = (-w.detach() / (lr * g)).numpy()
    np.testing.assert_allclose(simulated_norm, fednova_norm(tau, rho), rtol=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_fednova_norm_equals_sum_of_coefficients(rho):
    tau = 6
    coefficients = [(1 - rho ** (tau - k)) / (1 - rho) for k in range(tau)]
    assert fednova_norm(tau, rho) == pytest.approx(sum(coefficients), rel=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_fednova_equal_steps_matches_fedavg(momentum, steps):
    global_state = random_state(10)
    clients = [random_state(seed) for seed in range(3)]
    sizes = [5, 20, 75]
    result = fednova_aggregate(global_state, clients, sizes, [steps] * 3, momentum)
    expected = fedavg(clients, sizes)
    for name in global_state:
        torch.testing.assert_close(result[name], expected[name], rtol=1e-5, atol=1e-6)
        assert result[name].dtype == torch.float32


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_fednova_unequal_steps_matches_numpy(momentum):
    global_state = random_state(10)
    clients = [random_state(seed) for seed in range(3)]
    sizes = np.array([5.0, 20.0, 75.0])
    steps = [1, 3, 12]
    result = fednova_aggregate(global_state, clients, sizes.astype(int).tolist(), steps, momentum)

    rho = momentum
    norms = np.array([sum(rho**j for k in range(1, t + 1) for j in range(k)) for t in steps])
    p = sizes / sizes.sum()
    tau_eff = float(np.sum(p * norms))
    for name in global_state:
        start = global_state[name].numpy().astype(np.float64)
        directions = [(start - c[name].numpy().astype(np.float64)) / a for c, a in zip(clients, norms)]
        expected = start - tau_eff * sum(pi * d for pi, d in zip(p, directions))
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-5, atol=1e-6)

        fedavg_value = np.average([c[name].numpy() for c in clients], axis=0, weights=sizes)
        assert not np.allclose(result[name].numpy(), fedavg_value, atol=1e-4)


def test_fednova_hand_example():
    # Momentum 0, so a = [1, 3] and d = [(0 - -1) / 1, (0 - -6) / 3] = [1, 2], with p = [1/4, 3/4].
    # tau_eff = 1/4 * 1 + 3/4 * 3 = 2.5
    # theta = 0 - 2.5 * (1/4 * 1 + 3/4 * 2) = -4.375
    # (FedAvg would give 1/4 * -1 + 3/4 * -6 = -4.75.)
    result = fednova_aggregate({"w": torch.tensor([0.0])}, [{"w": torch.tensor([-1.0])}, {"w": torch.tensor([-6.0])}],
                               [1, 3], [1, 3], momentum=0.0)
    assert result["w"].tolist() == [-4.375]


def test_fednova_does_not_modify_inputs():
    global_state = random_state(10)
    clients = [random_state(0), random_state(1)]
    copies = [{k: v.clone() for k, v in s.items()} for s in [global_state, *clients]]
    fednova_aggregate(global_state, clients, [3, 4], [2, 5], 0.9)
    for state, copy in zip([global_state, *clients], copies):
        assert all(torch.equal(state[k], copy[k]) for k in state)


# ---------------------------------------------------------------------------
# FedDyn
# ---------------------------------------------------------------------------


def scalar_state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value])}


def test_feddyn_two_rounds_by_hand():
    # m = 2 clients, alpha = 0.1, theta^0 = 0, h^0 = 0, g_1 = g_2 = 0.
    alpha, m = 0.1, 2
    theta = scalar_state(0.0)
    server = init_feddyn_server_state(theta)
    clients = [init_feddyn_client_state(theta), init_feddyn_client_state(theta)]

    # Round 1: both clients train, reaching theta_1 = 1 and theta_2 = 3.
    #   g_1 = 0 - 0.1 * (1 - 0) = -0.1,  g_2 = 0 - 0.1 * (3 - 0) = -0.3
    #   h^1 = 0 - 0.1 * (1/2) * (1 + 3) = -0.2
    #   theta^1 = (1 + 3) / 2 - (1 / 0.1) * -0.2 = 2 + 2 = 4
    trained = [scalar_state(1.0), scalar_state(3.0)]
    clients = [feddyn_client_state_update(c, t, theta, alpha) for c, t in zip(clients, trained)]
    theta, server = feddyn_aggregate(theta, trained, server, num_clients_total=m, alpha=alpha)
    assert clients[0].gradient["w"].item() == pytest.approx(-0.1)
    assert clients[1].gradient["w"].item() == pytest.approx(-0.3)
    assert server.h["w"].item() == pytest.approx(-0.2)
    assert theta["w"].item() == pytest.approx(4.0)

    # Round 2: only client 1 trains, reaching theta_1 = 5 (drift 5 - 4 = 1). Client 2 keeps g_2.
    #   g_1 = -0.1 - 0.1 * 1 = -0.2
    #   h^2 = -0.2 - 0.1 * (1/2) * 1 = -0.25
    #   theta^2 = 5 - (1 / 0.1) * -0.25 = 7.5
    trained = [scalar_state(5.0)]
    clients[0] = feddyn_client_state_update(clients[0], trained[0], theta, alpha)
    theta, server = feddyn_aggregate(theta, trained, server, num_clients_total=m, alpha=alpha)
    assert clients[0].gradient["w"].item() == pytest.approx(-0.2)
    assert clients[1].gradient["w"].item() == pytest.approx(-0.3)
    assert server.h["w"].item() == pytest.approx(-0.25)
    assert theta["w"].item() == pytest.approx(7.5)


def test_feddyn_aggregate_matches_numpy():
    alpha, m = 0.05, 10
    global_state = random_state(10)
    h = random_state(11)
    trained = [random_state(seed) for seed in range(3)]
    new_global, new_server = feddyn_aggregate(global_state, trained, FedDynServerState(h=h), m, alpha)
    for name in global_state:
        start = global_state[name].numpy().astype(np.float64)
        thetas = np.stack([t[name].numpy().astype(np.float64) for t in trained])
        expected_h = h[name].numpy() - alpha / m * np.sum(thetas - start, axis=0)
        expected_theta = thetas.mean(axis=0) - expected_h / alpha
        np.testing.assert_allclose(new_server.h[name].numpy(), expected_h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_global[name].numpy(), expected_theta, rtol=1e-5, atol=1e-5)
        assert new_global[name].dtype == torch.float32


def test_feddyn_penalty_gradient_matches_formula():
    alpha = 0.3
    global_state = random_state(0)
    client_state = FedDynClientState(gradient=random_state(2))
    parameters = live_parameters(random_state(1))
    penalty = feddyn_penalty(parameters, global_state, client_state, alpha)
    penalty.backward()

    expected = sum(
        -np.sum(client_state.gradient[n].numpy() * parameters[n].detach().numpy())
        + 0.5 * alpha * np.sum((parameters[n].detach().numpy() - global_state[n].numpy()) ** 2)
        for n in global_state
    )
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    for name in global_state:
        expected_grad = -client_state.gradient[name] + alpha * (parameters[name].detach() - global_state[name])
        torch.testing.assert_close(parameters[name].grad, expected_grad)


def test_feddyn_client_state_update_matches_formula():
    alpha = 0.2
    state = FedDynClientState(gradient=random_state(2))
    trained, start = random_state(1), random_state(0)
    new = feddyn_client_state_update(state, trained, start, alpha)
    for name in start:
        expected = state.gradient[name] - alpha * (trained[name] - start[name])
        torch.testing.assert_close(new.gradient[name], expected)
    assert new.gradient is not state.gradient


def test_feddyn_initial_states_are_zeros():
    template = random_state(0)
    client, server = init_feddyn_client_state(template), init_feddyn_server_state(template)
    for name, tensor in template.items():
        assert torch.equal(client.gradient[name], torch.zeros_like(tensor))
        assert torch.equal(server.h[name], torch.zeros_like(tensor))


def test_feddyn_client_alpha_scales_by_data_size():
    # Clients of sizes 50, 100, 150 (mean 100): alpha_k = 0.1 * 100 / n_k.
    sizes = [50, 100, 150]
    mean = sum(sizes) / len(sizes)
    assert [feddyn_client_alpha(0.1, n, mean) for n in sizes] == pytest.approx([0.2, 0.1, 0.1 * 100 / 150])


# ---------------------------------------------------------------------------
# Invalid inputs
# ---------------------------------------------------------------------------

ONE = {"w": torch.zeros(2)}
OTHER_NAME = {"v": torch.zeros(2)}
OTHER_SHAPE = {"w": torch.zeros(3)}
LIVE = {"w": torch.zeros(2, requires_grad=True)}
ZERO_CLIENT = FedDynClientState(gradient={"w": torch.zeros(2)})
ZERO_SERVER = FedDynServerState(h={"w": torch.zeros(2)})


@pytest.mark.parametrize(
    ("call", "match"),
    [
        # FedProx: negative, infinite or NaN mu, and empty or mismatched parameters.
        (lambda: proximal_penalty(LIVE, ONE, -0.1), r"mu must be .* got -0\.1"),
        (lambda: proximal_penalty(LIVE, ONE, float("inf")), "mu must be"),
        (lambda: proximal_penalty(LIVE, ONE, float("nan")), "mu must be"),
        (lambda: proximal_penalty({}, ONE, 0.1), "parameters is empty"),
        (lambda: proximal_penalty(LIVE, OTHER_NAME, 0.1), "different tensor names"),
        (lambda: proximal_penalty(LIVE, OTHER_SHAPE, 0.1), r"shape \(2,\)"),
        # FedDyn: non-positive alpha, mismatched states, bad participant counts.
        (lambda: feddyn_penalty(LIVE, ONE, ZERO_CLIENT, 0.0), r"alpha must be .* got 0\.0"),
        (lambda: feddyn_penalty(LIVE, ONE, ZERO_CLIENT, -1.0), "alpha must be"),
        (lambda: feddyn_penalty(LIVE, ONE, FedDynClientState(gradient=OTHER_SHAPE), 0.1), "client_state.gradient"),
        (lambda: feddyn_client_state_update(ZERO_CLIENT, ONE, ONE, 0.0), "alpha must be"),
        (lambda: feddyn_client_state_update(ZERO_CLIENT, OTHER_NAME, ONE, 0.1), "different tensor names"),
        (lambda: feddyn_aggregate(ONE, [ONE, ONE, ONE], ZERO_SERVER, 2, 0.1), "num_clients_total is 2 but 3"),
        (lambda: feddyn_aggregate(ONE, [], ZERO_SERVER, 2, 0.1), "zero updates"),
        (lambda: feddyn_aggregate(ONE, [ONE], ZERO_SERVER, 2, float("nan")), "alpha must be"),
        (lambda: feddyn_aggregate(ONE, [ONE], ZERO_SERVER, 2.5, 0.1), "num_clients_total must be an int"),
        (lambda: feddyn_aggregate(ONE, [OTHER_SHAPE], ZERO_SERVER, 2, 0.1), "client_states_trained"),
        (lambda: feddyn_aggregate(ONE, [ONE], FedDynServerState(h=OTHER_NAME), 2, 0.1), "server_state.h"),
        (lambda: feddyn_client_alpha(0.1, 0, 100.0), "num_examples and mean_num_examples must be > 0"),
        # FedNova: bad step counts, momentum outside [0, 1), length or state mismatches.
        (lambda: fednova_norm(0, 0.9), "num_steps must be an int >= 1, got 0"),
        (lambda: fednova_norm(2.5, 0.9), "num_steps must be an int"),
        (lambda: fednova_norm(True, 0.9), "num_steps must be an int"),
        (lambda: fednova_norm(3, 1.0), r"momentum must be in \[0, 1\), got 1\.0"),
        (lambda: fednova_norm(3, -0.1), "momentum must be in"),
        (lambda: fednova_aggregate(ONE, [ONE, ONE], [1, 1], [1, 0], 0.9), "num_steps must be an int >= 1, got 0"),
        (lambda: fednova_aggregate(ONE, [ONE, ONE], [1], [1, 1], 0.9), "2 updates, 1 example counts"),
        (lambda: fednova_aggregate(ONE, [ONE, ONE], [1, 1], [1], 0.9), "1 step counts"),
        (lambda: fednova_aggregate(ONE, [ONE, ONE], [1, 0], [1, 1], 0.9), "positive example count"),
        (lambda: fednova_aggregate(ONE, [], [], [], 0.9), "zero updates"),
        (lambda: fednova_aggregate(ONE, [ONE, OTHER_NAME], [1, 1], [1, 1], 0.9), "different tensor names"),
        (lambda: fednova_aggregate(ONE, [ONE], [1], [1], 1.5), "momentum must be in"),
    ],
)
def test_invalid_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
