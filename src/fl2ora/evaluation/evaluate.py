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

    The model is put in evaluation mode, so LoRA dropout is off. When the model
    carries an ``image_feature_cache`` that holds ``dataset`` and its image encoder
    is frozen, the cached image features replace the images.
    """
    model.eval()
    cache = getattr(model, "image_feature_cache", None)
    cached = cache.lookup(model, dataset, device, precision) if cache is not None else None
    if cached is not None:
        batches = ((features, model.classify_features) for features in cached.features.split(batch_size))
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        batches = ((images.to(device, non_blocking=True), model) for images, _ in loader)
    chunks = []
    for inputs, forward in batches:
        with autocast_context(device, precision):
            logits = forward(inputs)
        chunks.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(chunks).numpy()


def restrict_to_classes(probs: torch.Tensor, labels: torch.Tensor, classes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Score only against ``classes``: keep their columns, renormalise, and relabel to positions.

    This equals a classifier built over those class names only, since softmax
    restricted to a subset of logits is the renormalised softmax.

    Raises:
        ValueError: when a label is not among ``classes``.
    """
    classes_t = torch.as_tensor(np.asarray(classes), dtype=torch.int64)
    positions = torch.searchsorted(classes_t, labels)
    valid = (positions < len(classes_t)) & (classes_t[positions.clamp(max=len(classes_t) - 1)] == labels)
    if not bool(valid.all()):
        raise ValueError(f"Labels {labels[~valid].unique().tolist()} are not among the client's classes {classes_t.tolist()}.")
    subset = probs[:, classes_t]
    return subset / subset.sum(dim=1, keepdim=True), positions


def evaluate_clients(
    probs: np.ndarray,
    labels: np.ndarray,
    client_slices: Sequence[np.ndarray],
    n_bins: int = 10,
    calibration: Literal["standard", "reference"] = "standard",
    client_classes: Sequence[np.ndarray] | None = None,
    groups: dict[str, list[int]] | None = None,
) -> dict:
    """Score each client's predictions, their unweighted mean, and all predictions pooled.

    Args:
        probs: ``(N, C)`` probabilities of the evaluated samples.
        labels: ``(N,)`` int labels.
        client_slices: for client k, the row indices of ``probs`` holding its test split.
        n_bins: bins of the calibration errors.
        calibration: ``standard`` or the reference code's ``reference`` ECE and MCE.
        client_classes: for client k, the sorted classes it is scored against (its
            own classes in base-to-new); None scores every client against all classes.
        groups: named lists of client ids (domains) reported as their own mean and pooled metrics.

    Returns:
        ``{"clients": {k: metrics}, "mean": metrics, "pooled": metrics}`` plus
        ``"groups": {name: {"mean", "pooled"}}`` when ``groups`` is given; every
        metric a float (fractions for accuracy and calibration errors).
    """
    probs_t = torch.as_tensor(probs)  # binning compares against edges rounded to this dtype
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    clients = {}
    for client_id, rows in enumerate(client_slices):
        rows_t = torch.as_tensor(rows, dtype=torch.int64)
        client_probs, client_labels = probs_t[rows_t], labels_t[rows_t]
        if client_classes is not None:
            client_probs, client_labels = restrict_to_classes(client_probs, client_labels, client_classes[client_id])
        clients[client_id] = classification_metrics(client_probs, client_labels, n_bins=n_bins, definition=calibration)

    def mean_of(ids: Sequence[int]) -> dict[str, float]:
        return {name: float(np.mean([clients[k][name] for k in ids])) for name in METRIC_NAMES}

    def pooled_of(ids: Sequence[int]) -> dict[str, float]:
        rows = torch.as_tensor(np.concatenate([client_slices[k] for k in ids]), dtype=torch.int64)
        return classification_metrics(probs_t[rows], labels_t[rows], n_bins=n_bins, definition=calibration)

    everyone = list(range(len(client_slices)))
    result = {"clients": clients, "mean": mean_of(everyone), "pooled": pooled_of(everyone)}
    if groups:
        result["groups"] = {name: {"mean": mean_of(ids), "pooled": pooled_of(ids)} for name, ids in groups.items()}
    return result


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
