"""Everything a run needs before its first round, built once from a configuration.

Both runtimes share this: the dataset and its client partition, the model with its
trainable parameters, and the evaluation set made of every client's local test split.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fl2ora.config import ConfigError, RunConfig
from fl2ora.data import ImageClassificationData, clip_transforms, load_dataset, partition, subsample_per_class
from fl2ora.data.validation import drop_unreadable
from fl2ora.methods.lora import count_trainable
from fl2ora.methods.registry import build_classifier
from fl2ora.model.backbone import Backbone, load_backbone

logger = logging.getLogger(__name__)


@dataclass
class Experiment:
    """The built pieces of a run; ``model`` is the one backbone copy every client reuses."""

    config: RunConfig
    data: ImageClassificationData
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


@functools.lru_cache(maxsize=4)
def _load_dataset_cached(name: str, root: str, download: bool) -> ImageClassificationData:
    # Sweeps build many experiments on one dataset; listing its files once is enough.
    return load_dataset(name, root, download=download)


def _subsample(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    if limit is None:
        return np.arange(len(labels))
    return np.sort(subsample_per_class(labels, limit, seed))


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
    """Load data, partition it, and build the model with its trainable parameters.

    Raises:
        ConfigError: on settings the data cannot satisfy (for example more clients
            than training samples).
        FileNotFoundError: when the dataset root is missing.
    """
    data = _load_dataset_cached(config.data.dataset, config.data.root, config.data.download)
    train_pool = _subsample(data.train.labels, config.data.max_train_per_class, config.seed)
    test_pool = _subsample(data.test.labels, config.data.max_test_per_class, config.seed + 1)
    train_pool = drop_unreadable(data.train, train_pool, config.data.bad_images, "training")
    test_pool = drop_unreadable(data.test, test_pool, config.data.bad_images, "test")
    train_labels = data.train.labels[train_pool]
    test_labels = data.test.labels[test_pool]

    clients = config.partition.num_clients
    if clients > len(train_pool) or clients > len(test_pool):
        raise ConfigError(
            f"partition.num_clients={clients} exceeds the {len(train_pool)} training or {len(test_pool)} "
            "test samples available. Lower partition.num_clients or raise data.max_*_per_class."
        )
    split = partition(
        config.partition.method,
        train_labels,
        test_labels,
        num_clients=clients,
        beta=config.partition.beta,
        min_samples=config.partition.min_samples,
        seed=config.seed,
        max_tries=config.partition.max_tries,
    )
    counts = split.class_counts(train_labels, test_labels, len(data.classnames))

    backbone = load_backbone(config.model)
    model = build_classifier(config, backbone, data.classnames, data.template)
    device = resolve_device(config.model.device)
    model.to(device)

    train_transform = clip_transforms(backbone.image_size, train=True, augment=config.data.augment)
    eval_transform = clip_transforms(backbone.image_size, train=False)
    train_set = data.train.with_transform(train_transform)
    client_train_rows = list(split.train_indices)
    val_dataset = val_labels = client_val_rows = None
    if config.temperature.mode != "none":
        client_train_rows, client_val_indices = hold_out_validation(
            client_train_rows, config.temperature.validation_fraction, config.seed
        )
        val_indices = np.concatenate([train_pool[rows] for rows in client_val_indices])
        val_offsets = np.cumsum([0] + [len(rows) for rows in client_val_indices])
        client_val_rows = [np.arange(val_offsets[k], val_offsets[k + 1]) for k in range(clients)]
        val_dataset = data.train.with_transform(eval_transform).subset(val_indices)
        val_labels = data.train.labels[val_indices]
    client_train = [train_set.subset(train_pool[rows]) for rows in client_train_rows]

    eval_indices = np.concatenate([test_pool[rows] for rows in split.test_indices])
    offsets = np.cumsum([0] + [len(rows) for rows in split.test_indices])
    client_eval_rows = [np.arange(offsets[k], offsets[k + 1]) for k in range(clients)]
    eval_dataset = data.test.with_transform(eval_transform).subset(eval_indices)

    trainable = count_trainable(model)
    logger.info(
        "Built %s: %d classes, %d clients, %d training and %d test samples, %d trainable parameters on %s",
        data.name, len(data.classnames), clients, len(train_pool), len(eval_indices), trainable, device,
    )
    return Experiment(
        config=config,
        data=data,
        backbone=backbone,
        model=model,
        device=device,
        client_train=client_train,
        eval_dataset=eval_dataset,
        eval_labels=data.test.labels[eval_indices],
        eval_indices=eval_indices,
        client_eval_rows=client_eval_rows,
        class_counts=counts,
        trainable_parameters=trainable,
        val_dataset=val_dataset,
        val_labels=val_labels,
        client_val_rows=client_val_rows,
    )
