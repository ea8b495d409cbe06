"""One client's local update: load the global state, train with a fresh SGD, return the new state."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl2ora.config import TrainConfig
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
) -> ClientUpdate:
    """Train the global trainable state on one client's data.

    The global state is loaded first, so every client of a round starts from the
    same model, and the SGD momentum buffer starts at zero for every update.
    Data order and dropout depend only on ``seed``.

    Raises:
        ValueError: when the client has no training samples.
    """
    if len(dataset) == 0:
        raise ValueError(f"Client {client_id} has no training samples; re-partition with fewer clients.")
    load_trainable_state_dict(model, global_state)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)

    total_loss, steps = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # LoRA dropout draws from the global generator
        for _ in range(config.local_epochs):
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast_context(device, precision):
                    logits = model(images)
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item()
                steps += 1

    model.eval()
    mean_loss = total_loss / max(steps, 1)
    if not math.isfinite(mean_loss):
        logger.warning("Client %d: non-finite training loss %s", client_id, mean_loss)
    return ClientUpdate(
        client_id=client_id,
        state=trainable_state_dict(model),
        num_examples=len(dataset),
        num_steps=steps,
        train_loss=mean_loss,
    )
