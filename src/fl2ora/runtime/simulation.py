"""In-process simulation: every client trained one after another on one backbone copy."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fl2ora.config import config_to_dict
from fl2ora.evaluation.evaluate import evaluate_clients, last_rounds_statistics, predict_probabilities
from fl2ora.evaluation.reliability import plot_reliability_diagram
from fl2ora.experiment import Experiment
from fl2ora.federated.aggregation import fedavg
from fl2ora.federated.client import client_update
from fl2ora.federated.sampling import client_seed, sample_clients
from fl2ora.model.trainable import load_trainable_state_dict, save_adapter, state_nbytes, trainable_state_dict
from fl2ora.report import reliability_title
from fl2ora.rundir import ADAPTER_FILE, RELIABILITY_FILE, RunDirectory

logger = logging.getLogger(__name__)


def _evaluate(experiment: Experiment, global_state: dict) -> tuple[dict, np.ndarray]:
    """Load the global state into the model and score every client's test split."""
    config = experiment.config
    load_trainable_state_dict(experiment.model, global_state)
    probs = predict_probabilities(
        experiment.model, experiment.eval_dataset, config.eval.batch_size, experiment.device, config.model.precision
    )
    scores = evaluate_clients(
        probs, experiment.eval_labels, experiment.client_eval_rows, config.eval.n_bins, config.eval.calibration
    )
    return scores, probs


def run_simulation(experiment: Experiment, run_dir: RunDirectory) -> dict[str, Any]:
    """Run every round of FedAvg in this process and write the run directory.

    Each round samples clients, trains each from the current global state, averages
    their states weighted by training-set size, and on evaluation rounds loads the
    new global state before scoring every client's local test split.

    Returns:
        The summary written to ``summary.json``.
    """
    config = experiment.config
    started = time.perf_counter()
    model = experiment.model
    global_state = trainable_state_dict(model)
    history: list[dict] = []
    bytes_per_round: list[dict[str, int]] = []
    probs = None

    rounds = tqdm(range(1, config.federated.rounds + 1), desc="rounds", unit="round", disable=None)
    for round_index in rounds:
        round_start = time.perf_counter()
        sampled = sample_clients(
            experiment.num_clients,
            config.federated.fraction,
            round_index,
            config.seed,
            config.federated.all_clients_first_round,
        )
        logger.info("Round %d: training clients %s", round_index, sampled)

        # Local training: each client starts from the same global state.
        updates = []
        for client_id in tqdm(sampled, desc=f"round {round_index} clients", unit="client", leave=False, disable=None):
            updates.append(
                client_update(
                    model,
                    global_state,
                    experiment.client_train[client_id],
                    config.train,
                    client_id=client_id,
                    seed=client_seed(config.seed, round_index, client_id),
                    device=experiment.device,
                    precision=config.model.precision,
                )
            )
        train_seconds = time.perf_counter() - round_start

        # Aggregation: FedAvg over the sampled clients, weighted by training-set size.
        aggregate_start = time.perf_counter()
        global_state = fedavg([u.state for u in updates], [u.num_examples for u in updates])
        aggregate_seconds = time.perf_counter() - aggregate_start
        traffic = {
            "down": state_nbytes(global_state) * len(sampled),
            "up": sum(state_nbytes(u.state) for u in updates),
        }
        bytes_per_round.append(traffic)

        record: dict[str, Any] = {
            "round": round_index,
            "clients_trained": sampled,
            "train_loss": float(np.mean([u.train_loss for u in updates])),
            "bytes": traffic,
        }
        is_last = round_index == config.federated.rounds
        if round_index % config.eval.every == 0 or is_last:
            eval_start = time.perf_counter()
            scores, probs = _evaluate(experiment, global_state)
            record.update(scores)
            record["seconds_eval"] = time.perf_counter() - eval_start
            history.append(record)
            mean = scores["mean"]
            logger.info(
                "Round %d: client-mean accuracy %.2f%%, ECE %.2f%%, MCE %.2f%%, ACE %.2f%%",
                round_index, 100 * mean["accuracy"], 100 * mean["ece"], 100 * mean["mce"], 100 * mean["ace"],
            )
            rounds.set_postfix(acc=f"{100 * mean['accuracy']:.1f}%", ece=f"{100 * mean['ece']:.1f}%")
        record["seconds_train"] = train_seconds
        record["seconds_aggregate"] = aggregate_seconds
        record["seconds_round"] = time.perf_counter() - round_start
        run_dir.append_metrics(record)

    # Final outputs: adapter, per-sample predictions, reliability diagram, summary.
    final = history[-1]
    save_adapter(
        global_state,
        run_dir.file(ADAPTER_FILE),
        {"config": config_to_dict(config), "backbone": experiment.backbone.description, "round": final["round"]},
    )
    client_of_row = np.empty(len(experiment.eval_labels), dtype=np.int64)
    for client_id, rows in enumerate(experiment.client_eval_rows):
        client_of_row[rows] = client_id
    run_dir.write_predictions(client_of_row, experiment.eval_indices, experiment.eval_labels, probs)
    plot_reliability_diagram(
        torch.as_tensor(probs),
        torch.as_tensor(experiment.eval_labels),
        run_dir.file(RELIABILITY_FILE),
        n_bins=config.eval.n_bins,
        title=reliability_title(final["pooled"]["ece"], final["round"], experiment.backbone.random_init, config.eval.calibration),
    )

    summary = {
        "name": config.name,
        "method": config.method,
        "runtime": "simulation",
        "backbone": experiment.backbone.description,
        "random_init": experiment.backbone.random_init,
        "calibration_definition": config.eval.calibration,
        "num_clients": experiment.num_clients,
        "rounds": config.federated.rounds,
        "final": {"round": final["round"], "mean": final["mean"], "pooled": final["pooled"]},
        "last_rounds": last_rounds_statistics(history, config.eval.last_rounds),
        "trainable_parameters": experiment.trainable_parameters,
        "bytes_per_round": bytes_per_round,
        "wall_time_seconds": time.perf_counter() - started,
    }
    if experiment.backbone.random_init:
        summary["warning"] = experiment.backbone.description["warning"]
    run_dir.write_summary(summary)
    return summary
