"""The fl2ora ClientApp: one Flower node trains one partition of the run's dataset.

The node's ``node_config`` names its partition::

    flower-supernode ... --node-config 'partition-id=0 num-partitions=3'

Optional ``node_config`` keys: ``data-root`` replaces ``data.root`` (the node's own
copy of the dataset) and ``device`` replaces ``model.device``. The Simulation
Runtime sets ``partition-id`` and ``num-partitions`` itself.

Every node builds the same partition as the in-process simulation: the split is
seeded, so each node derives it from the full dataset and keeps its own part.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl2ora.runtime.flower.console import configure_console_logging
from fl2ora.runtime.flower.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FEDDYN_STATE_KEY,
    METRICS_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_KEY,
    PROXIMAL_MU_KEY,
    ROUND_KEY,
    RUN_CONFIG_KEY,
)

if TYPE_CHECKING:
    from fl2ora.config import RunConfig
    from fl2ora.experiment import Experiment

# A deployed SuperNode starts one ClientApp process per message. The training
# modules (torch, transformers) are imported inside the handlers that need them,
# so that a process that replies to a partition query starts in well under a second.

logger = logging.getLogger(__name__)

app = ClientApp()


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """Return ``(partition-id, num-partitions)`` from a node's ``node_config``.

    Raises:
        ValueError: when a key is missing, not an int, or the id is outside
            ``[0, num-partitions)``.
    """
    values = []
    for key in (PARTITION_KEY, NUM_PARTITIONS_KEY):
        value = node_config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"node_config[{key!r}] must be an int, got {value!r}. Start the SuperNode with "
                "--node-config 'partition-id=0 num-partitions=3' (one partition per node)."
            )
        values.append(value)
    partition, count = values
    if count < 1 or not 0 <= partition < count:
        raise ValueError(f"node_config has partition-id={partition} and num-partitions={count}; the id must be in [0, {count}).")
    return partition, count


def apply_node_overrides(config: RunConfig, node_config: Mapping[str, Any]) -> RunConfig:
    """Return ``config`` with the node's ``data-root`` and ``device`` applied, when given.

    Raises:
        ConfigError: when ``device`` is not ``auto``, ``cpu`` or ``cuda``.
    """
    from fl2ora.config import config_from_dict, config_to_dict

    values = config_to_dict(config)
    if "data-root" in node_config:
        values["data"]["root"] = str(node_config["data-root"])
    if "device" in node_config:
        values["model"]["device"] = str(node_config["device"])
    return config_from_dict(values)


class ExperimentCache:
    """The experiment of the last configuration seen, built once per process.

    The Simulation Runtime and the in-process grid send many messages to one
    process, and building the backbone and dataset dominates a small client
    update. A deployed SuperNode starts a new ClientApp process per message, so
    there the cache is used for one message only.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._experiment: Experiment | None = None

    def get(self, config: RunConfig) -> Experiment:
        """Return the experiment of ``config``, building it on a miss."""
        from fl2ora.config import config_to_dict
        from fl2ora.experiment import build_experiment

        key = json.dumps(config_to_dict(config), sort_keys=True)
        if key != self._key:
            self._experiment, self._key = None, None  # free the previous backbone first
            self._experiment = build_experiment(config)
            self._key = key
        return self._experiment


EXPERIMENTS = ExperimentCache()


def train_partition(content: RecordDict, context: Context, cache: ExperimentCache = EXPERIMENTS) -> RecordDict:
    """Run the federated core's client update for this node's partition.

    Loads the global state from the instruction, trains with the run's seed for
    this round and partition, and for FedDyn reads and updates the client's
    gradient term in ``context.state``.

    Returns:
        The reply: exactly the trained trainable tensors and the MetricRecord of
        :data:`~fl2ora.runtime.flower.keys.REPLY_METRIC_KEYS`.

    Raises:
        ValueError: when the node's partitions do not match the run, the
            instruction lacks an entry, or ``proximal-mu`` differs from
            ``federated.mu``.
    """
    from fl2ora.config import config_from_dict
    from fl2ora.federated.client import client_update
    from fl2ora.federated.sampling import client_seed
    from fl2ora.runtime.flower.messages import (
        array_record_to_state,
        feddyn_state_to_record,
        record_to_feddyn_state,
        state_to_array_record,
    )
    from fl2ora.runtime.simulation import make_algorithm

    instruction = content.get(CONFIG_KEY)
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(instruction, ConfigRecord) or arrays is None:
        raise ValueError(f"A training instruction needs the records {ARRAYS_KEY!r} and {CONFIG_KEY!r}, got {list(content)}.")
    for key in (RUN_CONFIG_KEY, ROUND_KEY):
        if key not in instruction:
            raise ValueError(f"The training instruction's ConfigRecord has no {key!r}; was it sent by the fl2ora ServerApp?")
    config = apply_node_overrides(config_from_dict(json.loads(str(instruction[RUN_CONFIG_KEY]))), context.node_config)
    partition, num_partitions = node_partition(context.node_config)
    if num_partitions != config.partition.num_clients:
        raise ValueError(
            f"This node has num-partitions={num_partitions}, but the run has partition.num_clients="
            f"{config.partition.num_clients}. Start the SuperNodes with num-partitions={config.partition.num_clients}."
        )
    server_round = int(instruction[ROUND_KEY])

    experiment = cache.get(config)
    algorithm = make_algorithm(experiment)
    if PROXIMAL_MU_KEY in instruction and float(instruction[PROXIMAL_MU_KEY]) != algorithm.mu:
        raise ValueError(
            f"The instruction has proximal-mu={instruction[PROXIMAL_MU_KEY]}, but federated.mu={algorithm.mu}."
        )
    global_state = array_record_to_state(arrays)

    # FedDyn's gradient term persists on the node between the rounds it trains.
    client_state = None
    if FEDDYN_STATE_KEY in context.state:
        client_state = record_to_feddyn_state(context.state[FEDDYN_STATE_KEY])
    if client_state is None:
        client_state = algorithm.init_client_state(global_state)

    logger.info("Round %d: partition %d trains on %d samples", server_round, partition, len(experiment.client_train[partition]))
    update = client_update(
        experiment.model,
        global_state,
        experiment.client_train[partition],
        config.train,
        client_id=partition,
        seed=client_seed(config.seed, server_round, partition),
        device=experiment.device,
        precision=config.model.precision,
        loss_config=config.loss,
        penalty=algorithm.client_penalty(global_state, client_state, experiment.device),
    )
    if update.finite:
        new_client_state = algorithm.update_client_state(client_state, update, global_state)
        if new_client_state is not None:
            context.state[FEDDYN_STATE_KEY] = feddyn_state_to_record(new_client_state)

    metrics = MetricRecord(
        {
            "num-examples": int(update.num_examples),
            "num-steps": int(update.num_steps),
            "train-loss": float(update.train_loss),
            PARTITION_KEY: partition,
            "finite": int(update.finite),
        }
    )
    return RecordDict({ARRAYS_KEY: state_to_array_record(update.state), METRICS_KEY: metrics})


@app.query()
def query(message: Message, context: Context) -> Message:
    """Reply with this node's partition id and partition count."""
    partition, num_partitions = node_partition(context.node_config)
    metrics = MetricRecord({PARTITION_KEY: partition, NUM_PARTITIONS_KEY: num_partitions})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train this node's partition from the global state in ``message``."""
    configure_console_logging()
    return Message(train_partition(message.content, context), reply_to=message)

