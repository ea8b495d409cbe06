"""In-process simulation: every client trained on one backbone copy, one after another or in groups."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fl2ora.experiment import Experiment
from fl2ora.federated.algorithm import FederatedAlgorithm
from fl2ora.federated.batched import ClientTask, batched_group_size, train_client_group
from fl2ora.federated.sampling import client_seed, sample_clients
from fl2ora.model.trainable import state_nbytes, trainable_state_dict
from fl2ora.config import config_to_dict
from fl2ora.rundir import RunDirectory
from fl2ora.runtime.checkpoint import Checkpoint, check_tensors_match, save_checkpoint
from fl2ora.runtime.faults import fault_point, set_round
from fl2ora.runtime.outputs import write_final_outputs
from fl2ora.runtime.scoring import evaluate_global_model, log_round_scores

logger = logging.getLogger(__name__)


@dataclass
class SimulationState:
    """Everything that changes from round to round; enough to continue a run."""

    round: int
    """Last completed round (0 before the first)."""
    global_state: dict
    server_state: Any
    client_states: dict[int, Any]
    """Per-client state of the aggregation rule (FedDyn), for clients trained so far."""
    history: list[dict] = field(default_factory=list)
    """Records of the evaluated rounds."""
    bytes_per_round: list[dict[str, int]] = field(default_factory=list)


def make_algorithm(experiment: Experiment) -> FederatedAlgorithm:
    """Return the aggregation rule configured for ``experiment``."""
    config = experiment.config
    return FederatedAlgorithm(
        name=config.federated.aggregation,
        num_clients=experiment.num_clients,
        momentum=config.train.momentum,
        mu=config.federated.mu,
        alpha=config.federated.alpha,
    )


class RunInterrupted(Exception):
    """The user interrupted the run; the last completed round's checkpoint is valid."""

    def __init__(self, round_index: int) -> None:
        super().__init__(f"interrupted during round {round_index}")
        self.round_index = round_index


class InterruptFlag:
    """Set by a signal handler, polled by the round loop between client updates."""

    def __init__(self) -> None:
        self.requested = False

    def set(self) -> None:
        self.requested = True


def run_round(
    experiment: Experiment,
    algorithm: FederatedAlgorithm,
    state: SimulationState,
    interrupt: InterruptFlag | None = None,
) -> dict[str, Any]:
    """Train the sampled clients of the next round and aggregate their updates into ``state``.

    Updates whose loss became non-finite are dropped; when no valid update is left,
    the global state stays as it was and the record says so.

    Returns:
        The round's record (clients, loss, traffic, timings).
    """
    config = experiment.config
    round_index = state.round + 1
    round_start = time.perf_counter()
    sampled = sample_clients(
        experiment.num_clients,
        config.federated.fraction,
        round_index,
        config.seed,
        config.federated.all_clients_first_round,
    )
    logger.info("Round %d: training clients %s", round_index, sampled)

    # Local training: each client starts from the same global state. With perf.batched_clients = G > 1,
    # LoRA methods train G clients at a time in one pass over the backbone, with the same per-client results.
    updates = []
    client_states = dict(state.client_states)  # committed to ``state`` only when the round completes
    group_size = batched_group_size(experiment.model, config.perf.batched_clients)
    progress = tqdm(total=len(sampled), desc=f"round {round_index} clients", unit="client", leave=False, disable=None)
    with progress:
        for start in range(0, len(sampled), group_size):
            if interrupt is not None and interrupt.requested:
                raise RunInterrupted(round_index)
            tasks, group_states = [], []
            for client_id in sampled[start : start + group_size]:
                client_state = client_states.get(client_id)
                if client_state is None:
                    client_state = algorithm.init_client_state(state.global_state)
                group_states.append(client_state)
                tasks.append(ClientTask(
                    client_id=client_id,
                    dataset=experiment.client_train[client_id],
                    seed=client_seed(config.seed, round_index, client_id),
                    penalty=algorithm.client_penalty(state.global_state, client_state, experiment.device),
                ))
            group_updates = train_client_group(
                experiment.model, state.global_state, tasks, config.train, experiment.device,
                precision=config.model.precision, loss_config=config.loss,
            )
            for update, client_state in zip(group_updates, group_states):
                if update.finite:
                    updates.append(update)
                    new_client_state = algorithm.update_client_state(client_state, update, state.global_state)
                    if new_client_state is not None:
                        client_states[update.client_id] = new_client_state
                fault_point("train")
            progress.update(len(tasks))
    train_seconds = time.perf_counter() - round_start
    if interrupt is not None and interrupt.requested:
        raise RunInterrupted(round_index)

    # Aggregation over the valid updates.
    aggregate_start = time.perf_counter()
    dropped = sorted(set(sampled) - {u.client_id for u in updates})
    fault_point("aggregate")
    state.client_states = client_states
    if updates:
        state.global_state, state.server_state = algorithm.aggregate(state.global_state, updates, state.server_state)
    else:
        logger.warning("Round %d: no valid client update; the global model is unchanged", round_index)
    aggregate_seconds = time.perf_counter() - aggregate_start
    traffic = {
        "down": state_nbytes(state.global_state) * len(sampled),
        "up": sum(state_nbytes(u.state) for u in updates),
    }
    state.bytes_per_round.append(traffic)
    state.round = round_index
    return {
        "round": round_index,
        "clients_trained": sampled,
        "clients_dropped": dropped,
        "train_loss": float(np.mean([u.train_loss for u in updates])) if updates else None,
        "bytes": traffic,
        "seconds_train": train_seconds,
        "seconds_aggregate": aggregate_seconds,
    }


def _initial_state(experiment: Experiment, algorithm: FederatedAlgorithm, resume: Checkpoint | None) -> SimulationState:
    """Start from the model's trainable state, or from a checkpoint after checking it fits the model."""
    initial = trainable_state_dict(experiment.model)
    if resume is None:
        return SimulationState(
            round=0, global_state=initial, server_state=algorithm.init_server_state(initial), client_states={}
        )
    check_tensors_match(resume.global_state, initial, "global state")
    if resume.server_state is not None:
        check_tensors_match(resume.server_state.h, initial, "server state")
    for client_id, client_state in resume.client_states.items():
        check_tensors_match(client_state.gradient, initial, f"state of client {client_id}")
    logger.info("Resuming after round %d", resume.round)
    return SimulationState(
        round=resume.round,
        global_state=resume.global_state,
        server_state=resume.server_state,
        client_states=dict(resume.client_states),
        history=list(resume.history),
        bytes_per_round=list(resume.bytes_per_round),
    )


def check_resumable(experiment: Experiment, checkpoint: Checkpoint) -> None:
    """Check that ``checkpoint`` fits the model of ``experiment``, before anything is written.

    Raises:
        CheckpointError: naming missing, unexpected and mismatched tensors.
    """
    _initial_state(experiment, make_algorithm(experiment), checkpoint)


def run_simulation(
    experiment: Experiment,
    run_dir: RunDirectory,
    resume: Checkpoint | None = None,
    interrupt: InterruptFlag | None = None,
    on_round_end: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run every round in this process and write the run directory.

    Each round samples clients, trains each from the current global state, combines
    their states with the configured aggregation rule, and on evaluation rounds
    loads the new global state before scoring every client's local test split. A
    method without trainable parameters (zero-shot CLIP) is evaluated once, as round 0.
    After every round the metrics record is appended and a checkpoint is written,
    so ``resume`` continues a stopped run and finishes with the same outputs.

    Args:
        resume: checkpoint to continue from; its metrics records past its round are
            removed from ``metrics.jsonl`` first.
        interrupt: polled between clients; when set, the round in progress is
            abandoned and :class:`RunInterrupted` is raised (the checkpoint of the
            last completed round stays valid).
        on_round_end: called after each round's checkpoint with that round's
            ``timings.jsonl`` entry plus ``seconds_checkpoint`` and
            ``seconds_total`` (the whole round, checkpoint included); the
            benchmark suite uses it to split a round's time.

    Returns:
        The summary written to ``summary.json``.
    """
    config = experiment.config
    started = time.perf_counter()
    algorithm = make_algorithm(experiment)
    state = _initial_state(experiment, algorithm, resume)
    previous_seconds = resume.wall_time_seconds if resume else 0.0
    if resume is not None:
        run_dir.truncate_records(resume.round)

    def save(round_seconds: float) -> None:
        save_checkpoint(
            run_dir.path,
            Checkpoint(
                round=state.round,
                global_state=state.global_state,
                server_state=state.server_state,
                client_states=state.client_states,
                history=state.history,
                bytes_per_round=state.bytes_per_round,
                wall_time_seconds=previous_seconds + round_seconds,
                config=config_to_dict(config),
            ),
        )

    probs = None
    total_rounds = config.federated.rounds if state.global_state else 0
    if not state.global_state:
        logger.warning("Method %s has no trainable parameters: evaluating once, without training", config.method)
        scores, probs = evaluate_global_model(experiment, state.global_state)
        record = {"round": 0, "clients_trained": [], **scores}
        log_round_scores(0, scores["mean"])
        state.history = [record]
        run_dir.truncate_records(-1)
        run_dir.append_metrics(record)

    rounds = tqdm(range(state.round + 1, total_rounds + 1), desc="rounds", unit="round", disable=None)
    for round_index in rounds:
        set_round(round_index)
        round_start = time.perf_counter()
        record = run_round(experiment, algorithm, state, interrupt)
        timings = {"round": round_index, "seconds_train": record.pop("seconds_train"),
                   "seconds_aggregate": record.pop("seconds_aggregate")}
        if round_index % config.eval.every == 0 or round_index == total_rounds:
            eval_start = time.perf_counter()
            scores, probs = evaluate_global_model(experiment, state.global_state)
            record.update(scores)
            timings["seconds_eval"] = time.perf_counter() - eval_start
            state.history.append(record)
            log_round_scores(round_index, scores["mean"])
            rounds.set_postfix(acc=f"{100 * scores['mean']['accuracy']:.1f}%", ece=f"{100 * scores['mean']['ece']:.1f}%")
        timings["seconds_round"] = time.perf_counter() - round_start
        if config.eval.calibration == "reference" and "mean" in record:
            record["calibration_definition"] = "reference"
        run_dir.append_metrics(record)
        run_dir.append_timings(timings)
        checkpoint_start = time.perf_counter()
        save(checkpoint_start - started)
        if on_round_end is not None:
            end = time.perf_counter()
            on_round_end({**timings, "seconds_checkpoint": end - checkpoint_start, "seconds_total": end - round_start})

    if probs is None:
        # Resumed after the last round's checkpoint: score the final model again.
        _, probs = evaluate_global_model(experiment, state.global_state)
    return write_final_outputs(
        experiment,
        run_dir,
        global_state=state.global_state,
        history=state.history,
        bytes_per_round=state.bytes_per_round,
        probs=probs,
        total_rounds=total_rounds,
        runtime="simulation",
        wall_time_seconds=previous_seconds + time.perf_counter() - started,
    )
