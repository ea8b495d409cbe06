"""Evaluation of the global model on every client's local test split."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl2ora.evaluation.calibration import METRIC_NAMES, classification_metrics
from fl2ora.federated.client import autocast_context

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> np.ndarray:
    """Return class probabilities ``(N, C) float32`` for every sample, in dataset order.

    The model is put in evaluation mode, so LoRA dropout is off.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks = []
    for images, _ in loader:
        with autocast_context(device, precision):
            logits = model(images.to(device, non_blocking=True))
        chunks.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(chunks).numpy()


def evaluate_clients(
    probs: np.ndarray,
    labels: np.ndarray,
    client_slices: Sequence[np.ndarray],
    n_bins: int = 10,
    calibration: Literal["standard", "reference"] = "standard",
) -> dict:
    """Score each client's predictions, their unweighted mean, and all predictions pooled.

    Args:
        probs: ``(N, C)`` probabilities of the evaluated samples.
        labels: ``(N,)`` int labels.
        client_slices: for client k, the row indices of ``probs`` holding its test split.
        n_bins: bins of the calibration errors.
        calibration: ``standard`` or the reference code's ``reference`` ECE and MCE.

    Returns:
        ``{"clients": {k: metrics}, "mean": metrics, "pooled": metrics}``, every
        metric a float (fractions for accuracy and calibration errors).
    """
    probs_t = torch.as_tensor(probs)  # binning compares against edges rounded to this dtype
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    clients = {}
    for client_id, rows in enumerate(client_slices):
        rows_t = torch.as_tensor(rows, dtype=torch.int64)
        clients[client_id] = classification_metrics(
            probs_t[rows_t], labels_t[rows_t], n_bins=n_bins, definition=calibration
        )
    mean = {name: float(np.mean([m[name] for m in clients.values()])) for name in METRIC_NAMES}
    pooled_rows = torch.as_tensor(np.concatenate(list(client_slices)), dtype=torch.int64)
    pooled = classification_metrics(probs_t[pooled_rows], labels_t[pooled_rows], n_bins=n_bins, definition=calibration)
    return {"clients": clients, "mean": mean, "pooled": pooled}


def last_rounds_statistics(history: Sequence[dict], last: int) -> dict:
    """Mean and standard deviation of the client-mean metrics over the last evaluated rounds.

    Args:
        history: per-round records, each with a ``"mean"`` metrics dict, oldest first.
        last: how many of the last records to use (fewer when the history is shorter).

    Returns:
        ``{"rounds": [...], "mean": {name: value}, "std": {name: value}}``; the
        standard deviation is the population one (ddof 0), 0 for a single round.
    """
    window = list(history)[-last:]
    stats: dict = {"rounds": [record["round"] for record in window], "mean": {}, "std": {}}
    for name in METRIC_NAMES:
        values = np.array([record["mean"][name] for record in window], dtype=np.float64)
        stats["mean"][name] = float(values.mean()) if len(values) else math.nan
        stats["std"][name] = float(values.std()) if len(values) else math.nan
    return stats
