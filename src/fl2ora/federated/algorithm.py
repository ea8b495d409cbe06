"""The aggregation rule of a run, split into its client part and its server part.

:class:`FederatedAlgorithm` dispatches to the pure functions of
:mod:`fl2ora.federated.aggregation` and :mod:`fl2ora.federated.rules`. It holds no
state itself: the runtime keeps each client's state (FedDyn's gradient term) and the
server state, and passes them in, so the in-process simulation and Flower share it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fl2ora.federated.aggregation import StateDict, fedavg
from fl2ora.federated.client import ClientUpdate
from fl2ora.federated.rules import (
    FedDynClientState,
    FedDynServerState,
    feddyn_aggregate,
    feddyn_client_state_update,
    feddyn_penalty,
    fednova_aggregate,
    init_feddyn_client_state,
    init_feddyn_server_state,
    proximal_penalty,
)

Penalty = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class FederatedAlgorithm:
    """An aggregation rule with its settings.

    Args:
        name: ``fedavg``, ``fedprox``, ``feddyn`` or ``fednova``.
        num_clients: K, every client of the federation (FedDyn's server step uses it).
        momentum: the clients' SGD momentum (FedNova's step normalisation uses it).
        mu: FedProx proximal weight.
        alpha: FedDyn regularisation weight.
    """

    name: str
    num_clients: int
    momentum: float
    mu: float = 0.0
    alpha: float = 0.01

    def init_client_state(self, global_state: Mapping[str, torch.Tensor]) -> FedDynClientState | None:
        """Return the state a client starts with (FedDyn's zero gradient term), or None."""
        return init_feddyn_client_state(global_state) if self.name == "feddyn" else None

    def init_server_state(self, global_state: Mapping[str, torch.Tensor]) -> FedDynServerState | None:
        """Return the server state the run starts with (FedDyn's h), or None."""
        return init_feddyn_server_state(global_state) if self.name == "feddyn" else None

    def client_penalty(
        self, global_state: Mapping[str, torch.Tensor], client_state: Any, device: torch.device
    ) -> Penalty | None:
        """Return the term added to a client's loss, or None for FedAvg and FedNova.

        The global tensors are moved to ``device`` once here, not at every step.
        """
        if self.name not in ("fedprox", "feddyn"):
            return None
        anchor = {name: tensor.to(device) for name, tensor in global_state.items()}
        if self.name == "fedprox":
            return lambda parameters: proximal_penalty(parameters, anchor, self.mu)
        on_device = FedDynClientState(gradient={k: v.to(device) for k, v in client_state.gradient.items()})
        return lambda parameters: feddyn_penalty(parameters, anchor, on_device, self.alpha)

    def update_client_state(
        self, client_state: Any, update: ClientUpdate, global_state: Mapping[str, torch.Tensor]
    ) -> Any:
        """Return the client's state after its local update (FedDyn), unchanged otherwise."""
        if self.name != "feddyn":
            return client_state
        return feddyn_client_state_update(client_state, update.state, global_state, self.alpha)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        server_state: Any,
    ) -> tuple[StateDict, Any]:
        """Combine the clients' updates into the next global state.

        Returns:
            The new global state and the new server state.
        """
        states = [update.state for update in updates]
        if self.name in ("fedavg", "fedprox"):
            return fedavg(states, [u.num_examples for u in updates]), server_state
        if self.name == "fednova":
            steps = [u.num_steps for u in updates]
            return fednova_aggregate(global_state, states, [u.num_examples for u in updates], steps, self.momentum), server_state
        if self.name == "feddyn":
            return feddyn_aggregate(global_state, states, server_state, self.num_clients, self.alpha)
        raise ValueError(f"Unknown aggregation {self.name!r}. Use fedavg, fedprox, feddyn or fednova.")
