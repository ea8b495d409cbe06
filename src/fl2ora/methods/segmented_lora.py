"""Segmented LoRA: several clients' adapters applied to their own rows of one batch.

Batched client training (``perf.batched_clients``) runs the frozen backbone once on
the concatenation of several clients' batches. Each adapted linear layer then
computes ``base_layer(x)`` on all rows, and for each client segment ``g`` of the rows
adds ``scaling * B_g(A_g(dropout(x_g)))``, as Punica's and S-LoRA's SGMV kernels do
for serving. Here the segments run as one small matmul pair each: with rank-2
adapters these products are a small share of a step, and plain ``F.linear`` keeps
every operation the same as peft's ``lora.Linear.forward`` on that client's rows
alone.

Each client keeps its own dropout random stream (:class:`RandomStream`), swapped in
around its segment's dropout draw, so its masks are the masks it draws when it
trains alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER = "default"
"""The adapter name :func:`fl2ora.methods.lora.apply_lora` injects."""


class RandomStream:
    """One client's copy of the global random state, as ``torch.manual_seed(seed)`` leaves it.

    The CPU generator draws data augmentation and CPU dropout masks; on CUDA, the
    device's generator draws the dropout masks there.

    Args:
        seed: the seed :func:`fl2ora.federated.client.client_update` passes to ``torch.manual_seed``.
        device: the training device; its CUDA generator is kept too when it is a GPU.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        # NOTE: the CUDA branch, and batched training under bf16 autocast, have not run on a GPU.
        # Only the CPU path is tested against sequential training.
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else []):
            torch.manual_seed(seed)
            self.cpu_state = torch.get_rng_state()
            self.cuda_state = torch.cuda.get_rng_state(device) if cuda else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this stream the global random state, and store where it got to on exit.

        The global state is not restored on exit: the caller runs every random draw
        inside some client's stream, within its own ``fork_rng``.
        """
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        try:
            yield
        finally:
            self.cpu_state = torch.get_rng_state()
            if self.cuda_state is not None:
                self.cuda_state = torch.cuda.get_rng_state(self.device)


@dataclass
class SegmentPlan:
    """The split of the current encoder pass's rows into client segments.

    Set :attr:`segments` before each encoder pass; every segmented layer of that
    pass reads it.
    """

    streams: list[RandomStream]
    """The random stream of each client slot."""
    segments: list[tuple[int, int]] = field(default_factory=list)
    """(client slot, rows) in row order; the rows add up to the pass's batch size."""


class SegmentedLoraLinear(nn.Module):
    """A peft ``lora.Linear`` whose adapter weights differ per client segment of the rows.

    Computes ``base_layer(x) + cat_g(scaling * B_g(A_g(dropout(x_g))))`` with the
    operations of peft's ``lora.Linear.forward`` (input cast to the adapter's dtype,
    result cast back to the base output's dtype). :attr:`weights` contains each client
    slot's ``(A (r, in), B (out, r))`` tensors; the trainer sets it.

    Args:
        layer: the peft layer replaced while the segments train; its base layer,
            dropout module and scaling are reused.
        plan: the shared segment plan.
    """

    def __init__(self, layer: LoraLinear, plan: SegmentPlan) -> None:
        super().__init__()
        self.base_layer = layer.get_base_layer()
        self.lora_dropout = layer.lora_dropout[ADAPTER]
        self.scaling = float(layer.scaling[ADAPTER])
        self.adapter_dtype = layer.lora_A[ADAPTER].weight.dtype
        self.plan = plan
        self.weights: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _draws_random_numbers(self) -> bool:
        return self.lora_dropout.training and not isinstance(self.lora_dropout, nn.Identity)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        x = x if x.dtype == self.adapter_dtype else x.to(self.adapter_dtype)
        draws = self._draws_random_numbers()

        deltas, start = [], 0
        for slot, rows in self.plan.segments:
            lora_a, lora_b = self.weights[slot]
            segment = x[start : start + rows]
            if draws:
                with self.plan.streams[slot].active():
                    segment = self.lora_dropout(segment)
            else:
                segment = self.lora_dropout(segment)
            deltas.append(F.linear(F.linear(segment, lora_a), lora_b) * self.scaling)
            start += rows
        if start != x.shape[0]:
            raise RuntimeError(
                f"Segmented LoRA got {x.shape[0]} rows but its segments cover {start}; the segment plan "
                "was not set for this encoder pass."
            )
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
        return (result + delta).to(result_dtype)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """Return ``(qualified name, layer)`` of every peft ``lora.Linear`` in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLinear)]


def segmented_lora_unsupported(model: nn.Module) -> str | None:
    """Return why :func:`segmented_lora` cannot reproduce ``model``'s training, or None when it can.

    It can when every trainable tensor is the A or B weight of a plain peft
    ``lora.Linear`` with the one adapter :func:`~fl2ora.methods.lora.apply_lora`
    injects (no DoRA or other variant, not merged, adapters enabled).
    """
    layers = lora_layers(model)
    if not layers:
        return "the model has no peft LoRA layer"
    adapter_parameters = set()
    for name, layer in layers:
        if set(layer.lora_A.keys()) != {ADAPTER} or list(layer.active_adapters) != [ADAPTER]:
            return f"{name} has adapters {sorted(layer.lora_A.keys())}, not only {ADAPTER!r}"
        if layer.lora_variant or layer.merged or layer.disable_adapters:
            return f"{name} is merged, disabled or a LoRA variant such as DoRA"
        if layer.lora_A[ADAPTER].bias is not None or layer.lora_B[ADAPTER].bias is not None:
            return f"{name} has LoRA biases"
        adapter_parameters.update({id(layer.lora_A[ADAPTER].weight), id(layer.lora_B[ADAPTER].weight)})
    others = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_parameters]
    if others:
        return f"tensors other than LoRA weights train ({others[:3]})"
    return None


@contextlib.contextmanager
def segmented_lora(model: nn.Module, plan: SegmentPlan) -> Iterator[dict[str, SegmentedLoraLinear]]:
    """Swap every peft ``lora.Linear`` of ``model`` for a :class:`SegmentedLoraLinear`, and back on exit.

    Yields:
        Qualified module name -> segmented layer, in module order. The peft layers
        are restored even when the body raises.
    """
    swapped: list[tuple[nn.Module, str, LoraLinear]] = []
    segmented: dict[str, SegmentedLoraLinear] = {}
    try:
        for name, layer in lora_layers(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            replacement = SegmentedLoraLinear(layer, plan).train(layer.training)
            setattr(parent, child, replacement)
            swapped.append((parent, child, layer))
            segmented[name] = replacement
        logger.debug("Swapped %d LoRA layers for segmented ones", len(swapped))
        yield segmented
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)
