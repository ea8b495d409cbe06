"""Several clients' LoRA updates in one forward and backward pass over the shared frozen backbone.

:func:`batched_client_update` trains G clients of a round together
(``perf.batched_clients``): at every step the frozen backbone runs once on the
concatenation of the G clients' batches, and each client's adapter acts on its own
rows only (:mod:`fl2ora.methods.segmented_lora`). Each client keeps

- its own A and B tensors, initialised from the global state;
- its own data order (a ``DataLoader`` with its seeded generator, as in
  :func:`~fl2ora.federated.client.client_update`);
- its own global random stream for augmentation and LoRA dropout, swapped in
  around its batch fetch and around each of its dropout draws;
- its own SGD momentum buffers and weight decay: one SGD optimizer contains every
  client's tensors, and a client without a gradient in a step (finished, or dropped after a
  non-finite loss) is not stepped.

The loss is the sum of the clients' own losses, so each client's gradient is the
gradient of its own loss. The result per client equals ``client_update``'s within
float rounding: the backbone's matmuls run on larger batches, which groups their
sums differently.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fl2ora.config import TrainConfig
from fl2ora.federated.client import ClientUpdate, autocast_context, client_update
from fl2ora.losses import CalibrationLossConfig, training_loss
from fl2ora.methods.segmented_lora import (
    ADAPTER,
    RandomStream,
    SegmentedLoraLinear,
    SegmentPlan,
    segmented_lora,
    segmented_lora_unsupported,
)
from fl2ora.model.trainable import load_trainable_state_dict
from fl2ora.model.zero_shot import ZeroShotClassifier

logger = logging.getLogger(__name__)

Penalty = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]

_warned_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass
class ClientTask:
    """One client's share of a batched update: the arguments ``client_update`` takes per client."""

    client_id: int
    dataset: Dataset
    seed: int
    """Seed of the data order, augmentation and dropout, as in ``client_update``."""
    penalty: Penalty | None = None
    """The aggregation rule's term on this client's parameters (FedProx, FedDyn), or None."""


def batching_unsupported(model: nn.Module) -> str | None:
    """Return why ``model`` cannot train clients in one batch, or None when it can.

    Batching covers LoRA methods built with :func:`~fl2ora.methods.lora.apply_lora`
    on a :class:`ZeroShotClassifier`: every trainable tensor an adapter weight, no
    method regulariser, and no dropout outside the LoRA inputs. Attention dropout
    draws its masks over the whole joined batch, so a client's masks would differ
    from the ones it draws alone.
    """
    if not isinstance(model, ZeroShotClassifier):
        return f"the classifier is a {type(model).__name__}, not a LoRA-adapted zero-shot classifier"
    if getattr(model, "regularization_loss", None) is not None:
        return "the method adds a regulariser to the loss"
    reason = segmented_lora_unsupported(model)
    if reason is not None:
        return reason
    for encoder in (model.clip.config.vision_config, model.clip.config.text_config):
        if float(getattr(encoder, "attention_dropout", 0.0) or 0.0) > 0:
            return "the backbone has attention dropout, whose masks span the joined batch"
    lora_dropouts = {
        id(dropout) for module in model.modules() if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict)
        for dropout in module.lora_dropout.values()
    }
    if any(isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in lora_dropouts for m in model.modules()):
        return "the backbone has dropout outside the LoRA inputs, whose masks span the joined batch"
    return None


def batched_group_size(model: nn.Module, requested: int) -> int:
    """Return how many clients to train together: ``requested``, or 1 when the model cannot batch.

    Logs the reason once per model when it falls back.
    """
    if requested <= 1:
        return 1
    reason = batching_unsupported(model)
    if reason is None:
        return requested
    if model not in _warned_models:
        _warned_models.add(model)
        logger.warning("perf.batched_clients=%d does not apply: %s. Clients train one after another", requested, reason)
    return 1


def train_client_group(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    tasks: Sequence[ClientTask],
    config: TrainConfig,
    device: torch.device,
    precision: str = "fp32",
    loss_config: CalibrationLossConfig | None = None,
) -> list[ClientUpdate]:
    """Train ``tasks`` from ``global_state``: together when there are several, else with ``client_update``.

    Returns:
        One update per task, in task order.
    """
    if len(tasks) > 1:
        return batched_client_update(model, global_state, tasks, config, device, precision, loss_config)
    return [
        client_update(
            model, global_state, task.dataset, config, client_id=task.client_id, seed=task.seed, device=device,
            precision=precision, loss_config=loss_config, penalty=task.penalty,
        )
        for task in tasks
    ]


@dataclass
class _ClientRun:
    """One client's training state inside a batched update."""

    task: ClientTask
    slot: int
    parameters: dict[str, torch.Tensor]
    """Name -> this client's trainable tensor, in the model's parameter order."""
    batches: Iterator
    stream: RandomStream
    uses_cached_features: bool
    """True when the batches contain cached image features instead of images."""
    num_examples: int
    total_loss: float = 0.0
    steps: int = 0
    finite: bool = True
    done: bool = False


def _epochs(loader: DataLoader, epochs: int) -> Iterator:
    """Yield the batches of ``epochs`` passes, a fresh iterator per pass as ``client_update``'s loop makes."""
    for _ in range(epochs):
        yield from loader


def _start_client(
    model: ZeroShotClassifier,
    task: ClientTask,
    slot: int,
    names: list[str],
    config: TrainConfig,
    device: torch.device,
    precision: str,
) -> _ClientRun:
    """Set up one client as ``client_update`` does: its tensors, data loader and random stream."""
    dataset = task.dataset
    cache = getattr(model, "image_feature_cache", None)
    cached = cache.lookup(model, dataset, device, precision, training=True) if cache is not None else None
    if cached is not None:
        dataset = TensorDataset(cached.features, cached.labels)
    generator = torch.Generator().manual_seed(task.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)
    live = dict(model.named_parameters())
    parameters = {name: live[name].detach().clone().requires_grad_(True) for name in names}
    return _ClientRun(
        task=task,
        slot=slot,
        parameters=parameters,
        batches=_epochs(loader, config.local_epochs),
        stream=RandomStream(task.seed, device),
        uses_cached_features=cached is not None,
        num_examples=len(task.dataset),
    )


def _group_logits(
    model: ZeroShotClassifier, plan: SegmentPlan, active: list[tuple[_ClientRun, torch.Tensor]], text_trains: bool
) -> list[torch.Tensor]:
    """Return each active client's logits ``(N_g, C)`` from one image pass and one text pass.

    Args:
        active: (client, its batch input) in client order; the input is images
            ``(N_g, 3, H, W)`` or cached image features ``(N_g, D)``.
        text_trains: whether LoRA adapts the text encoder. While the segmented
            layers are in place the model's own parameters no longer show it.
    """
    image_features: dict[int, torch.Tensor] = {run.slot: inputs for run, inputs in active if run.uses_cached_features}
    encoded = [(run, inputs) for run, inputs in active if not run.uses_cached_features]
    if encoded:
        plan.segments = [(run.slot, inputs.shape[0]) for run, inputs in encoded]
        joined = model.encode_image(torch.cat([inputs for _, inputs in encoded]))  # (sum N_g, D)
        for (run, _), features in zip(encoded, joined.split([s for _, s in plan.segments])):
            image_features[run.slot] = features

    if text_trains:
        num_classes = model.num_classes
        plan.segments = [(run.slot, num_classes) for run, _ in active]
        text = model.encode_text(repeats=len(active)).split(num_classes)  # G x (C, D)
    else:
        text = [model.class_text_features()] * len(active)
    plan.segments = []
    return [model.cosine_logits(image_features[run.slot], text[index]) for index, (run, _) in enumerate(active)]


def _assign_weights(layers: dict[str, SegmentedLoraLinear], runs: list[_ClientRun]) -> None:
    for module_name, layer in layers.items():
        lora_a, lora_b = f"{module_name}.lora_A.{ADAPTER}.weight", f"{module_name}.lora_B.{ADAPTER}.weight"
        layer.weights = [(run.parameters[lora_a], run.parameters[lora_b]) for run in runs]


def _step_group(
    model: ZeroShotClassifier,
    plan: SegmentPlan,
    runs: list[_ClientRun],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str,
    loss_config: CalibrationLossConfig,
    text_trains: bool,
) -> bool:
    """Run one step of every client that has a batch left; return False when none has.

    Each batch is drawn inside its client's random stream (augmentation), and each
    client with a non-finite loss stops there without a step, as in ``client_update``.
    """
    active = []
    for run in runs:
        if run.done:
            continue
        with run.stream.active():
            batch = next(run.batches, None)
        if batch is None:
            run.done = True
            continue
        active.append((run, batch))
    if not active:
        return False

    inputs = [(run, images.to(device, non_blocking=True)) for run, (images, _) in active]
    with autocast_context(device, precision):
        logits = _group_logits(model, plan, inputs, text_trains)
    losses = []
    for (run, (_, labels)), client_logits in zip(active, logits):
        loss = training_loss(client_logits.float(), labels.to(device, non_blocking=True), loss_config)
        if run.task.penalty is not None:
            loss = loss + run.task.penalty(run.parameters)
        losses.append(loss)
    values = torch.stack([loss.detach() for loss in losses]).tolist()  # one device sync for the group

    kept = []
    for (run, _), loss, value in zip(active, losses, values):
        if math.isfinite(value):
            kept.append((run, loss, value))
            continue
        logger.warning(
            "Client %d: training loss became %s at step %d; its update is dropped this round",
            run.task.client_id, value, run.steps + 1,
        )
        run.finite, run.done = False, True
    optimizer.zero_grad(set_to_none=True)
    if kept:
        torch.stack([loss for _, loss, _ in kept]).sum().backward()
        # A dropped client's rows were in the joined pass: clear what reached its tensors, so SGD skips them.
        for run in runs:
            if not run.finite:
                for parameter in run.parameters.values():
                    parameter.grad = None
        optimizer.step()
    for run, _, value in kept:
        run.total_loss += value
        run.steps += 1
    return True


def batched_client_update(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    tasks: Sequence[ClientTask],
    config: TrainConfig,
    device: torch.device,
    precision: str = "fp32",
    loss_config: CalibrationLossConfig | None = None,
) -> list[ClientUpdate]:
    """Train several clients' LoRA adapters from ``global_state`` in joined forward and backward passes.

    Each client's update equals ``client_update(model, global_state, task.dataset,
    config, task.client_id, task.seed, device, precision, loss_config,
    task.penalty)`` within float rounding: same data order, augmentation, dropout
    masks, loss, momentum and weight decay, and the same ``num_examples``,
    ``num_steps``, ``train_loss`` and ``finite``. A client whose data is exhausted
    leaves the group, the others go on. Afterwards the model contains the last task's
    trained tensors and is in eval mode, as after the last of the sequential updates.

    Returns:
        One update per task, in task order.

    Raises:
        ValueError: when the model cannot batch (see :func:`batching_unsupported`),
            or a client has no training samples.
    """
    reason = batching_unsupported(model)
    if reason is not None:
        raise ValueError(f"Cannot train clients in one batch: {reason}. Set perf.batched_clients=1.")
    for task in tasks:
        if len(task.dataset) == 0:
            raise ValueError(f"Client {task.client_id} has no training samples; re-partition with fewer clients.")
    loss_config = loss_config or CalibrationLossConfig()

    load_trainable_state_dict(model, global_state)
    model.train()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    runs = [_start_client(model, task, slot, names, config, device, precision) for slot, task in enumerate(tasks)]
    optimizer = torch.optim.SGD(
        [p for run in runs for p in run.parameters.values()],
        lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
    )
    plan = SegmentPlan(streams=[run.stream for run in runs])
    text_trains = model.text_is_trainable()

    # Every random draw below happens inside one client's stream, and fork_rng keeps the caller's state.
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), segmented_lora(model, plan) as layers:
        _assign_weights(layers, runs)
        while _step_group(model, plan, runs, optimizer, device, precision, loss_config, text_trains):
            pass

    updates = [_finish_client(run) for run in runs]
    load_trainable_state_dict(model, updates[-1].state)
    model.eval()
    return updates


def _finish_client(run: _ClientRun) -> ClientUpdate:
    """Return a client's update, checked for non-finite tensors as ``client_update`` does."""
    state = {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in run.parameters.items()}
    finite = run.finite
    if finite and not all(torch.isfinite(tensor).all() for tensor in state.values()):
        logger.warning(
            "Client %d: trained parameters became NaN or infinite (lower train.lr); its update is dropped this round",
            run.task.client_id,
        )
        finite = False
    return ClientUpdate(
        client_id=run.task.client_id,
        state=state,
        num_examples=run.num_examples,
        num_steps=run.steps,
        train_loss=run.total_loss / max(run.steps, 1) if finite else math.nan,
        finite=finite,
    )
