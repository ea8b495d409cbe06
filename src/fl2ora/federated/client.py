"""One client's local update: load the global state, train with a fresh SGD, return the new state."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fl2ora.config import TrainConfig
from fl2ora.losses import CalibrationLossConfig, training_loss
from fl2ora.model.trainable import StateDict, load_trainable_state_dict, trainable_state_dict

logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""

    client_id: int
    state: StateDict
    """Trained trainable tensors, fp32 on the CPU."""
    num_examples: int
    """Training samples used, the FedAvg weight."""
    num_steps: int
    """Optimizer steps taken."""
    train_loss: float
    """Mean training loss over the steps."""
    finite: bool = True
    """False when a loss became NaN or infinite; training stopped there and the
    runtime drops this update for the round."""


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Return an autocast context for CUDA with bf16/fp16, and a no-op otherwise."""
    if device.type == "cuda" and precision in _AUTOCAST_DTYPES:
        return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def client_update(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    dataset: Dataset,
    config: TrainConfig,
    client_id: int,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
    loss_config: CalibrationLossConfig | None = None,
    penalty: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
) -> ClientUpdate:
    """Train the global trainable state on one client's data.

    The global state is loaded first, so every client of a round starts from the
    same model, and the SGD momentum buffer starts at zero for every update.
    Data order and dropout depend only on ``seed``. The loss is cross-entropy plus
    the configured calibration term, the method's own regulariser (KgCoOp) and the
    aggregation rule's ``penalty`` on the trainable parameters (FedProx, FedDyn).

    When the model carries an ``image_feature_cache`` (set up from ``perf``) that
    holds this dataset, and the image encoder is frozen, the batches are cached
    image features fed to ``model.classify_features`` instead of images: the same
    samples in the same order, without running the image encoder.

    Raises:
        ValueError: when the client has no training samples.
    """
    if len(dataset) == 0:
        raise ValueError(f"Client {client_id} has no training samples; re-partition with fewer clients.")
    load_trainable_state_dict(model, global_state)
    model.train()
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(
        list(named.values()), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    loss_config = loss_config or CalibrationLossConfig()
    regularizer = getattr(model, "regularization_loss", None)
    generator = torch.Generator().manual_seed(seed)
    forward = model
    cache = getattr(model, "image_feature_cache", None)
    cached = cache.lookup(model, dataset, device, precision, training=True) if cache is not None else None
    if cached is not None:
        # Same length and generator, so the sampler draws the same order as over the images.
        dataset = TensorDataset(cached.features, cached.labels)
        forward = model.classify_features
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)

    total_loss, steps, finite = 0.0, 0, True
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # LoRA dropout draws from the global generator
        for _ in range(config.local_epochs):
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast_context(device, precision):
                    logits = forward(images)
                loss = training_loss(logits.float(), labels, loss_config)
                extra = regularizer() if callable(regularizer) else None
                if extra is not None:
                    loss = loss + extra
                if penalty is not None:
                    loss = loss + penalty(named)

                value = loss.item()
                if not math.isfinite(value):
                    logger.warning(
                        "Client %d: training loss became %s at step %d; its update is dropped this round",
                        client_id, value, steps + 1,
                    )
                    finite = False
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += value
                steps += 1
            if not finite:
                break

    model.eval()
    state = trainable_state_dict(model)
    if finite and not all(torch.isfinite(tensor).all() for tensor in state.values()):
        logger.warning(
            "Client %d: trained parameters became NaN or infinite (lower train.lr); its update is dropped this round",
            client_id,
        )
        finite = False
    return ClientUpdate(
        client_id=client_id,
        state=state,
        num_examples=len(dataset),
        num_steps=steps,
        train_loss=total_loss / max(steps, 1) if finite else math.nan,
        finite=finite,
    )
