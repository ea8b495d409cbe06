"""The final outputs of a run, written the same way by every runtime."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fl2ora.config import config_to_dict
from fl2ora.evaluation.evaluate import last_rounds_statistics, predict_probabilities
from fl2ora.evaluation.posthoc import temperature_scaling_report
from fl2ora.evaluation.reliability import plot_reliability_diagram
from fl2ora.experiment import Experiment
from fl2ora.model.trainable import load_trainable_state_dict, save_adapter
from fl2ora.notices import PACS_TEST_KFOLD_WARNING
from fl2ora.report import reliability_title
from fl2ora.rundir import ADAPTER_FILE, RELIABILITY_FILE, RunDirectory

logger = logging.getLogger(__name__)


def write_final_outputs(
    experiment: Experiment,
    run_dir: RunDirectory,
    global_state: dict[str, torch.Tensor],
    history: Sequence[dict[str, Any]],
    bytes_per_round: Sequence[dict[str, int]],
    probs: np.ndarray,
    total_rounds: int,
    runtime: str,
    wall_time_seconds: float,
) -> dict[str, Any]:
    """Write the adapter, final predictions, reliability diagram and summary of a run.

    Args:
        global_state: the final global trainable state.
        history: records of the evaluated rounds, oldest first; the last one is final.
        bytes_per_round: traffic of each round, ``{"down": bytes, "up": bytes}``.
        probs: ``(N_eval, C)`` final probabilities of every client's test split.
        total_rounds: rounds trained (0 for a method without trainable parameters).
        runtime: name of the runtime that produced the run.

    Returns:
        The summary written to ``summary.json``.
    """
    config = experiment.config
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
        title=reliability_title(
            final["pooled"]["ece"], final["round"], experiment.backbone.random_init, config.eval.calibration
        ),
    )

    summary: dict[str, Any] = {
        "name": config.name,
        "method": config.method,
        "aggregation": config.federated.aggregation,
        "loss": config.loss.name,
        "runtime": runtime,
        "backbone": experiment.backbone.description,
        "random_init": experiment.backbone.random_init,
        "calibration_definition": config.eval.calibration,
        "num_clients": experiment.num_clients,
        "rounds": total_rounds,
        "final": {"round": final["round"], "mean": final["mean"], "pooled": final["pooled"]},
        "last_rounds": last_rounds_statistics(history, config.eval.last_rounds),
        "trainable_parameters": experiment.trainable_parameters,
        "bytes_per_round": list(bytes_per_round),
        "wall_time_seconds": wall_time_seconds,
    }
    if config.temperature.mode != "none":
        load_trainable_state_dict(experiment.model, global_state)
        val_probs = predict_probabilities(
            experiment.model, experiment.val_dataset, config.eval.batch_size, experiment.device, config.model.precision
        )
        summary["temperature_scaling"] = temperature_scaling_report(
            config.temperature.mode,
            val_probs,
            experiment.val_labels,
            experiment.client_val_rows,
            probs,
            experiment.eval_labels,
            experiment.client_eval_rows,
            config.eval.n_bins,
            config.eval.calibration,
        )
    if config.setting.kind in ("domain_skew", "leave_one_domain_out") and config.setting.pacs_test_split == "test_kfold":
        summary["test_split_warning"] = PACS_TEST_KFOLD_WARNING
    if experiment.backbone.random_init:
        summary["warning"] = experiment.backbone.description["warning"]
    run_dir.write_summary(summary)
    return summary
