"""The fl2ora ServerApp: rounds, aggregation and central evaluation, into a run directory.

The server evaluates the global state itself, on every client's local test split,
with the same function as the in-process simulation. Given the same configuration
and seed, a Flower run therefore writes the same adapter and the same metrics as
``fl2ora run``. Only timings, traffic and the ``runtime`` field differ. This needs
the dataset on the SuperLink's host too, which holds on one host and wherever the
dataset is copied next to the SuperLink.

NOTE: federated evaluation (each client scoring its own test split and sending
its probabilities) is not implemented; a server without the dataset cannot run fl2ora.

Run configuration (``[tool.flwr.app.config]`` of the Flower app, or
``flwr run --run-config``) is read once in :func:`main`; see
:class:`FlowerRunSettings`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl2ora.config import RunConfig, config_to_dict, load_config
from fl2ora.experiment import build_experiment
from fl2ora.model.trainable import trainable_state_dict
from fl2ora.rundir import LOG_FILE, RunDirectory
from fl2ora.runner import log_to_file
from fl2ora.runtime.flower.console import configure_console_logging
from fl2ora.runtime.flower.messages import state_to_array_record
from fl2ora.runtime.flower.nodes import PartitionDirectory
from fl2ora.runtime.flower.strategies import make_strategy
from fl2ora.runtime.outputs import write_final_outputs
from fl2ora.runtime.scoring import evaluate_global_model, log_round_scores
from fl2ora.runtime.simulation import make_algorithm

logger = logging.getLogger(__name__)

app = ServerApp()


@dataclass(frozen=True)
class FlowerRunSettings:
    """Settings of a Flower run that the fl2ora configuration does not hold."""

    config: str = ""
    """fl2ora YAML configuration file on the SuperLink's host; ``""`` uses the defaults.
    A relative path is resolved against the ServerApp process's working folder."""
    output: str = "runs/flower"
    """Run directory, as ``fl2ora run --output``; relative paths as for ``config``."""
    overwrite: bool = False
    """Replace a run directory that already contains a run."""
    min_replies: int = 1
    """Valid client updates a round needs to change the global model. With fewer, the
    round keeps the previous global model and logs a warning."""
    round_timeout: float = 600.0
    """Seconds the server waits for the replies of one round, and of one batch of
    partition queries. Replies that arrive later are dropped and their clients logged."""
    node_wait_timeout: float = 300.0
    """Seconds to wait before round 1 for a node per partition; the run starts after
    this even when some partitions have no node."""

    def __post_init__(self) -> None:
        if self.min_replies < 1:
            raise ValueError(f"min-replies must be >= 1, got {self.min_replies!r}.")
        if not self.round_timeout > 0:
            raise ValueError(f"round-timeout must be > 0 seconds, got {self.round_timeout!r}. Try 600.")
        if self.node_wait_timeout < 0:
            raise ValueError(f"node-wait-timeout must be >= 0 seconds, got {self.node_wait_timeout!r}.")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerRunSettings:
        """Read the settings from a Flower run config (keys with dashes, e.g. ``min-replies``).

        Raises:
            ValueError: on an unknown key or a value of the wrong type.
        """
        types = {"config": str, "output": str, "overwrite": bool, "min-replies": int,
                 "round-timeout": float, "node-wait-timeout": float}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            expected = types.get(key)
            if expected is None:
                raise ValueError(f"Unknown run config key {key!r}. Valid keys: {sorted(types)}.")
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                raise ValueError(f"Run config {key!r} must be {expected.__name__}, got {value!r}.")
            values[key.replace("-", "_")] = value
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Return the settings as Flower run config values (the inverse of :meth:`from_run_config`)."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}


def run_federation(grid: Grid, config: RunConfig, settings: FlowerRunSettings) -> dict[str, Any]:
    """Run every round of ``config`` through ``grid`` and write the run directory.

    Waits for a node per partition, then lets the configured strategy train for
    ``federated.rounds`` rounds. After each round it writes that round's record to
    ``metrics.jsonl``, on evaluation rounds with the scores of the global state on
    every client's local test split. A method without trainable parameters is
    evaluated once, as round 0, without contacting any node.

    Returns:
        The summary written to ``summary.json`` (``runtime`` is ``flower``).

    Raises:
        FileExistsError: when ``settings.output`` contains a run and ``overwrite`` is false.
        ValueError: when ``min_replies`` exceeds the clients a round samples.
    """
    started = time.perf_counter()
    run_dir = RunDirectory(settings.output, overwrite=settings.overwrite)
    with log_to_file(run_dir.file(LOG_FILE)):
        resolved = config_to_dict(config)
        run_dir.write_config(resolved)
        logger.info("Flower run into %s; settings %s; configuration: %s", run_dir.path, asdict(settings), resolved)
        experiment = build_experiment(config)
        run_dir.write_partition(experiment.class_counts)
        algorithm = make_algorithm(experiment)
        global_state = trainable_state_dict(experiment.model)

        history: list[dict[str, Any]] = []
        probs: np.ndarray | None = None
        if not global_state:
            logger.warning("Method %s has no trainable parameters: evaluating once, without training", config.method)
            scores, probs = evaluate_global_model(experiment, global_state)
            record = {"round": 0, "clients_trained": [], **scores}
            log_round_scores(0, scores["mean"])
            history.append(record)
            run_dir.append_metrics(record)
            return write_final_outputs(
                experiment, run_dir, global_state=global_state, history=history, bytes_per_round=[], probs=probs,
                total_rounds=0, runtime="flower", wall_time_seconds=time.perf_counter() - started,
            )

        directory = PartitionDirectory(experiment.num_clients, query_timeout=settings.round_timeout)
        strategy = make_strategy(
            config, algorithm, global_state, directory,
            min_replies=settings.min_replies, message_ttl=settings.round_timeout,
        )
        directory.wait_until_complete(grid, settings.node_wait_timeout)
        total_rounds = config.federated.rounds

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # Flower calls this before round 1 (round 0) and after every round.
            nonlocal probs
            if server_round == 0:
                return None
            record = strategy.round_records[server_round]
            timings = {"round": server_round, "seconds_train": record.pop("seconds_train"),
                       "seconds_aggregate": record.pop("seconds_aggregate")}
            result = None
            if server_round % config.eval.every == 0 or server_round == total_rounds:
                eval_started = time.perf_counter()
                scores, probs = evaluate_global_model(experiment, strategy.global_state)
                record.update(scores)
                timings["seconds_eval"] = time.perf_counter() - eval_started
                history.append(record)
                log_round_scores(server_round, scores["mean"])
                result = MetricRecord({name: float(value) for name, value in scores["mean"].items()})
            timings["seconds_round"] = time.perf_counter() - strategy.round_started[server_round]
            if config.eval.calibration == "reference" and "mean" in record:
                record["calibration_definition"] = "reference"
            # Wall-clock timings go to their own file, as in the simulation, so metrics.jsonl is reproducible.
            run_dir.append_metrics(record)
            run_dir.append_timings(timings)
            return result

        strategy.start(
            grid,
            initial_arrays=state_to_array_record(global_state),
            num_rounds=total_rounds,
            timeout=settings.round_timeout,
            train_config=ConfigRecord(),
            evaluate_fn=evaluate,
        )

        return write_final_outputs(
            experiment,
            run_dir,
            global_state=strategy.global_state,
            history=history,
            bytes_per_round=strategy.bytes_per_round,
            probs=probs,
            total_rounds=total_rounds,
            runtime="flower",
            wall_time_seconds=time.perf_counter() - started,
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: read the run config once and run the federation."""
    configure_console_logging()
    settings = FlowerRunSettings.from_run_config(context.run_config)
    config = load_config(Path(settings.config) if settings.config else None)
    run_federation(grid, config, settings)
