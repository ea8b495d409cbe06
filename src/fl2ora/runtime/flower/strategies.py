"""FedAvg, FedProx, FedDyn and FedNova as Flower strategies over fl2ora's federated core.

Each strategy keeps Flower's ``start`` loop and overrides the training steps:

- ``configure_train`` samples clients with :func:`~fl2ora.federated.sampling.sample_clients`,
  keyed on partition ids and the run seed, and sends each sampled partition's
  node the global trainable state.
- ``aggregate_train`` checks every reply with
  :func:`~fl2ora.runtime.flower.messages.parse_train_reply`, logs each failed,
  rejected or missing client by partition id, and combines the valid updates, in
  partition order, with :meth:`FederatedAlgorithm.aggregate
  <fl2ora.federated.algorithm.FederatedAlgorithm.aggregate>`, the same call the
  in-process simulation makes. With fewer than ``min_replies`` valid updates the
  global state stays as it was.

Evaluation is central (see :mod:`fl2ora.runtime.flower.server_app`), so the
federated evaluation steps send nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from fl2ora.config import RunConfig, config_to_dict
from fl2ora.federated.algorithm import FederatedAlgorithm
from fl2ora.federated.sampling import num_sampled, sample_clients
from fl2ora.model.trainable import StateDict
from fl2ora.runtime.flower.keys import ARRAYS_KEY, CONFIG_KEY, PROXIMAL_MU_KEY, ROUND_KEY, RUN_CONFIG_KEY
from fl2ora.runtime.flower.messages import (
    InvalidReplyError,
    content_nbytes,
    parse_train_reply,
    state_to_array_record,
)
from fl2ora.runtime.flower.nodes import PartitionDirectory

logger = logging.getLogger(__name__)


@dataclass
class _RoundInFlight:
    """The instructions of the current round, to match the replies against."""

    index: int
    sampled: list[int]
    partition_of_node: dict[int, int]
    unreachable: list[int]
    started: float
    bytes_down: int


class Fl2oraFedAvg(FedAvg):
    """fl2ora's aggregation rules on Flower's FedAvg strategy.

    The same class serves ``fedavg``, ``feddyn`` and ``fednova``: the rule lives in
    ``algorithm``. ``fedprox`` uses :class:`Fl2oraFedProx`, which also sends
    ``proximal-mu`` as Flower's FedProx does.

    Args:
        config: the run configuration; its seed and ``federated`` section drive the
            sampling, and its JSON form travels to every client.
        algorithm: the aggregation rule (see
            :func:`~fl2ora.runtime.simulation.make_algorithm`).
        global_state: the initial global trainable state (fp32 CPU tensors).
        server_state: the rule's initial server state (FedDyn's h), or None.
        directory: the map from node ids to partition ids.
        min_replies: valid updates a round needs to change the global state, >= 1.
        message_ttl: seconds a training instruction stays valid; use the round timeout.
        **flower_kwargs: passed to Flower's strategy constructor.
    """

    def __init__(
        self,
        *,
        config: RunConfig,
        algorithm: FederatedAlgorithm,
        global_state: StateDict,
        server_state: Any,
        directory: PartitionDirectory,
        min_replies: int = 1,
        message_ttl: float = 3600.0,
        **flower_kwargs: Any,
    ) -> None:
        super().__init__(**flower_kwargs)
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies!r}.")
        if not message_ttl > 0:
            raise ValueError(f"message_ttl must be > 0 seconds, got {message_ttl!r}.")
        self.config = config
        self.algorithm = algorithm
        self.global_state = global_state
        self.server_state = server_state
        self.directory = directory
        self.min_replies = min_replies
        self.message_ttl = message_ttl
        self.round_records: dict[int, dict[str, Any]] = {}
        """Per round: clients, loss, traffic and timings, as the simulation records them."""
        self.bytes_per_round: list[dict[str, int]] = []
        self.round_started: dict[int, float] = {}
        """Per round: ``time.perf_counter()`` when its training was configured."""
        self._config_json = json.dumps(config_to_dict(config))
        self._expected_shapes = {name: tuple(t.shape) for name, t in global_state.items()}
        self._round: _RoundInFlight | None = None

        smallest_round = num_sampled(algorithm.num_clients, config.federated.fraction)
        if min_replies > smallest_round:
            raise ValueError(
                f"min-replies={min_replies} exceeds the {smallest_round} clients sampled per round "
                f"(federated.fraction={config.federated.fraction} of {algorithm.num_clients}), so no round "
                "could change the global model. Lower min-replies or raise federated.fraction."
            )

    def summary(self) -> None:
        """Log the fl2ora settings, then Flower's."""
        federated = self.config.federated
        logger.info(
            "Strategy %s: aggregation %s over %d partitions, fraction %s, seed %d, min-replies %d; "
            "evaluation is central on the server",
            type(self).__name__, self.algorithm.name, self.algorithm.num_clients, federated.fraction,
            self.config.seed, self.min_replies,
        )
        super().summary()

    def _extend_train_config(self, config: ConfigRecord) -> None:
        """Add strategy-specific entries to a training instruction's ConfigRecord."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample partitions for ``server_round`` and build one instruction per reachable node."""
        started = time.perf_counter()
        self.round_started[server_round] = started
        self.directory.refresh(grid)
        federated = self.config.federated
        sampled = sample_clients(
            self.algorithm.num_clients, federated.fraction, server_round, self.config.seed,
            federated.all_clients_first_round,
        )

        config[ROUND_KEY] = server_round
        config[RUN_CONFIG_KEY] = self._config_json
        self._extend_train_config(config)
        # One payload shared by every instruction; Flower uploads it to the SuperLink once.
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})

        messages, partition_of_node, unreachable = [], {}, []
        for partition in sampled:
            node_id = self.directory.node_of(partition)
            if node_id is None:
                unreachable.append(partition)
                continue
            partition_of_node[node_id] = partition
            messages.append(
                Message(
                    record, dst_node_id=node_id, message_type=MessageType.TRAIN,
                    ttl=self.message_ttl, group_id=str(server_round),
                )
            )
        if unreachable:
            logger.warning("Round %d: partitions %s have no connected node and count as missing", server_round, unreachable)
        logger.info(
            "Round %d: training partitions %s on %d of %d connected nodes",
            server_round, sampled, len(messages), len(list(grid.get_node_ids())),
        )
        payload = sum(r.count_bytes() for r in record.values())
        self._round = _RoundInFlight(
            index=server_round,
            sampled=sampled,
            partition_of_node=partition_of_node,
            unreachable=unreachable,
            started=started,
            bytes_down=payload * len(messages),
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, log every client that failed, and aggregate the valid updates.

        Returns:
            The new global state, or None when fewer than ``min_replies`` updates
            are valid (Flower then keeps the previous one), and the round's metrics.
        """
        in_flight = self._round
        if in_flight is None or in_flight.index != server_round:
            raise RuntimeError(f"aggregate_train for round {server_round} was called before configure_train.")
        replies = list(replies)
        train_seconds = time.perf_counter() - in_flight.started

        valid, failed, answered, bytes_up = {}, [], set(), 0
        for reply in replies:
            node_id = reply.metadata.src_node_id
            partition = in_flight.partition_of_node.get(node_id)
            if partition is None or partition in answered:
                logger.warning("Round %d: ignoring an unexpected or repeated reply from node %d", server_round, node_id)
                continue
            answered.add(partition)
            bytes_up += content_nbytes(reply)
            if reply.has_error():
                logger.warning(
                    "Round %d: partition %d (node %d) failed: %s", server_round, partition, node_id, reply.error.reason
                )
                failed.append(partition)
                continue
            try:
                valid[partition] = parse_train_reply(reply.content, self._expected_shapes, partition)
            except InvalidReplyError as error:
                logger.warning(
                    "Round %d: rejected the reply of partition %d (node %d): %s", server_round, partition, node_id, error
                )
                failed.append(partition)

        node_of_partition = {p: n for n, p in in_flight.partition_of_node.items()}
        timed_out = sorted(p for p in node_of_partition if p not in answered)
        for partition in timed_out:
            logger.warning(
                "Round %d: partition %d (node %d) sent no reply within the round timeout",
                server_round, partition, node_of_partition[partition],
            )

        # Aggregation in partition order, so float sums match the in-process simulation.
        aggregate_started = time.perf_counter()
        updates = [valid[p] for p in sorted(valid)]
        new_arrays = None
        if len(updates) < self.min_replies:
            logger.warning(
                "Round %d: %d valid replies, fewer than min-replies=%d; the global model is unchanged",
                server_round, len(updates), self.min_replies,
            )
        else:
            self.global_state, self.server_state = self.algorithm.aggregate(self.global_state, updates, self.server_state)
            new_arrays = state_to_array_record(self.global_state)
            logger.info("Round %d: aggregated %d updates of partitions %s", server_round, len(updates), sorted(valid))

        traffic = {"down": in_flight.bytes_down, "up": bytes_up}
        self.bytes_per_round.append(traffic)
        train_loss = float(np.mean([u.train_loss for u in updates])) if updates else None
        logger.info("Round %d: %d bytes sent, %d bytes received", server_round, traffic["down"], traffic["up"])
        self.round_records[server_round] = {
            "round": server_round,
            "clients_trained": in_flight.sampled,
            "clients_dropped": sorted(set(in_flight.sampled) - set(valid)),
            "clients_failed": sorted(failed),
            "clients_missing": sorted(in_flight.unreachable + timed_out),
            "global_model_updated": new_arrays is not None,
            "train_loss": train_loss,
            "bytes": traffic,
            "seconds_train": train_seconds,
            "seconds_aggregate": time.perf_counter() - aggregate_started,
        }
        metrics = MetricRecord({"valid-replies": len(updates)})
        if train_loss is not None:
            metrics["train-loss"] = train_loss
        return new_arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send nothing: the ServerApp evaluates the global state centrally."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Return None: there is no federated evaluation to aggregate."""
        return None


class Fl2oraFedProx(Fl2oraFedAvg, FedProx):
    """FedProx on Flower's FedProx strategy: instructions carry ``proximal-mu``.

    The client adds ``mu/2 ||w - w_global||^2`` through
    :meth:`~fl2ora.federated.algorithm.FederatedAlgorithm.client_penalty` and checks
    that the ``proximal-mu`` it receives equals ``federated.mu``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(proximal_mu=kwargs["algorithm"].mu, **kwargs)

    def _extend_train_config(self, config: ConfigRecord) -> None:
        config[PROXIMAL_MU_KEY] = float(self.proximal_mu)


class Fl2oraFedDyn(Fl2oraFedAvg):
    """FedDyn: the server keeps h between rounds; each client keeps its gradient term in ``context.state``."""


class Fl2oraFedNova(Fl2oraFedAvg):
    """FedNova: updates are normalised by each client's reported ``num-steps``."""


STRATEGIES: dict[str, type[Fl2oraFedAvg]] = {
    "fedavg": Fl2oraFedAvg,
    "fedprox": Fl2oraFedProx,
    "feddyn": Fl2oraFedDyn,
    "fednova": Fl2oraFedNova,
}


def make_strategy(
    config: RunConfig,
    algorithm: FederatedAlgorithm,
    global_state: StateDict,
    directory: PartitionDirectory,
    min_replies: int = 1,
    message_ttl: float = 3600.0,
) -> Fl2oraFedAvg:
    """Build the strategy of ``algorithm.name`` with its initial server state.

    Raises:
        ValueError: for an unknown aggregation name, or ``min_replies`` above the
            number of clients a round samples.
    """
    cls = STRATEGIES.get(algorithm.name)
    if cls is None:
        raise ValueError(f"Unknown aggregation {algorithm.name!r}. Use one of {sorted(STRATEGIES)}.")
    return cls(
        config=config,
        algorithm=algorithm,
        global_state=global_state,
        server_state=algorithm.init_server_state(global_state),
        directory=directory,
        min_replies=min_replies,
        message_ttl=message_ttl,
    )
