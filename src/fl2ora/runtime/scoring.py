"""Central evaluation of the global model, shared by the in-process simulation and the Flower ServerApp.

Both runtimes call these functions, so given the same global state they write the
same scores and the same log lines.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fl2ora.evaluation.calibration import classification_metrics
from fl2ora.evaluation.evaluate import evaluate_clients, predict_probabilities
from fl2ora.experiment import Experiment
from fl2ora.model.trainable import load_trainable_state_dict

logger = logging.getLogger(__name__)


def evaluate_global_model(experiment: Experiment, global_state: dict) -> tuple[dict, np.ndarray]:
    """Load ``global_state`` into the model and score every client's test split.

    Also scores, when the setting has them, each domain's clients together, every
    held-out set (the unseen domain) as a whole, and the new classes of base-to-new
    against their names.

    Returns:
        The scores of :func:`~fl2ora.evaluation.evaluate.evaluate_clients`, plus
        ``"heldout": {name: metrics}`` and ``"base_to_new"`` when the setting has
        them, and the ``(N_eval, C)`` probabilities of ``experiment.eval_dataset``.
    """
    config = experiment.config
    splits = experiment.splits
    load_trainable_state_dict(experiment.model, global_state)
    batch, device, precision = config.eval.batch_size, experiment.device, config.model.precision
    probs = predict_probabilities(experiment.model, experiment.eval_dataset, batch, device, precision)
    scores = evaluate_clients(
        probs,
        experiment.eval_labels,
        experiment.client_eval_rows,
        config.eval.n_bins,
        config.eval.calibration,
        client_classes=splits.client_classes,
        groups=splits.groups or None,
    )
    if experiment.heldout:
        scores["heldout"] = {}
        for name, dataset in experiment.heldout.items():
            heldout_probs = predict_probabilities(experiment.model, dataset, batch, device, precision)
            scores["heldout"][name] = classification_metrics(
                torch.as_tensor(heldout_probs), torch.as_tensor(dataset.labels), config.eval.n_bins, config.eval.calibration
            )
    if experiment.new_model is not None:
        load_trainable_state_dict(experiment.new_model, global_state)
        new_probs = predict_probabilities(experiment.new_model, experiment.new_eval_dataset, batch, device, precision)
        new = classification_metrics(
            torch.as_tensor(new_probs), torch.as_tensor(experiment.new_eval_dataset.labels), config.eval.n_bins,
            config.eval.calibration,
        )
        base = scores["pooled"]
        scores["base_to_new"] = {
            "local": scores["mean"],
            "base": base,
            "new": new,
            "harmonic_mean_accuracy": harmonic_mean(base["accuracy"], new["accuracy"]),
        }
    return scores, probs


def harmonic_mean(first: float, second: float) -> float:
    """Return 2ab / (a + b), and 0 when both are 0.

    >>> round(harmonic_mean(0.8, 0.6), 4)
    0.6857
    """
    return 0.0 if first + second == 0 else 2 * first * second / (first + second)


def log_round_scores(round_index: int, mean: dict[str, float]) -> None:
    """Log a round's client-mean accuracy, ECE, MCE and ACE in percent at INFO level."""
    logger.info(
        "Round %d: client-mean accuracy %.2f%%, ECE %.2f%%, MCE %.2f%%, ACE %.2f%%",
        round_index, 100 * mean["accuracy"], 100 * mean["ece"], 100 * mean["mce"], 100 * mean["ace"],
    )
