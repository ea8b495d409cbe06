"""Everything a run needs before its first round, built once from a configuration.

Both runtimes share this: the dataset and its client partition, the model with its
trainable parameters, and the evaluation set made of every client's local test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fl2ora.config import ConfigError, RunConfig
from fl2ora.data import clip_transforms
from fl2ora.methods.lora import count_trainable
from fl2ora.methods.registry import build_classifier, classifier_for_classnames
from fl2ora.model.backbone import Backbone, load_backbone
from fl2ora.perf.speedups import apply_speedups
from fl2ora.settings import ClientSplits, build_splits

logger = logging.getLogger(__name__)


@dataclass
class Experiment:
    """The built pieces of a run; ``model`` is the one backbone copy every client reuses."""

    config: RunConfig
    splits: ClientSplits
    backbone: Backbone
    model: nn.Module
    """The method's classifier: ``forward(images (N, 3, H, W)) -> logits (N, C)``."""
    device: torch.device
    client_train: list[Dataset]
    """Client k's training split, with the training transform."""
    eval_dataset: Dataset
    """Every client's test split, concatenated in client order, with the evaluation transform."""
    eval_labels: np.ndarray
    """``(N_eval,)`` labels of ``eval_dataset``."""
    eval_indices: np.ndarray
    """``(N_eval,)`` index of each evaluation sample in the dataset's test set."""
    client_eval_rows: list[np.ndarray]
    """For client k, its rows in ``eval_dataset``."""
    class_counts: dict
    """Per-client train and test class counts, saved with the run."""
    trainable_parameters: int
    val_dataset: Dataset | None = None
    """Every client's validation split (held out of its training split for temperature
    scaling), concatenated in client order, with the evaluation transform; None when unused."""
    val_labels: np.ndarray | None = None
    client_val_rows: list[np.ndarray] | None = None
    heldout: dict[str, Dataset] = field(default_factory=dict)
    """Evaluation-only sets scored as a whole (the unseen domain), with the evaluation transform."""
    new_model: nn.Module | None = None
    """Base-to-new: a classifier over the new classes' names sharing the trained parameters."""
    new_eval_dataset: Dataset | None = None
    """Base-to-new: test images of the new classes."""
    image_memory_budget: Any = None
    """The decoded-image cache's shared :class:`~fl2ora.perf.images.ImageMemoryBudget`; None when that cache is off."""

    @property
    def num_clients(self) -> int:
        return len(self.client_train)


def resolve_device(name: str) -> torch.device:
    """Map ``auto``, ``cpu`` or ``cuda`` to a device, failing clearly when CUDA is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda but no CUDA device is available. Use model.device=auto or cpu.")
    return torch.device(name)


def hold_out_validation(
    client_rows: list[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's training rows into training and validation rows (seeded).

    Each client keeps ``round(fraction * n)`` rows for validation, at least one, and
    at least one for training.

    Raises:
        ConfigError: when a client has fewer than two training samples.
    """
    train, val = [], []
    for client_id, rows in enumerate(client_rows):
        if len(rows) < 2:
            raise ConfigError(
                f"Client {client_id} has {len(rows)} training sample(s), too few to hold out a validation split. "
                "Raise partition.min_samples or set temperature.mode=none."
            )
        count = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1)
        shuffled = np.random.default_rng([seed, client_id, 11]).permutation(rows)
        val.append(np.sort(shuffled[:count]))
        train.append(np.sort(shuffled[count:]))
    return train, val


def build_experiment(config: RunConfig) -> Experiment:
    """Load data, split it between clients as the setting says, build the model, and set up the speed-ups.

    The speed-ups of ``config.perf`` are applied by :func:`fl2ora.perf.speedups.apply_speedups`.

    Raises:
        ConfigError: on settings the data cannot satisfy (for example more clients
            than training samples).
        FileNotFoundError: when the dataset root is missing.
    """
    splits = build_splits(config)
    clients = len(splits.client_train)

    backbone = load_backbone(config.model)
    model = build_classifier(config, backbone, splits.classnames, splits.template)
    device = resolve_device(config.model.device)
    model.to(device)
    new_model = None
    if splits.new_classnames is not None:
        new_model = classifier_for_classnames(config, model, backbone, splits.new_classnames, splits.template)
        new_model.to(device)

    train_transform = clip_transforms(backbone.image_size, train=True, augment=config.data.augment)
    eval_transform = clip_transforms(backbone.image_size, train=False)
    train_set = splits.train.with_transform(train_transform)
    client_train_indices = list(splits.client_train)
    val_dataset = val_labels = client_val_rows = None
    if config.temperature.mode != "none":
        client_train_indices, client_val_indices = hold_out_validation(
            client_train_indices, config.temperature.validation_fraction, config.seed
        )
        val_indices = np.concatenate(client_val_indices)
        val_offsets = np.cumsum([0] + [len(rows) for rows in client_val_indices])
        client_val_rows = [np.arange(val_offsets[k], val_offsets[k + 1]) for k in range(clients)]
        val_dataset = splits.train.with_transform(eval_transform).subset(val_indices)
        val_labels = splits.train.labels[val_indices]
    client_train = [train_set.subset(rows) for rows in client_train_indices]

    eval_indices = np.concatenate(splits.client_test)
    offsets = np.cumsum([0] + [len(rows) for rows in splits.client_test])
    client_eval_rows = [np.arange(offsets[k], offsets[k + 1]) for k in range(clients)]
    test_set = splits.test.with_transform(eval_transform)
    heldout = {name: test_set.subset(rows) for name, rows in splits.heldout.items()}

    trainable = count_trainable(model)
    logger.info(
        "Built %s (%s): %d classes, %d clients, %d training and %d test samples, %d trainable parameters on %s",
        splits.name, config.setting.kind, len(splits.classnames), clients,
        sum(len(rows) for rows in client_train_indices), len(eval_indices), trainable, device,
    )
    experiment = Experiment(
        config=config,
        splits=splits,
        backbone=backbone,
        model=model,
        device=device,
        client_train=client_train,
        eval_dataset=test_set.subset(eval_indices),
        eval_labels=splits.test.labels[eval_indices],
        eval_indices=eval_indices,
        client_eval_rows=client_eval_rows,
        class_counts=splits.class_counts,
        trainable_parameters=trainable,
        val_dataset=val_dataset,
        val_labels=val_labels,
        client_val_rows=client_val_rows,
        heldout=heldout,
        new_model=new_model,
        new_eval_dataset=splits.new_test.with_transform(eval_transform) if splits.new_test is not None else None,
    )
    apply_speedups(experiment)
    return experiment
