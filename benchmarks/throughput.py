"""Local-training throughput of FL²oRA on this machine: images/s, FLOPs per step and MFU.

Builds CLIP with FL²oRA the way ``fl2ora.experiment`` does (random-initialised backbone,
zero-shot head over 10 dummy class names with the prompt "a photo of a {}.", LoRA from
the default ``LoraConfig``) and times the steps of ``client_update`` on random images.
Data loading and the host-to-device copy are excluded because batches are generated on
the device. In the same run it measures the machine's matrix-multiply throughput, which
is the reference for the model FLOPs utilisation (MFU).

Usage, from the repository root::

    python benchmarks/throughput.py                       # tiny and vit-b-32, 1 warm-up + 3 steps
    python benchmarks/throughput.py --models vit-b-16 --steps 2 --profile
    python benchmarks/throughput.py --json results.json --markdown results.md
    python benchmarks/throughput.py --device cuda         # bf16 matmul and bf16 autocast

The model FLOPs of a step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on
one forward and backward pass. That counter counts matrix multiplies, convolutions and
attention, but not element-wise ops such as softmax, LayerNorm, GELU or the SGD update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

# Only random-initialised architectures are built, so the hub is never needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fl2ora.config import LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from fl2ora.federated.client import autocast_context  # noqa: E402
from fl2ora.methods.lora import apply_lora, count_trainable  # noqa: E402
from fl2ora.model.backbone import ARCHITECTURES, RANDOM_INIT_WARNING, load_backbone  # noqa: E402
from fl2ora.model.zero_shot import ZeroShotClassifier  # noqa: E402
from fl2ora.perf.measure import (  # noqa: E402
    FlopCount,
    count_flops_detailed,
    describe_machine,
    load_average,
    measure_matmul_detailed,
    synchronize,
)
from fl2ora.perf.options import non_negative_int, positive_int  # noqa: E402
from fl2ora.perf.report import render_table  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("tiny", "vit-b-32")
NUM_CLASSES = 10
TEMPLATE = "a photo of a {}."
CPU_MATMUL_SIZES = (512, 1024, 2048)
CUDA_MATMUL_SIZES = (4096, 8192)
PROFILE_TOP_OPS = 12
# A result is flagged as disturbed by other processes when its slowest timed step takes more than
# this many times the fastest...
STEP_TIME_SPREAD_WARNING = 1.25
# ...or when, on the CPU, the torch threads got less than this share of their CPU time while timed.
# Idle 2-core runs measured 0.98 to 1.02, and runs beside two busy processes 0.50 to 0.55.
CPU_UTILISATION_WARNING = 0.8
# Profiler operators that run matrix multiplies and convolutions. The profiler estimates FLOPs
# for the first four only (it counts convolutions on the composite aten::conv2d).
_GEMM_OPERATORS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
MATMUL_OPERATORS = (*_GEMM_OPERATORS, "aten::mkldnn_convolution", "aten::convolution_backward")


def achieved_flops_per_second(flops_per_step: int, step_seconds: float) -> float:
    """Return the FLOP rate of a step: ``flops_per_step / step_seconds``.

    Raises:
        ValueError: when ``flops_per_step`` is negative or ``step_seconds`` is not positive.
    """
    if flops_per_step < 0:
        raise ValueError(f"flops_per_step must be >= 0, got {flops_per_step!r}.")
    if not (math.isfinite(step_seconds) and step_seconds > 0):
        raise ValueError(f"step_seconds must be a positive finite time in seconds, got {step_seconds!r}.")
    return flops_per_step / step_seconds


def model_flops_utilisation(achieved: float, peak: float) -> float:
    """Return the model FLOPs utilisation ``achieved / peak`` as a fraction (0.25 is 25 %).

    Args:
        achieved: model FLOP/s of the workload.
        peak: reference FLOP/s, here the measured matrix-multiply throughput.

    >>> model_flops_utilisation(30e9, 120e9)
    0.25

    Raises:
        ValueError: when ``peak`` is not positive or ``achieved`` is negative.
    """
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"peak must be a positive finite FLOP/s, got {peak!r}. Measure it with measure_matmul.")
    if not (math.isfinite(achieved) and achieved >= 0):
        raise ValueError(f"achieved must be a finite FLOP/s >= 0, got {achieved!r}.")
    return achieved / peak


def build_fl2ora_model(name: str, device: torch.device) -> ZeroShotClassifier:
    """Build random-initialised CLIP ``name`` with the zero-shot head and FL²oRA's LoRA, on ``device``.

    The head scores 10 dummy class names with the prompt ``"a photo of a {}."``.
    LoRA follows the default ``LoraConfig``: q, k and v of every block of both encoders, rank 2.

    Raises:
        ValueError: when ``name`` is not a random-initialisable architecture.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown model {name!r}. Use one of {sorted(ARCHITECTURES)}.")
    backbone = load_backbone(ModelConfig(name=name, random_init=True))
    classnames = [f"class {i}" for i in range(NUM_CLASSES)]
    model = ZeroShotClassifier(backbone.model, backbone.tokenizer, classnames, TEMPLATE)
    apply_lora(backbone.model, LoraConfig())
    return model.to(device)


def _train_step(
    model: ZeroShotClassifier,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    precision: str,
) -> float:
    """Run one step of ``client_update``'s loop and return the loss."""
    with autocast_context(device, precision):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()  # client_update reads the loss every step, which also waits for the device


def _eval_step(model: ZeroShotClassifier, images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Run one batch of ``predict_probabilities`` and return the probabilities on the CPU."""
    with torch.no_grad(), autocast_context(device, precision):
        logits = model(images)
    return torch.softmax(logits.float(), dim=-1).cpu()


def _time_steps(
    step: Callable[[], object], warmup: int, steps: int, device: torch.device
) -> tuple[list[float], float]:
    """Run ``warmup`` untimed steps, then time ``steps`` steps.

    Returns:
        The wall time of each timed step in seconds, and the CPU time of this process
        during them divided by their wall time and the torch thread count.
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    cpu_utilisation = (time.process_time() - cpu_start) / (sum(times) * torch.get_num_threads())
    return times, cpu_utilisation


def _operator_category(name: str) -> Literal["matmul", "attention", "other"]:
    if name in MATMUL_OPERATORS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    return "other"


def _profile_train_step(step: Callable[[], object], device: torch.device, top: int) -> dict[str, Any]:
    """Profile one training step and return its time by operator category and its slowest operators.

    Times are self times: CPU time on the CPU, and on CUDA the device time of the
    kernels each operator launched. ``matmul_flops_per_second`` divides the profiler's
    FLOP estimate for mm, addmm, bmm and baddbmm by their self time.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    with torch.profiler.profile(activities=activities, with_flops=True) as profiler:
        step()
        synchronize(device)
    cpu_utilisation = (time.process_time() - cpu_start) / ((time.perf_counter() - wall_start) * torch.get_num_threads())

    # Kernel events repeat the device time of the operators that launched them, so keep operators only.
    time_attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [
        event
        for event in profiler.key_averages()
        if event.device_type == torch.autograd.DeviceType.CPU and getattr(event, time_attribute) > 0
    ]
    events.sort(key=lambda event: getattr(event, time_attribute), reverse=True)
    total_us = sum(getattr(event, time_attribute) for event in events)

    category_us = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in events:
        category_us[_operator_category(event.key)] += getattr(event, time_attribute)
    gemm_events = [event for event in events if event.key in _GEMM_OPERATORS]
    gemm_us = sum(getattr(event, time_attribute) for event in gemm_events)
    gemm_flops = sum(event.flops for event in gemm_events)
    return {
        "time": "device" if device.type == "cuda" else "cpu",
        "total_self_ms": total_us / 1e3,
        "cpu_utilisation": cpu_utilisation,
        "share_by_category": {name: us / total_us for name, us in category_us.items()} if total_us else {},
        "matmul_flops_per_second": gemm_flops / (gemm_us / 1e6) if gemm_us else 0.0,
        "top_ops": [
            {
                "op": event.key,
                "category": _operator_category(event.key),
                "calls": event.count,
                "self_ms": getattr(event, time_attribute) / 1e3,
                "share": getattr(event, time_attribute) / total_us,
            }
            for event in events[:top]
        ],
    }


def _encoder_shares(flops: FlopCount) -> dict[str, float]:
    """Return the share of FLOPs spent in each CLIP encoder, by module path suffix."""
    shares = {}
    for encoder in ("vision_model", "text_model"):
        encoder_flops = sum(n for name, n in flops.by_module.items() if name.endswith(f"clip.{encoder}"))
        shares[encoder] = encoder_flops / flops.total if flops.total else 0.0
    return shares


def _measure_steps(
    model: ZeroShotClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    precision: str,
    warmup: int,
    steps: int,
    profile: bool,
) -> dict[str, Any]:
    """Count the FLOPs of a training and an evaluation step, then time both kinds of step."""
    train_config = TrainConfig()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters, lr=train_config.lr, momentum=train_config.momentum, weight_decay=train_config.weight_decay
    )

    def train_step() -> float:
        return _train_step(model, optimizer, images, labels, device, precision)

    def eval_step() -> torch.Tensor:
        return _eval_step(model, images, device, precision)

    def forward_backward() -> None:
        with autocast_context(device, precision):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()

    # Count FLOPs on untimed passes. The gradients left behind are cleared by the next step's zero_grad.
    model.train()
    train_flops = count_flops_detailed(forward_backward)
    model.eval()
    # The first evaluation step after training computes the class text features, which the timed
    # steps then reuse, so the FLOPs are counted on a second, steady-state step.
    eval_step()
    eval_flops = count_flops_detailed(eval_step)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_times, train_cpu_utilisation = _time_steps(train_step, warmup, steps, device)
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    profile_result = _profile_train_step(train_step, device, PROFILE_TOP_OPS) if profile else None

    model.eval()
    eval_times, eval_cpu_utilisation = _time_steps(eval_step, warmup, steps, device)
    return {
        "train_flops": train_flops,
        "eval_flops": eval_flops,
        "train_times": train_times,
        "eval_times": eval_times,
        "train_cpu_utilisation": train_cpu_utilisation,
        "eval_cpu_utilisation": eval_cpu_utilisation,
        "peak_memory": peak_memory,
        "profile": profile_result,
    }


@dataclass
class ModelResult:
    """Throughput of one model; times in seconds, FLOPs per batch."""

    model: str
    random_init: bool
    image_size: int
    batch_size: int
    precision: str
    parameters: int
    trainable_parameters: int
    warmup_steps: int
    steps: int
    train_step_times: list[float]
    train_step_seconds: float
    """Median of ``train_step_times``."""
    train_images_per_second: float
    """``batch_size / train_step_seconds``."""
    eval_step_times: list[float]
    eval_step_seconds: float
    eval_images_per_second: float
    train_flops_per_step: int
    """Forward and backward FLOPs of one training step."""
    eval_flops_per_step: int
    train_flops_by_operator: dict[str, int]
    eval_flop_share_by_encoder: dict[str, float]
    """Share of the evaluation FLOPs per encoder. FlopCounterMode attributes backward ops to modules
    unreliably (the training shares sum to more than 1), so there is no training counterpart."""
    train_flops_per_second: float
    eval_flops_per_second: float
    matmul_flops_per_second: float
    train_mfu: float
    """Fraction of ``matmul_flops_per_second``."""
    eval_mfu: float
    train_cpu_utilisation: float | None = None
    """Process CPU time over wall time times torch threads, during the timed training steps.
    About 1 on an idle machine, lower when other processes take CPU time; None on CUDA."""
    eval_cpu_utilisation: float | None = None
    peak_memory_bytes: int | None = None
    """Peak CUDA memory of the training steps; None on the CPU."""
    profile: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _contention_notes(
    kind: Literal["train", "eval"], times: list[float], cpu_utilisation: float, device: torch.device
) -> list[str]:
    """Return a note for each sign that another process competed with the timed steps."""
    label = "training" if kind == "train" else "evaluation"
    notes = []
    if max(times) > STEP_TIME_SPREAD_WARNING * min(times):
        notes.append(
            f"Timed {label} steps took {min(times):.3f} to {max(times):.3f} s. A spread this large usually "
            "means another process competed for the machine, so rerun on an idle machine."
        )
    if device.type == "cpu" and cpu_utilisation < CPU_UTILISATION_WARNING:
        notes.append(
            f"During the timed {label} steps the {torch.get_num_threads()} torch threads got {cpu_utilisation:.0%} "
            "of their CPU time, so another process competed for the cores. Rerun on an idle machine."
        )
    return notes


def measure_model(
    name: str,
    matmul_flops_per_second: float,
    batch_size: int = 32,
    steps: int = 3,
    warmup: int = 1,
    device: torch.device | None = None,
    precision: Literal["fp32", "bf16"] = "fp32",
    seed: int = 0,
    profile: bool = False,
) -> ModelResult:
    """Time FL²oRA training and evaluation steps of model ``name`` on random images.

    A training step is ``client_update``'s loop body: forward (with autocast on CUDA
    when ``precision`` is bf16), cross-entropy, backward, SGD with the default
    ``TrainConfig`` (lr 1e-3, momentum 0.9, weight decay 5e-4), and reading the loss.
    An evaluation step is a ``no_grad`` forward in eval mode plus the softmax copied to
    the CPU. Each kind gets ``warmup`` untimed steps, then ``steps`` timed ones.

    Args:
        name: architecture from ``fl2ora.model.backbone.ARCHITECTURES``.
        matmul_flops_per_second: reference throughput for the MFU, from :func:`measure_matmul_detailed`.
        batch_size: images per step.
        steps: timed steps, >= 1.
        warmup: untimed steps before timing, >= 0.
        device: where to run; the CPU when None.
        precision: ``fp32``, or ``bf16`` autocast (CUDA only, as in the product).
        seed: seed of the random images, labels and LoRA dropout.
        profile: also profile one training step with ``torch.profiler``.

    Raises:
        ValueError: on an unknown model, ``steps`` < 1, ``warmup`` < 0, ``batch_size`` < 1,
            or a non-positive ``matmul_flops_per_second``.
    """
    device = device or torch.device("cpu")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}. The study uses 32.")
    if not (math.isfinite(matmul_flops_per_second) and matmul_flops_per_second > 0):
        raise ValueError(f"matmul_flops_per_second must be positive, got {matmul_flops_per_second!r}.")

    # Build the model, then a batch of random images and labels on the device.
    model = build_fl2ora_model(name, device)
    image_size = model.clip.config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device)

    # Seed the LoRA dropout, which draws from the global generator, without changing the caller's state.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        measured = _measure_steps(model, images, labels, device, precision, warmup, steps, profile)
    train_flops, eval_flops = measured["train_flops"], measured["eval_flops"]
    train_times, eval_times = measured["train_times"], measured["eval_times"]

    # The median resists a step slowed down by another process on the machine.
    train_seconds = statistics.median(train_times)
    eval_seconds = statistics.median(eval_times)
    train_rate = achieved_flops_per_second(train_flops.total, train_seconds)
    eval_rate = achieved_flops_per_second(eval_flops.total, eval_seconds)
    notes = []
    for kind in ("train", "eval"):
        notes += _contention_notes(kind, measured[f"{kind}_times"], measured[f"{kind}_cpu_utilisation"], device)
    if profile and device.type == "cpu" and measured["profile"]["cpu_utilisation"] < CPU_UTILISATION_WARNING:
        notes.append(
            f"During the profiled step the torch threads got {measured['profile']['cpu_utilisation']:.0%} of their "
            "CPU time, so another process competed for the cores. Rerun on an idle machine."
        )
    for note in notes:
        logger.warning("%s: %s", name, note)
    eval_text_share = _encoder_shares(eval_flops)["text_model"]
    if eval_text_share > 0:
        # ZeroShotClassifier computes the class text features once per change of the trainable weights.
        notes.append(
            f"Evaluation reruns the text encoder on every batch ({eval_text_share:.0%} of the evaluation FLOPs): "
            "set perf.text_feature_cache=true to compute it once per evaluation."
        )
    return ModelResult(
        model=name,
        random_init=True,
        image_size=image_size,
        batch_size=batch_size,
        precision=precision,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=count_trainable(model),
        warmup_steps=warmup,
        steps=steps,
        train_step_times=train_times,
        train_step_seconds=train_seconds,
        train_images_per_second=batch_size / train_seconds,
        eval_step_times=eval_times,
        eval_step_seconds=eval_seconds,
        eval_images_per_second=batch_size / eval_seconds,
        train_flops_per_step=train_flops.total,
        eval_flops_per_step=eval_flops.total,
        train_flops_by_operator=train_flops.by_operator,
        eval_flop_share_by_encoder=_encoder_shares(eval_flops),
        train_flops_per_second=train_rate,
        eval_flops_per_second=eval_rate,
        matmul_flops_per_second=matmul_flops_per_second,
        train_mfu=model_flops_utilisation(train_rate, matmul_flops_per_second),
        eval_mfu=model_flops_utilisation(eval_rate, matmul_flops_per_second),
        train_cpu_utilisation=measured["train_cpu_utilisation"] if device.type == "cpu" else None,
        eval_cpu_utilisation=measured["eval_cpu_utilisation"] if device.type == "cpu" else None,
        peak_memory_bytes=measured["peak_memory"],
        profile=measured["profile"],
        notes=notes,
    )


def with_matmul_reference(result: ModelResult, matmul_flops_per_second: float) -> ModelResult:
    """Return a copy of ``result`` whose MFU figures use another matmul reference."""
    return dataclasses.replace(
        result,
        matmul_flops_per_second=matmul_flops_per_second,
        train_mfu=model_flops_utilisation(result.train_flops_per_second, matmul_flops_per_second),
        eval_mfu=model_flops_utilisation(result.eval_flops_per_second, matmul_flops_per_second),
    )


_COLUMNS = (
    ("model", "model", "{}"),
    ("params", "parameters", "{:,}"),
    ("trainable", "trainable_parameters", "{:,}"),
    ("s/step", "train_step_seconds", "{:.3f}"),
    ("train img/s", "train_images_per_second", "{:.1f}"),
    ("eval img/s", "eval_images_per_second", "{:.1f}"),
    ("GFLOP/step", "train_flops_per_step", "{:.1f}"),
    ("achieved GFLOP/s", "train_flops_per_second", "{:.1f}"),
    ("matmul GFLOP/s", "matmul_flops_per_second", "{:.1f}"),
    ("MFU %", "train_mfu", "{:.1f}"),
)
# Multipliers from the stored units (FLOPs, fractions) to the table's units (GFLOP, percent).
_SCALES = {
    "train_flops_per_step": 1e-9,
    "train_flops_per_second": 1e-9,
    "matmul_flops_per_second": 1e-9,
    "train_mfu": 100,
}


def table_rows(results: Sequence[ModelResult]) -> tuple[list[str], list[list[str]]]:
    """Return the table header and one formatted row per model."""
    header = [title for title, _, _ in _COLUMNS]
    rows = []
    for result in results:
        row = []
        for _, attribute, template in _COLUMNS:
            value = getattr(result, attribute)
            row.append(template.format(value * _SCALES.get(attribute, 1)))
        rows.append(row)
    return header, rows


def _render_table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    """Render a table with ``report.render_table``, in Markdown with every column but the first right-aligned."""
    lines = render_table(header, rows, markdown)
    if markdown:
        # report.render_table aligns every Markdown column left, but this report right-aligns its numbers.
        lines[1] = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    return lines


def _format_rates(matmul: dict[str, Any]) -> str:
    return ", ".join(f"{n}: {entry['flops_per_second'] / 1e9:.1f}" for n, entry in matmul["by_size"].items())


def format_report(report: dict[str, Any], results: Sequence[ModelResult], markdown: bool = False) -> str:
    """Return the figures as text or Markdown: machine, matmul reference, table, notes and profiles."""
    machine = report["machine"]
    matmul = report["matmul"]
    code = "`" if markdown else ""
    first = results[0]
    lines = [
        f"Measured {report['date']} with {code}{report['command']}{code}.",
        "",
        f"Machine: {machine['cpu_model']} ({machine['cpu_capability']}), {machine['usable_cpus']} usable of "
        f"{machine['logical_cpus']} logical CPUs, {machine['torch_threads']} torch threads, torch {machine['torch']}"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else "")
        + f". Load average (1 min) before the run {report['load_average_at_start']:.2f}.",
        "",
        f"Matmul reference: {matmul['flops_per_second'] / 1e9:.1f} GFLOP/s, the best sustained rate of "
        f"{matmul['dtype']} {code}torch.mm{code} on n x n matrices. By n before the models: "
        + _format_rates(matmul["before"])
        + "; after: "
        + _format_rates(matmul["after"])
        + ".",
        "",
        *_render_table(*table_rows(results), markdown=markdown),
        "",
        f"Batch {first.batch_size}, {first.precision}, median of {first.steps} timed steps after "
        f"{first.warmup_steps} warm-up. Data loading is excluded. {RANDOM_INIT_WARNING} "
        "Throughput does not depend on the weights.",
    ]
    for result in results:
        for note in result.notes:
            lines += ["", f"{result.model}: {note}"]
        if result.profile:
            profile = result.profile
            header = ["operator", "category", "calls", "self ms", "share"]
            rows = [
                [
                    f"{code}{op['op']}{code}",
                    op["category"],
                    str(op["calls"]),
                    f"{op['self_ms']:.1f}",
                    f"{op['share']:.1%}",
                ]
                for op in profile["top_ops"]
            ]
            shares = profile["share_by_category"]
            lines += [
                "",
                f"Profile of one {result.model} training step: {profile['total_self_ms']:.0f} ms of "
                f"{profile['time']} self time, {shares['matmul']:.0%} in matmul operators (mm, addmm, bmm at "
                f"{profile['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s), {shares['attention']:.0%} in attention "
                f"kernels, {shares['other']:.0%} in other operators.",
                "",
                *_render_table(header, rows, markdown=markdown),
            ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(ARCHITECTURES),
                        help="architectures to measure, random-initialised (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=3,
                        help="timed training steps, and as many timed evaluation steps, per model (default: 3)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps before timing (default: 1)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step (default: 32)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's choice, usually the usable cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: fp32 throughout; cuda: bf16 matmul reference and bf16 autocast (default: cpu)")
    parser.add_argument("--matmul-sizes", nargs="+", type=positive_int, default=None,
                        help=f"square matrix sizes for the reference (default: {CPU_MATMUL_SIZES} on the CPU, "
                             f"{CUDA_MATMUL_SIZES} on CUDA)")
    parser.add_argument("--matmul-seconds", type=float, default=1.0,
                        help="minimum seconds of products per matrix size (default: 1.0)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one training step per model and report the slowest operators")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write the report (machine, table, notes, profiles) to this Markdown file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but torch.cuda.is_available() is False. Use --device cpu.")
    if args.matmul_seconds < 0:
        parser.error(f"--matmul-seconds must be >= 0, got {args.matmul_seconds}.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # NOTE: the CUDA path (bf16 reference, bf16 autocast, device-time profile) has not been run on a GPU yet.
    precision: Literal["fp32", "bf16"] = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sizes = args.matmul_sizes or (CUDA_MATMUL_SIZES if device.type == "cuda" else CPU_MATMUL_SIZES)

    machine = describe_machine(device)
    logger.info("Machine: %s", machine)
    load_at_start = load_average()
    if load_at_start > 0.5 * machine["usable_cpus"]:
        logger.warning(
            "Load average %.2f on %d usable CPUs: other processes compete for the cores, so the figures "
            "will be low and noisy.", load_at_start, machine["usable_cpus"],
        )
    matmul_before = measure_matmul_detailed(sizes, device, dtype, min_seconds=args.matmul_seconds)
    results = []
    for name in args.models:
        logger.info("Measuring %s: batch %d, %d warm-up + %d steps", name, args.batch_size, args.warmup, args.steps)
        results.append(
            measure_model(
                name,
                matmul_before.flops_per_second,
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                device=device,
                precision=precision,
                profile=args.profile,
            )
        )

    # Measure the reference again: another process that was busy during one of the two
    # measurements shows up as a spread, and the better one is the machine's throughput.
    matmul_after = measure_matmul_detailed(sizes, device, dtype, min_seconds=args.matmul_seconds)
    peak = max(matmul_before.flops_per_second, matmul_after.flops_per_second)
    spread = abs(matmul_before.flops_per_second - matmul_after.flops_per_second) / peak
    if spread > 0.2:
        logger.warning(
            "The matmul reference changed by %.0f%% during the run (%.1f then %.1f GFLOP/s): other processes "
            "competed for the machine, so rerun on an idle machine.",
            100 * spread, matmul_before.flops_per_second / 1e9, matmul_after.flops_per_second / 1e9,
        )
    results = [with_matmul_reference(result, peak) for result in results]
    for result in results:
        if result.train_mfu > 1 or result.eval_mfu > 1:
            logger.warning("%s: MFU above 100%% means the matmul reference was measured too low.", result.model)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "load_average_at_start": load_at_start,
        "matmul": {
            "dtype": matmul_before.dtype,
            "flops_per_second": peak,
            "spread": spread,
            "before": asdict(matmul_before),
            "after": asdict(matmul_after),
        },
        "data_loading": "excluded: random batches are created on the device before timing",
        "warning": RANDOM_INIT_WARNING,
        "models": [asdict(result) for result in results],
    }
    print(format_report(report, results, markdown=False))
    if args.markdown is not None:
        args.markdown.write_text(format_report(report, results, markdown=True))
        logger.info("Wrote %s", args.markdown)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("Wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
