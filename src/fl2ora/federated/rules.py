"""FedProx, FedDyn and FedNova as pure functions over state dicts and explicit state objects.

Each rule splits into a client part (a penalty added to the local loss, or a state
update after local training) and a server part (an aggregation). Both runtimes, the
in-process simulation and Flower, call these functions and keep the state objects
themselves. State dicts map tensor names to fp32 CPU tensors, as produced by
:func:`fl2ora.model.trainable.trainable_state_dict`. Every function returns new
tensors and leaves its inputs unchanged.

References:
    FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
    FedDyn: Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021.
    FedNova: Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
    Federated Optimization", NeurIPS 2020.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fl2ora.federated.aggregation import StateDict, check_compatible, weighted_average

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _check_states_match(states: Sequence[Mapping[str, torch.Tensor]], names: str) -> None:
    """Run :func:`check_compatible` and name the arguments in the error."""
    try:
        check_compatible(states)
    except ValueError as error:
        raise ValueError(f"{names} must have the same tensor names and shapes: {error}") from error


def _check_parameters(parameters: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> None:
    if not parameters:
        raise ValueError("parameters is empty. Pass the trainable parameters, e.g. {n: p for n, p in "
                         "model.named_parameters() if p.requires_grad}.")
    _check_states_match([global_state, parameters], "global_state and parameters")


def _check_mu(mu: float) -> None:
    if not (isinstance(mu, numbers.Real) and math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}. Use 0 for FedAvg or e.g. 0.01.")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}. Try 0.01 or 0.1.")


def _check_momentum(momentum: float) -> None:
    if not (isinstance(momentum, numbers.Real) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}. Use the client's SGD momentum, e.g. 0.9.")


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(
            f"num_steps must be an int >= 1, got {num_steps!r}. Pass ClientUpdate.num_steps of a client "
            "that trained on at least one batch."
        )


def _to_float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float64)


# ---------------------------------------------------------------------------
# FedProx
# ---------------------------------------------------------------------------


def proximal_penalty(
    parameters: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    mu: float,
) -> torch.Tensor:
    """Compute the FedProx proximal term ``mu/2 * sum_k ||w_k - w_global_k||^2``.

    Add the result to each local loss. Its gradient is ``mu * (w - w_global)``. The
    server aggregates FedProx updates with plain FedAvg
    (:func:`fl2ora.federated.aggregation.fedavg`).

    Args:
        parameters: name -> live trainable parameter (``requires_grad``, any device).
        global_state: name -> global tensor received this round, same names and shapes.
        mu: proximal coefficient, >= 0. With 0 the term is zero and so is its gradient.

    Returns:
        () scalar on the device and dtype of the parameters, differentiable with
        respect to ``parameters``.

    Raises:
        ValueError: when mu is negative or not finite, ``parameters`` is empty, or the
            names or shapes differ from ``global_state``.

    >>> w = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    >>> proximal_penalty(w, {"w": torch.zeros(2)}, mu=0.5).item()  # 0.25 * (1 + 4)
    1.25
    """
    _check_mu(mu)
    _check_parameters(parameters, global_state)
    squared_distance = sum(
        (parameter - global_state[name].to(parameter.device, parameter.dtype)).pow(2).sum()
        for name, parameter in parameters.items()
    )
    return 0.5 * mu * squared_distance


# ---------------------------------------------------------------------------
# FedDyn
# ---------------------------------------------------------------------------


@dataclass
class FedDynClientState:
    """The state one FedDyn client keeps between the rounds it takes part in."""

    gradient: StateDict
    """The client's ``grad L_k(theta_k^{t-1})`` term, fp32 CPU, zeros before its first round."""


@dataclass
class FedDynServerState:
    """The state the FedDyn server keeps between rounds."""

    h: StateDict
    """The server's correction ``h^t``, fp32 CPU, zeros before round 1."""


def init_feddyn_client_state(state: Mapping[str, torch.Tensor]) -> FedDynClientState:
    """Create a client state of fp32 CPU zeros shaped like ``state``.

    >>> init_feddyn_client_state({"w": torch.ones(2)}).gradient["w"].tolist()
    [0.0, 0.0]
    """
    return FedDynClientState(gradient={name: torch.zeros(t.shape, dtype=torch.float32) for name, t in state.items()})


def init_feddyn_server_state(state: Mapping[str, torch.Tensor]) -> FedDynServerState:
    """Create a server state of fp32 CPU zeros shaped like ``state``.

    >>> init_feddyn_server_state({"w": torch.ones(3)}).h["w"].tolist()
    [0.0, 0.0, 0.0]
    """
    return FedDynServerState(h={name: torch.zeros(t.shape, dtype=torch.float32) for name, t in state.items()})


def feddyn_client_alpha(alpha: float, num_examples: int, mean_num_examples: float) -> float:
    """Scale alpha by the client's data size, as FedDyn's released code does.

    ``alpha_k = alpha * mean_num_examples / num_examples``, where the mean runs over
    all clients, so clients with more data get a weaker regularizer. Pass ``alpha_k``
    to :func:`feddyn_penalty` and :func:`feddyn_client_state_update` for that client,
    and the unscaled ``alpha`` to :func:`feddyn_aggregate`. The server step then
    matches the released code too, because there ``-h / alpha`` is the mean over all
    clients of their summed drifts ``theta_k - theta^{t-1}``, whichever alpha each
    client used.

    Args:
        alpha: the run's FedDyn coefficient, > 0.
        num_examples: this client's training samples, > 0.
        mean_num_examples: mean training samples over all clients, > 0.

    Raises:
        ValueError: when alpha, num_examples or mean_num_examples is not positive.

    >>> feddyn_client_alpha(0.1, num_examples=200, mean_num_examples=100.0)
    0.05
    """
    _check_alpha(alpha)
    if not num_examples > 0 or not mean_num_examples > 0:
        raise ValueError(
            f"num_examples and mean_num_examples must be > 0, got {num_examples!r} and {mean_num_examples!r}. "
            "Pass the client's training-set size and the mean size over all clients."
        )
    return float(alpha) * float(mean_num_examples) / float(num_examples)


def feddyn_penalty(
    parameters: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    client_state: FedDynClientState,
    alpha: float,
) -> torch.Tensor:
    """Compute the FedDyn regularizer ``-<g_k, theta> + alpha/2 * ||theta - theta^{t-1}||^2``.

    Add it to the client's local loss ``L_k(theta)``, which gives the local objective
    of Algorithm 1 in Acar et al. (2021). Here ``g_k = client_state.gradient`` and
    ``theta^{t-1} = global_state``. The gradient of the term is
    ``-g_k + alpha * (theta - theta^{t-1})``.

    Args:
        parameters: name -> live trainable parameter (``requires_grad``, any device).
        global_state: name -> global tensor received this round.
        client_state: this client's FedDyn state.
        alpha: FedDyn coefficient, > 0 (see :func:`feddyn_client_alpha` for the
            released code's per-client scaling).

    Returns:
        () scalar on the device and dtype of the parameters, differentiable with
        respect to ``parameters``.

    Raises:
        ValueError: when alpha is not positive and finite, ``parameters`` is empty, or
            the names or shapes of the three state dicts differ.

    >>> theta = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    >>> state = FedDynClientState(gradient={"w": torch.tensor([1.0, 1.0])})
    >>> feddyn_penalty(theta, {"w": torch.zeros(2)}, state, alpha=0.5).item()  # -(1 + 2) + 0.25 * 5
    -1.75
    """
    _check_alpha(alpha)
    _check_parameters(parameters, global_state)
    _check_states_match([global_state, client_state.gradient], "global_state and client_state.gradient")
    linear_term = 0.0
    squared_distance = 0.0
    for name, parameter in parameters.items():
        gradient = client_state.gradient[name].to(parameter.device, parameter.dtype)
        linear_term = linear_term + (gradient * parameter).sum()
        squared_distance = squared_distance + (
            parameter - global_state[name].to(parameter.device, parameter.dtype)
        ).pow(2).sum()
    return -linear_term + 0.5 * alpha * squared_distance


def feddyn_client_state_update(
    client_state: FedDynClientState,
    trained_state: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    alpha: float,
) -> FedDynClientState:
    """Compute a client's new gradient term after local training.

    ``g_k <- g_k - alpha * (theta_k^t - theta^{t-1})``. Clients that did not take part
    in the round keep their state.

    Args:
        client_state: the state used during this round's local training.
        trained_state: ``theta_k^t``, the client's state dict after local training.
        global_state: ``theta^{t-1}``, the global state dict the client started from.
        alpha: the same coefficient the client used in :func:`feddyn_penalty`.

    Returns:
        A new state with fp32 CPU tensors, computed in float64.

    Raises:
        ValueError: when alpha is not positive and finite, or the names or shapes of
            the three state dicts differ.

    >>> state = init_feddyn_client_state({"w": torch.zeros(1)})
    >>> new = feddyn_client_state_update(state, {"w": torch.tensor([3.0])}, {"w": torch.tensor([1.0])}, 0.5)
    >>> new.gradient["w"].tolist()  # 0 - 0.5 * (3 - 1)
    [-1.0]
    """
    _check_alpha(alpha)
    _check_states_match(
        [global_state, trained_state, client_state.gradient],
        "global_state, trained_state and client_state.gradient",
    )
    gradient: StateDict = {}
    for name, old in client_state.gradient.items():
        drift = _to_float64(trained_state[name]) - _to_float64(global_state[name])
        gradient[name] = (_to_float64(old) - alpha * drift).to(torch.float32)
    return FedDynClientState(gradient=gradient)


def feddyn_aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states_trained: Sequence[Mapping[str, torch.Tensor]],
    server_state: FedDynServerState,
    num_clients_total: int,
    alpha: float,
) -> tuple[StateDict, FedDynServerState]:
    """Run the FedDyn server step of Algorithm 1 in Acar et al. (2021).

    With ``P_t`` the clients that trained this round and ``m`` the number of all
    clients::

        h^t     = h^{t-1} - alpha * (1/m) * sum_{k in P_t} (theta_k^t - theta^{t-1})
        theta^t = (1/|P_t|) * sum_{k in P_t} theta_k^t - (1/alpha) * h^t

    NOTE: the mean over ``P_t`` is unweighted, as in the paper and in its released
    code. The released code weights the clients' alpha by their data size instead
    (see :func:`feddyn_client_alpha`), which leaves this step unchanged.

    Args:
        global_state: ``theta^{t-1}``, name -> tensor sent to the clients this round.
        client_states_trained: ``theta_k^t`` for each client in ``P_t``, K state dicts.
        server_state: ``h^{t-1}``.
        num_clients_total: ``m``, the number of clients in the federation (sampled or
            not), >= K.
        alpha: FedDyn coefficient, > 0, the unscaled value in every case.

    Returns:
        ``(theta^t, FedDynServerState(h^t))``, fp32 CPU tensors computed in float64.

    Raises:
        ValueError: when no client trained, num_clients_total is smaller than K,
            alpha is not positive and finite, or the state dicts differ in names or
            shapes.

    >>> theta, server = feddyn_aggregate(
    ...     {"w": torch.zeros(1)}, [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}],
    ...     init_feddyn_server_state({"w": torch.zeros(1)}), num_clients_total=4, alpha=0.5)
    >>> server.h["w"].tolist()  # 0 - 0.5 * (1/4) * (1 + 3)
    [-0.5]
    >>> theta["w"].tolist()  # (1 + 3) / 2 + 0.5 / 0.5
    [3.0]
    """
    _check_alpha(alpha)
    num_participants = len(client_states_trained)
    if num_participants == 0:
        raise ValueError("Cannot aggregate zero updates. At least one client must reply.")
    if isinstance(num_clients_total, bool) or not isinstance(num_clients_total, numbers.Integral):
        raise ValueError(f"num_clients_total must be an int, got {num_clients_total!r}.")
    if num_clients_total < num_participants:
        raise ValueError(
            f"num_clients_total is {num_clients_total} but {num_participants} clients took part. "
            "Pass the number of all clients in the federation, not of those sampled."
        )
    _check_states_match([global_state, server_state.h], "global_state and server_state.h")
    _check_states_match([global_state, *client_states_trained], "global_state and client_states_trained")

    new_global: StateDict = {}
    new_h: StateDict = {}
    for name, reference in global_state.items():
        start = _to_float64(reference)
        trained_sum = sum(_to_float64(state[name]) for state in client_states_trained)
        drift_sum = trained_sum - num_participants * start

        h = _to_float64(server_state.h[name]) - alpha * drift_sum / num_clients_total
        new_h[name] = h.to(torch.float32)
        new_global[name] = (trained_sum / num_participants - h / alpha).to(torch.float32)

    logger.debug("FedDyn: aggregated %d of %d clients, alpha %s", num_participants, num_clients_total, alpha)
    return new_global, FedDynServerState(h=new_h)


# ---------------------------------------------------------------------------
# FedNova
# ---------------------------------------------------------------------------


def fednova_norm(num_steps: int, momentum: float) -> float:
    """Compute ``||a||_1``, FedNova's normalizer for SGD with heavy-ball momentum.

    After ``tau`` steps with momentum ``rho`` from a zero momentum buffer, the
    displacement is ``lr * sum_k a_k * grad_k`` with
    ``a_k = (1 - rho^(tau-k)) / (1 - rho)``, ``k = 0 .. tau-1``, so::

        ||a||_1 = (tau - rho * (1 - rho^tau) / (1 - rho)) / (1 - rho)

    which is ``tau`` for ``rho = 0``. This matches ``torch.optim.SGD`` with
    ``dampening=0``, ``nesterov=False`` and a constant learning rate, and a fresh
    optimizer per client update, as in :func:`fl2ora.federated.client.client_update`.

    NOTE: weight decay counts as part of the gradient, as in FedNova's released code,
    so it does not change ``a``.

    Args:
        num_steps: ``tau``, optimizer steps taken by the client, >= 1.
        momentum: ``rho``, the client's SGD momentum, in [0, 1).

    Raises:
        ValueError: when num_steps < 1 or momentum is outside [0, 1).

    >>> fednova_norm(2, 0.5)  # a = [(1 - 0.25) / 0.5, (1 - 0.5) / 0.5] = [1.5, 1.0]
    2.5
    >>> fednova_norm(7, 0.0)
    7.0
    """
    _check_num_steps(num_steps)
    _check_momentum(momentum)
    tau, rho = float(num_steps), float(momentum)
    if rho == 0:
        return tau
    return (tau - rho * (1 - rho**num_steps) / (1 - rho)) / (1 - rho)


def fednova_aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    num_examples: Sequence[int],
    num_steps: Sequence[int],
    momentum: float,
) -> StateDict:
    """Run the FedNova server step (Wang et al. 2020), normalizing each client's update.

    With ``p_i = n_i / sum_j n_j`` and ``a_i`` from :func:`fednova_norm`::

        d_i       = (theta_global - theta_i) / ||a_i||_1
        tau_eff   = sum_i p_i * ||a_i||_1
        theta_new = theta_global - tau_eff * sum_i p_i * d_i

    When every client takes the same number of steps this equals FedAvg.

    NOTE: the released code's server momentum (``gmf``) is not implemented, which
    corresponds to its ``gmf=0``.

    Args:
        global_state: name -> tensor that every client started from this round.
        client_states: K trained state dicts, same names and shapes.
        num_examples: (K,) training samples per client, each > 0.
        num_steps: (K,) optimizer steps per client, each >= 1.
        momentum: SGD momentum that all clients used, in [0, 1).

    Returns:
        The new global state dict, computed in float64 and cast to the dtype of
        ``global_state``.

    Raises:
        ValueError: when the lists differ in length, a client reports a
            non-positive example count or num_steps < 1, momentum is outside [0, 1),
            or the state dicts differ in names or shapes.

    >>> start = {"w": torch.tensor([0.0])}
    >>> clients = [{"w": torch.tensor([-1.0])}, {"w": torch.tensor([-6.0])}]
    >>> # d = [1/1, 6/3] = [1, 2], tau_eff = (1 + 3) / 2 = 2, theta = 0 - 2 * 1.5
    >>> fednova_aggregate(start, clients, [10, 10], [1, 3], momentum=0.0)["w"].tolist()
    [-3.0]
    """
    _check_momentum(momentum)
    num_clients = len(client_states)
    if num_clients == 0:
        raise ValueError("Cannot aggregate zero updates. At least one client must reply.")
    if len(num_examples) != num_clients or len(num_steps) != num_clients:
        raise ValueError(
            f"Got {num_clients} updates, {len(num_examples)} example counts and {len(num_steps)} step counts. "
            "Pass one of each per update."
        )
    if any(not n > 0 for n in num_examples):
        raise ValueError(f"Every client must report a positive example count, got {list(num_examples)}.")
    for steps in num_steps:
        _check_num_steps(steps)
    _check_states_match([global_state, *client_states], "global_state and client_states")

    total_examples = float(sum(num_examples))
    shares = [float(n) / total_examples for n in num_examples]
    norms = [fednova_norm(steps, momentum) for steps in num_steps]
    tau_eff = sum(p * a for p, a in zip(shares, norms))

    # Normalized updates d_i in float64, so weighted_average accumulates and returns float64.
    normalized = [
        {name: (_to_float64(global_state[name]) - _to_float64(state[name])) / norm for name in global_state}
        for state, norm in zip(client_states, norms)
    ]
    mean_direction = weighted_average(normalized, [float(n) for n in num_examples])

    new_global: StateDict = {}
    for name, reference in global_state.items():
        new_global[name] = (_to_float64(reference) - tau_eff * mean_direction[name]).to(reference.dtype)

    logger.debug("FedNova: %d clients, steps %s, norms %s, tau_eff %.4g", num_clients, list(num_steps), norms, tau_eff)
    return new_global
