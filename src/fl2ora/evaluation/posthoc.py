"""Post-hoc temperature scaling of the final global model, scored before and after."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from fl2ora.evaluation.evaluate import evaluate_clients
from fl2ora.evaluation.temperature import (
    apply_temperature,
    fit_temperature,
    fit_temperature_federated,
    fit_temperature_per_client_average,
)

logger = logging.getLogger(__name__)

_EPS = 1e-12


def _log_probs(probs: np.ndarray) -> torch.Tensor:
    # Log-probabilities serve as logits: softmax(log p / T) is temperature scaling of p.
    return torch.log(torch.as_tensor(probs, dtype=torch.float64).clamp_min(_EPS))


def fit_posthoc_temperature(
    mode: Literal["central", "federated", "per_client"],
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    client_val_rows: Sequence[np.ndarray],
) -> float:
    """Fit one temperature on the clients' validation predictions.

    Args:
        mode: ``central`` fits on all validation predictions pooled on the server;
            ``federated`` runs the scalar protocol of :func:`fit_temperature_federated`,
            where each client shares only its NLL, gradient and count; ``per_client``
            fits each client and averages by sample count.
        val_probs: ``(N_val, C)`` probabilities of every client's validation split.
        val_labels: ``(N_val,)`` labels.
        client_val_rows: for client k, its rows of ``val_probs``.
    """
    logits = _log_probs(val_probs)
    labels = torch.as_tensor(val_labels, dtype=torch.int64)
    if mode == "central":
        return fit_temperature(logits, labels)
    clients = [(logits[torch.as_tensor(rows)], labels[torch.as_tensor(rows)]) for rows in client_val_rows if len(rows)]
    if mode == "federated":
        return fit_temperature_federated(clients)
    if mode == "per_client":
        return fit_temperature_per_client_average(clients)
    raise ValueError(f"Unknown temperature.mode {mode!r}. Use central, federated or per_client.")


def temperature_scaling_report(
    mode: Literal["central", "federated", "per_client"],
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    client_val_rows: Sequence[np.ndarray],
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    client_test_rows: Sequence[np.ndarray],
    n_bins: int = 10,
    calibration: Literal["standard", "reference"] = "standard",
) -> dict[str, Any]:
    """Fit a temperature on validation predictions and score the test predictions before and after.

    Returns:
        ``{"mode", "temperature", "before": {"mean", "pooled"}, "after": {"mean", "pooled"}}``
        with the metric dicts of :func:`evaluate_clients`.
    """
    temperature = fit_posthoc_temperature(mode, val_probs, val_labels, client_val_rows)
    scaled = apply_temperature(_log_probs(test_probs), temperature).numpy()
    before = evaluate_clients(test_probs, test_labels, client_test_rows, n_bins, calibration)
    after = evaluate_clients(scaled, test_labels, client_test_rows, n_bins, calibration)
    logger.info(
        "Temperature scaling (%s): T=%.4f, client-mean ECE %.2f%% -> %.2f%%",
        mode, temperature, 100 * before["mean"]["ece"], 100 * after["mean"]["ece"],
    )
    return {
        "mode": mode,
        "temperature": temperature,
        "before": {"mean": before["mean"], "pooled": before["pooled"]},
        "after": {"mean": after["mean"], "pooled": after["pooled"]},
    }
