"""The benchmark suite: throughput, round time, memory and every speed-up measured on and off.

Sections, each timed in the same process against the same matmul reference:

- ``steps``: per model and method, training and evaluation images/s on random
  batches, FLOPs per step, model FLOPs utilisation (MFU) against the measured
  matmul throughput, and peak memory.
- ``rounds``: per model and method, real :func:`~fl2ora.runtime.simulation.run_simulation`
  rounds on small client data, split into training, aggregation, evaluation and
  everything else (checkpoint, records, sampling).
- ``speedups``: each ``perf`` switch on and off on the same configuration, with the
  round times and the largest differences of trained tensors, probabilities and
  metrics, checked against :data:`TOLERANCE`. Also ``perf.batched_clients`` on and
  off with its upper bound (one adapter on the joined batch), and bf16 autocast
  (CUDA only).
- ``scale``: the 100-client protocol in one process: memory with one backbone,
  and a round with 10 sampled clients split as above.

Usage, from the repository root::

    fl2ora bench --json bench.json --markdown bench.md
    python benchmarks/suite.py --models tiny --sections steps rounds
    fl2ora bench --data ../shared/data/cifar10.tar.gz   # real CIFAR-10 in the scale section

Backbones are random-initialised. Speed does not depend on the weights, but the
metrics of these runs are no evidence about CLIP.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fl2ora.config import RunConfig, apply_overrides, config_from_dict
from fl2ora.data.datasets import CIFAR10_CLASSES
from fl2ora.errors import ConfigError
from fl2ora.evaluation.calibration import METRIC_NAMES
from fl2ora.experiment import build_experiment
from fl2ora.federated.client import autocast_context
from fl2ora.losses import training_loss
from fl2ora.methods.registry import build_classifier
from fl2ora.model.backbone import RANDOM_INIT_WARNING, load_backbone
from fl2ora.model.trainable import load_adapter
from fl2ora.perf import measure
from fl2ora.perf.options import DEFAULT_BATCH, add_bench_arguments, check_bench_arguments
from fl2ora.perf.report import machine_busy
from fl2ora.perf.speedups import configure_classifier
from fl2ora.rundir import RunDirectory
from fl2ora.runtime.simulation import run_simulation

logger = logging.getLogger(__name__)

TEMPLATE = "a photo of a {}."
TOLERANCE = {"state": 1e-5, "probabilities": 1e-5, "metrics": 1e-5}
"""Largest absolute difference allowed between a speed-up's on and off runs: of any trained
tensor element, of any class probability, and of any client-mean metric (as a fraction)."""
AUTOCAST_TOLERANCE = {"state": 1e-2, "probabilities": 5e-2, "metrics": 5e-2}
"""The same for bf16 autocast against fp32, whose matmuls round to 8 mantissa bits."""
SWITCHES = ("text_feature_cache", "trim_text_padding", "image_feature_cache", "decoded_image_cache")
BATCHED_CLIENTS = 2
"""Clients per pass in the ``perf.batched_clients`` case and its bound."""
LOADER_IMAGES = 64
LOADER_SIZE = 224
"""Images and pixel size of the data-loading measurement: ViT-B's input size."""
CPU_MATMUL_SIZES = (512, 1024, 2048)
CUDA_MATMUL_SIZES = (4096, 8192)


@dataclass
class SpeedupCase:
    """One speed-up measured on and off: the switch, and the run it matters in."""

    switch: str
    method: str
    overrides: tuple[str, ...]
    reason: str
    """The work the switch saves in this run."""
    protocol: bool = False
    """Run on ``--protocol-model`` with the CIFAR protocol's batch and test share (see
    :data:`PROTOCOL_ROUND`) instead of the speed-up section's small rounds."""
    on: tuple[str, ...] = ()
    """Overrides that turn the switch on; empty for a switch that is on by default."""
    off: tuple[str, ...] | None = None
    """Overrides that turn the switch off; None means ``perf.<switch>=false``."""

    def on_overrides(self) -> tuple[str, ...]:
        """Return the overrides of the run with the switch on."""
        return (*self.overrides, *self.on)

    def off_overrides(self) -> tuple[str, ...]:
        """Return the overrides of the run with the switch off."""
        off = self.off if self.off is not None else (f"perf.{self.switch}=false",)
        return (*self.overrides, *off)


PROTOCOL_ROUND = {"clients": 1, "train_per_client": 30, "test_per_client": 60, "batch_size": 32}
"""A round shaped like one of the study's CIFAR protocol: training steps of batch 32, and
twice as many test images as trained ones (10 of 100 clients train on 500 images each,
and all 10,000 test images are evaluated)."""

SPEEDUP_CASES = (
    SpeedupCase("text_feature_cache", "fl2ora", ("eval.batch_size=2",),
                "LoRA trains the text encoder: one text pass per evaluation, not per batch (batch 2 here)"),
    SpeedupCase("text_feature_cache", "fl2ora", ("lora.encoder=vision",),
                "frozen text encoder: one text pass per client update instead of per batch"),
    SpeedupCase("trim_text_padding", "fl2ora", (),
                "LoRA on the text encoder: every step runs it on the prompts, with the same dropout masks"),
    SpeedupCase("trim_text_padding", "coop", ("data.augment=false",),
                "CoOp's steps run the text encoder only once image features are cached"),
    SpeedupCase("image_feature_cache", "coop", ("data.augment=false",),
                "frozen image encoder, deterministic transform: images encoded once"),
    SpeedupCase("decoded_image_cache", "fl2ora", (), "images resized once instead of every epoch and round"),
    SpeedupCase("image_feature_cache", "coop", ("data.augment=false",),
                "the same, in a round shaped like the CIFAR protocol's", protocol=True),
)

BATCHED_CLIENTS_CASE = SpeedupCase(
    "batched_clients", "fl2ora", (),
    f"{BATCHED_CLIENTS} clients' LoRA steps share one pass over the frozen backbone (larger matmuls)",
    on=(f"perf.batched_clients={BATCHED_CLIENTS}",), off=("perf.batched_clients=1",),
)
"""Measured with the speed-up cases. It is kept out of :data:`SPEEDUP_CASES`, whose users
turn every switch off with ``perf.<switch>=false``: this switch is an int and off by default."""


# ---------------------------------------------------------------------------------------------------
# Data and configurations
# ---------------------------------------------------------------------------------------------------


@dataclass
class DataSource:
    """The image source of the rounds: generated PNGs or a CIFAR-10 root."""

    dataset: str
    root: str
    real: bool


def write_generated_images(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> DataSource:
    """Write 32 x 32 PNG images in ``root/{train,test}/<CIFAR-10 class>/`` whose colour depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, name in enumerate(CIFAR10_CLASSES):
        colour = rng.uniform(40, 215, size=3)
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                pixels = np.clip(colour + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.png")
    return DataSource("image_folder", str(root), real=False)


def generated_images_per_class(args: argparse.Namespace, batch: dict[str, int]) -> tuple[int, int]:
    """Return the training and test images per class to generate for the sections in ``args``.

    Covers every reader of the generated folder: the round and speed-up sections'
    clients, the protocol-shaped round (:data:`PROTOCOL_ROUND`), the data-loading
    measurement (:data:`LOADER_IMAGES`) and the scale section unless ``--data``
    replaces its images. Each class gets one image more than an even share needs.
    """
    sections = set(args.sections)
    train, test = [0], [0]
    if sections & {"rounds", "speedups"}:
        train.append(args.round_clients * max(batch.values()))
        test.append(args.round_clients * args.round_test_images)
    if "speedups" in sections:
        train += [PROTOCOL_ROUND["clients"] * PROTOCOL_ROUND["train_per_client"], LOADER_IMAGES]
        test.append(PROTOCOL_ROUND["clients"] * PROTOCOL_ROUND["test_per_client"])
    if "scale" in sections and args.data is None:
        train.append(args.scale_clients * args.scale_train_images)
        test.append(args.scale_clients * args.scale_test_images)
    classes = len(CIFAR10_CLASSES)
    return math.ceil(max(train) / classes) + 1, math.ceil(max(test) / classes) + 1


def make_config(
    model: str,
    method: str,
    data: DataSource,
    device: torch.device,
    precision: str,
    *,
    clients: int,
    train_per_client: int,
    test_per_client: int,
    rounds: int,
    batch_size: int | None = None,
    sampled: int | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Return a run of ``method`` on ``model`` with an IID split giving each client about the requested images.

    Every class keeps ``ceil(clients * train_per_client / 10)`` training images, so
    a client can get a few more than requested. ``batch_size`` None makes each
    client's update one step over all its images.
    """
    classes = len(CIFAR10_CLASSES)
    blocks = 4 if model == "tiny" else 12
    train_per_class = math.ceil(clients * train_per_client / classes)
    if batch_size is None:
        batch_size = math.ceil(train_per_class * classes / clients)
    values = {
        "name": f"bench-{model}-{method}",
        "seed": 0,
        "method": method,
        "model": {"name": model, "random_init": True, "device": device.type, "precision": precision},
        "maple": {"depth": min(9, blocks)},
        "data": {
            "dataset": data.dataset,
            "root": data.root,
            "max_train_per_class": train_per_class,
            "max_test_per_class": math.ceil(clients * test_per_client / classes),
        },
        "partition": {"method": "iid", "num_clients": clients, "min_samples": 1},
        "federated": {"rounds": rounds, "fraction": (sampled or clients) / clients},
        "train": {"batch_size": batch_size},
        "eval": {"batch_size": 32, "last_rounds": 1},
    }
    return config_from_dict(apply_overrides(values, list(overrides)))


# ---------------------------------------------------------------------------------------------------
# Section "steps": throughput, FLOPs, MFU, memory
# ---------------------------------------------------------------------------------------------------


def measure_steps(
    model_name: str,
    method: str,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    peak_flops: float,
    profile: bool = False,
) -> dict[str, Any]:
    """Time training and evaluation steps of ``method`` on random images and return the figures.

    A training step is :func:`~fl2ora.federated.client.client_update`'s loop body:
    forward with autocast, loss, the method's regulariser, backward, SGD step and
    reading the loss. An evaluation step is a ``no_grad`` forward in eval mode and
    the softmax copied to the CPU. Data loading is excluded. The classifier has the
    default ``perf`` text switches; images are always encoded, since a random batch
    is not a cached dataset.
    """
    config = make_config(model_name, method, DataSource("cifar10", "", False), device, precision, clients=1,
                         train_per_client=1, test_per_client=1, rounds=1, batch_size=batch_size)
    backbone = load_backbone(config.model)
    model = build_classifier(config, backbone, list(CIFAR10_CLASSES), TEMPLATE).to(device)
    configure_classifier(model, config.perf, None)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=config.train.lr, momentum=config.train.momentum,
                                weight_decay=config.train.weight_decay)
    regularizer = getattr(model, "regularization_loss", None)
    generator = torch.Generator().manual_seed(0)
    size = backbone.image_size
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, len(CIFAR10_CLASSES), (batch_size,), generator=generator).to(device)

    def loss_of_batch() -> torch.Tensor:
        with autocast_context(device, precision):
            logits = model(images)
        loss = training_loss(logits.float(), labels, config.loss)
        extra = regularizer() if callable(regularizer) else None
        return loss + extra if extra is not None else loss

    def train_step() -> float:
        model.train()
        loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    def eval_step() -> torch.Tensor:
        model.eval()
        with torch.no_grad(), autocast_context(device, precision):
            logits = model(images)
        return torch.softmax(logits.float(), dim=-1).cpu()

    # The counted training step also warms up: it allocates the momentum buffers. The first
    # evaluation step computes the class text features that later evaluation steps reuse, so
    # the evaluation FLOPs are counted on the second, steady-state step.
    train_flops = measure.count_flops(train_step)
    eval_step()
    eval_flops = measure.count_flops(eval_step)

    with measure.PeakMemory(device) as memory:
        train_times = measure.time_calls(train_step, warmup, steps, device)
    eval_times = measure.time_calls(eval_step, warmup, steps, device)
    train_seconds, eval_seconds = measure.median(train_times), measure.median(eval_times)
    result = {
        "model": model_name,
        "method": method,
        "batch_size": batch_size,
        "precision": precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in parameters),
        "train_step_seconds": train_times,
        "eval_step_seconds": eval_times,
        "train_images_per_second": batch_size / train_seconds,
        "eval_images_per_second": batch_size / eval_seconds,
        "train_flops_per_step": train_flops,
        "eval_flops_per_step": eval_flops,
        "train_mfu": train_flops / train_seconds / peak_flops,
        "eval_mfu": eval_flops / eval_seconds / peak_flops,
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_kind": memory.kind,
    }
    if profile:
        result["profile"] = measure.profile_shares(train_step, device)
    return result


def batched_clients_bound(
    model_name: str, batch_size: int, clients: int, steps: int, warmup: int, device: torch.device, precision: str,
    peak_flops: float,
) -> dict[str, Any]:
    """Measure FL²oRA training at ``batch_size`` and at ``clients * batch_size`` images per step.

    Training K clients' adapters in one pass (``perf.batched_clients``) runs the
    frozen backbone on K batches at once. It cannot beat one adapter on a K-times
    larger batch, which needs the same image FLOPs and no per-client segments. The
    ratio of the two throughputs is the most that batched clients could gain here.
    """
    single = measure_steps(model_name, "fl2ora", batch_size, steps, warmup, device, precision, peak_flops)
    measure.release_memory()
    joined = measure_steps(model_name, "fl2ora", clients * batch_size, steps, warmup, device, precision, peak_flops)
    return {
        "model": model_name,
        "clients": clients,
        "batch_size": batch_size,
        "images_per_second": single["train_images_per_second"],
        "joined_images_per_second": joined["train_images_per_second"],
        "bound": joined["train_images_per_second"] / single["train_images_per_second"],
        "mfu": single["train_mfu"],
        "joined_mfu": joined["train_mfu"],
    }


def measure_loader(images: DataSource, count: int, size: int) -> dict[str, Any]:
    """Measure data loading in images/s: the evaluation transform at ``size`` px, uncached and cached.

    Reads the first ``count`` generated training images, or all of them where the
    folder has fewer, three times: without the decoded-image cache, then with it
    while it fills, then from the filled cache. The result's ``images`` is the
    number read.
    """
    from fl2ora.data import clip_transforms
    from fl2ora.data.datasets import load_image_folder
    from fl2ora.perf.images import CachedImageSamples, ImageMemoryBudget

    train = load_image_folder(images.root).train
    count = min(count, len(train))
    samples = train.subset(np.arange(count)).with_transform(clip_transforms(size, train=False))
    cached = CachedImageSamples(samples, ImageMemoryBudget(2**31))

    def read_all(dataset) -> float:
        start = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        return count / (time.perf_counter() - start)

    return {"images": count, "size": size, "uncached_images_per_second": read_all(samples),
            "filling_images_per_second": read_all(cached), "cached_images_per_second": read_all(cached)}


# ---------------------------------------------------------------------------------------------------
# Sections "rounds", "speedups" and "scale": real rounds of the in-process simulation
# ---------------------------------------------------------------------------------------------------


def split_round(timing: dict[str, float]) -> dict[str, float]:
    """Return a round's seconds as training, aggregation, evaluation, other and total.

    ``other`` is the total minus the three phases: sampling, bookkeeping, the
    metrics records and the checkpoint, which ``checkpoint`` also gives alone.
    """
    train, aggregate = timing["seconds_train"], timing["seconds_aggregate"]
    evaluate = timing.get("seconds_eval", 0.0)
    total = timing["seconds_total"]
    return {"train": train, "aggregate": aggregate, "eval": evaluate,
            "other": max(total - train - aggregate - evaluate, 0.0), "checkpoint": timing["seconds_checkpoint"],
            "total": total}


def run_rounds(
    config: RunConfig, folder: Path, train_limit: int | None = None, measure_memory: bool = False
) -> dict[str, Any]:
    """Build ``config``'s experiment and run it with :func:`run_simulation`, timing every round.

    Args:
        train_limit: when given, each client trains on its first ``train_limit``
            images only (the scale section's small data).
        measure_memory: also return the RSS before and after the build and the
            parameter bytes of the one backbone.

    Returns:
        The round splits, images trained and evaluated per round, peak memory,
        final probabilities, trained state and client-mean metrics.
    """
    measure.release_memory()
    rss_before = measure.current_rss_bytes()
    # Models alive before the build (earlier benchmarks, a test session) are not this run's.
    models_before = _count_clip_models() if measure_memory else 0
    experiment = build_experiment(config)
    rss_built = measure.current_rss_bytes()
    training_images = sum(len(d) for d in experiment.client_train)
    if train_limit is not None:
        experiment.client_train = [
            dataset.subset(np.arange(min(train_limit, len(dataset)))) for dataset in experiment.client_train
        ]
    timings: list[dict[str, float]] = []
    with measure.PeakMemory(experiment.device) as memory:
        summary = run_simulation(experiment, RunDirectory(folder, overwrite=True), on_round_end=timings.append)
    with np.load(folder / "predictions.npz") as predictions:
        probabilities = predictions["probs"]
    sampled_per_round = max(1, round(config.federated.fraction * experiment.num_clients))
    feature_cache = getattr(experiment.model, "image_feature_cache", None)
    budget = experiment.image_memory_budget
    result = {
        "splits": [split_round(timing) for timing in timings],
        "train_images_per_round": sum(len(d) for d in experiment.client_train) * sampled_per_round
        / experiment.num_clients,
        "eval_images_per_round": len(experiment.eval_dataset),
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_kind": memory.kind,
        "probabilities": probabilities,
        "state": load_adapter(folder / "adapter.safetensors"),
        "metrics": summary["final"]["mean"] if "final" in summary else {},
        "feature_sets_computed": feature_cache.computed if feature_cache is not None else 0,
        "decoded_image_bytes": budget.used if budget is not None else 0,
    }
    if measure_memory:
        result["memory"] = {
            "rss_before_build": rss_before,
            "rss_after_build": rss_built,
            "rss_after_rounds": measure.current_rss_bytes(),
            "backbone_parameter_bytes": sum(p.numel() * p.element_size() for p in experiment.backbone.model.parameters()),
            "clip_models_in_process": _count_clip_models() - models_before,
            "clients": experiment.num_clients,
            "training_images": training_images,
            "decoded_image_cache_bytes": result["decoded_image_bytes"],
        }
    del experiment
    measure.release_memory()
    return result


def _count_clip_models() -> int:
    """Return how many ``CLIPModel`` objects this process holds."""
    from transformers import CLIPModel

    with warnings.catch_warnings():
        # isinstance on some of torch's deprecated module attributes warns; the count is unaffected.
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, CLIPModel))


def compare_runs(on: dict[str, Any], off: dict[str, Any], tolerance: dict[str, float]) -> dict[str, Any]:
    """Return the largest differences between two runs and whether each is within ``tolerance``."""
    state = max((float((on["state"][k] - off["state"][k]).abs().max()) for k in off["state"]), default=0.0)
    probabilities = float(np.abs(on["probabilities"] - off["probabilities"]).max())
    metrics = max((abs(on["metrics"][k] - off["metrics"][k]) for k in METRIC_NAMES if k in off["metrics"]),
                  default=0.0)
    differences = {"state": state, "probabilities": probabilities, "metrics": metrics}
    return {
        "max_abs_difference": differences,
        "equal_within_tolerance": all(differences[k] <= tolerance[k] for k in differences),
        "tolerance": tolerance,
    }


def measure_pair(
    on_config: RunConfig, off_config: RunConfig, folder: Path, tolerance: dict[str, float] = TOLERANCE
) -> dict[str, Any]:
    """Run the same rounds with a speed-up on and off and compare their times and results."""
    on = run_rounds(on_config, folder / "on")
    off = run_rounds(off_config, folder / "off")
    steady_on, steady_off = on["splits"][-1], off["splits"][-1]
    return {
        "on": on["splits"],
        "off": off["splits"],
        "feature_sets_computed": {"on": on["feature_sets_computed"], "off": off["feature_sets_computed"]},
        "decoded_image_bytes": {"on": on["decoded_image_bytes"], "off": off["decoded_image_bytes"]},
        "speedup_steady_round": steady_off["total"] / steady_on["total"],
        "speedup_all_rounds": sum(s["total"] for s in off["splits"]) / sum(s["total"] for s in on["splits"]),
        **compare_runs(on, off, tolerance),
    }


# ---------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """Keep the library's per-round INFO lines off the console while the suite runs."""
    library = logging.getLogger("fl2ora")
    previous = library.level
    library.setLevel(logging.WARNING)
    logging.getLogger(__name__).setLevel(logging.INFO)
    try:
        yield
    finally:
        library.setLevel(previous)


def run_suite(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the sections selected in ``args`` and return every figure (see the module docstring)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False. Use --device cpu.")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = CUDA_MATMUL_SIZES if device.type == "cuda" else CPU_MATMUL_SIZES
    batch = {**DEFAULT_BATCH, **args.batch_size}
    started = time.perf_counter()

    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": measure.describe_machine(device),
        "load_average_at_start": measure.load_average(),
        "device": device.type,
        "precision": precision,
        "warning": RANDOM_INIT_WARNING,
        "tolerance": TOLERANCE,
    }
    load, cpus = report["load_average_at_start"], report["machine"]["usable_cpus"]
    if machine_busy(load, cpus):
        logger.warning("Load average %.2f on %d usable CPUs at the start: other processes compete for the cores, "
                       "so the figures will be low and noisy.", load, cpus)
    matmul_before = measure.measure_matmul(sizes, device, dtype, args.matmul_seconds)
    peak = matmul_before["flops_per_second"]

    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_library_logs())
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fl2ora-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        # Generated images for the rounds: their speed does not depend on the pixels, and a
        # small folder loads in a fraction of the time of CIFAR-10's 60,000 images.
        images = write_generated_images(workdir / "images", *generated_images_per_class(args, batch))
        scale_data = DataSource("cifar10", str(args.data), real=True) if args.data is not None else images
        report["data"] = {"rounds": images.root, "scale": scale_data.root, "real_images_in_scale": scale_data.real}

        if "steps" in args.sections:
            report["steps"] = []
            for model in args.models:
                for method in args.methods:
                    logger.info("Steps section: %s %s, batch %d (RSS %.0f MiB)", model, method, batch[model],
                                measure.current_rss_bytes() / 2**20)
                    report["steps"].append(measure_steps(
                        model, method, batch[model], args.steps, args.warmup, device, precision, peak,
                        profile=(model == "vit-b-32" and method == "fl2ora"),
                    ))
                    measure.release_memory()  # the model of this measurement

        _write_partial(args, report)
        if "rounds" in args.sections:
            report["rounds"] = []
            for model in args.models:
                for method in args.methods:
                    logger.info("Rounds section: %s %s (RSS %.0f MiB)", model, method, measure.current_rss_bytes() / 2**20)
                    config = make_config(model, method, images, device, precision, clients=args.round_clients,
                                         train_per_client=batch[model], test_per_client=args.round_test_images,
                                         rounds=args.rounds)
                    run = run_rounds(config, workdir / "runs" / f"{model}-{method}")
                    report["rounds"].append({
                        "model": model, "method": method, "splits": run["splits"],
                        "train_images_per_round": run["train_images_per_round"],
                        "eval_images_per_round": run["eval_images_per_round"],
                        "peak_memory_bytes": run["peak_memory_bytes"], "peak_memory_kind": run["peak_memory_kind"],
                    })

        _write_partial(args, report)
        if "speedups" in args.sections:
            report["speedups"] = _speedup_section(args, images, workdir, device, precision, batch, peak)

        _write_partial(args, report)
        if "scale" in args.sections:
            report["scale"] = _scale_section(args, scale_data, workdir, device, precision)

    matmul_after = measure.measure_matmul(sizes, device, dtype, args.matmul_seconds)
    report["matmul"] = {
        "dtype": matmul_before["dtype"],
        "flops_per_second": max(matmul_before["flops_per_second"], matmul_after["flops_per_second"]),
        "before": matmul_before,
        "after": matmul_after,
    }
    # MFU against the better of the two references: a busy machine lowers one of them.
    scale_mfu = peak / report["matmul"]["flops_per_second"]
    for entry in report.get("steps", []):
        entry["train_mfu"] *= scale_mfu
        entry["eval_mfu"] *= scale_mfu
    for entry in report.get("speedups", {}).get("batched_clients", []):
        entry["mfu"] *= scale_mfu
        entry["joined_mfu"] *= scale_mfu
    report["load_average_at_end"] = measure.load_average()
    report["seconds"] = time.perf_counter() - started
    from fl2ora.perf.report import evaluate_targets

    report["targets"] = evaluate_targets(report)
    return report


def _write_partial(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Write the figures so far to ``--json`` with a ``.partial`` suffix, so a stopped run keeps them."""
    if args.json is not None:
        import json

        path = args.json.with_name(args.json.name + ".partial")
        path.write_text(json.dumps(_jsonable(report), indent=2) + "\n")


def _speedup_section(
    args: argparse.Namespace, images: DataSource, workdir: Path, device: torch.device, precision: str,
    batch: dict[str, int], peak: float,
) -> dict[str, Any]:
    model = args.speedup_model
    section: dict[str, Any] = {"model": model, "cases": [], "batched_clients": []}

    def config_for(
        method: str, overrides: Sequence[str], model_precision: str = precision, protocol: bool = False
    ) -> RunConfig:
        if protocol:
            return make_config(args.protocol_model, method, images, device, model_precision, rounds=args.rounds,
                               overrides=overrides, **PROTOCOL_ROUND)
        return make_config(model, method, images, device, model_precision, clients=args.round_clients,
                           train_per_client=batch[model], test_per_client=args.round_test_images,
                           rounds=args.rounds, overrides=overrides)

    for index, case in enumerate((*SPEEDUP_CASES, BATCHED_CLIENTS_CASE)):
        case_model = args.protocol_model if case.protocol else model
        logger.info("Speed-ups section: %s on and off (%s on %s, RSS %.0f MiB)", case.switch, case.method,
                    case_model, measure.current_rss_bytes() / 2**20)
        on = config_for(case.method, case.on_overrides(), protocol=case.protocol)
        off = config_for(case.method, case.off_overrides(), protocol=case.protocol)
        pair = measure_pair(on, off, workdir / "speedups" / f"{index}-{case.switch}")
        section["cases"].append({"switch": case.switch, "method": case.method, "overrides": list(case.overrides),
                                 "reason": case.reason, "model": case_model, "protocol": case.protocol, **pair})

    # Every switch at once against the plain computation, for CoOp and FL²oRA.
    for method, overrides in (("coop", ("data.augment=false",)), ("fl2ora", ())):
        logger.info("Speed-ups section: all on and all off (%s on %s)", method, model)
        on = config_for(method, overrides)
        off = config_for(method, (*overrides, *(f"perf.{name}=false" for name in SWITCHES)))
        pair = measure_pair(on, off, workdir / "speedups" / f"all-{method}")
        section["cases"].append({"switch": "all", "method": method, "overrides": list(overrides),
                                 "reason": "every switch together against the plain computation", "model": model,
                                 "protocol": False, **pair})

    # NOTE: the CUDA path (bf16 reference, autocast pair, max_memory_allocated) has not run on a GPU yet.
    if device.type == "cuda":
        logger.info("Speed-ups section: bf16 autocast against fp32 (fl2ora on %s)", model)
        pair = measure_pair(config_for("fl2ora", ()), config_for("fl2ora", (), "fp32"),
                            workdir / "speedups" / "autocast", AUTOCAST_TOLERANCE)
        section["cases"].append({"switch": "model.precision=bf16", "method": "fl2ora", "overrides": [],
                                 "reason": "bf16 autocast, fp32 master weights and optimizer state", "model": model,
                                 "protocol": False, **pair})
    else:
        section["autocast"] = "not measured: autocast applies on CUDA only and this run has no GPU"

    logger.info("Speed-ups section: data loading with and without the decoded-image cache")
    section["loader"] = measure_loader(images, LOADER_IMAGES, LOADER_SIZE)

    logger.info("Speed-ups section: batched-clients bound on %s", model)
    section["batched_clients"].append(batched_clients_bound(
        model, batch[model], BATCHED_CLIENTS, args.steps, args.warmup, device, precision, peak
    ))
    return section


def _scale_section(
    args: argparse.Namespace, data: DataSource, workdir: Path, device: torch.device, precision: str
) -> dict[str, Any]:
    model = args.scale_model
    logger.info("Scale section: %d clients on %s, %d sampled", args.scale_clients, model, args.scale_sampled)
    config = make_config(model, "fl2ora", data, device, precision, clients=args.scale_clients,
                         train_per_client=args.scale_train_images, test_per_client=args.scale_test_images,
                         rounds=1, sampled=args.scale_sampled)
    train_limit = None
    if data.real:
        # Hold the whole training set, as the protocol does, but train each sampled client on a few images.
        values = apply_overrides(_config_values(config), ["data.max_train_per_class=null"])
        config = config_from_dict(values)
        train_limit = args.scale_train_images
    run = run_rounds(config, workdir / "scale", train_limit=train_limit, measure_memory=True)
    split = run["splits"][-1]
    return {
        "model": model,
        "clients": args.scale_clients,
        "sampled": args.scale_sampled,
        "train_images_per_client": args.scale_train_images,
        "test_images_per_client": args.scale_test_images,
        "split": split,
        "other_share": (split["aggregate"] + split["other"]) / split["total"],
        "memory": run["memory"],
        "peak_memory_bytes": run["peak_memory_bytes"],
        "peak_memory_kind": run["peak_memory_kind"],
    }


def _config_values(config: RunConfig) -> dict[str, Any]:
    from fl2ora.config import config_to_dict

    return config_to_dict(config)


def build_parser(prog: str = "fl2ora bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    return parser


def main_with_args(args: argparse.Namespace, command: str) -> int:
    """Check the options, run the suite, print the report and write the requested files.

    Raises:
        ConfigError: for a combination of options that cannot run, before any measurement.
    """
    from fl2ora.perf.report import format_report

    check_bench_arguments(args)

    if not any(logging.getLogger().handlers):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_suite(args, command)
    print(format_report(report, markdown=False))
    if args.markdown is not None:
        args.markdown.write_text(format_report(report, markdown=True))
        logger.info("Wrote %s", args.markdown)
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
        args.json.with_name(args.json.name + ".partial").unlink(missing_ok=True)
        logger.info("Wrote %s", args.json)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/suite.py``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser("python benchmarks/suite.py")
    args = parser.parse_args(argv)
    try:
        check_bench_arguments(args)
    except ConfigError as error:
        parser.error(str(error))
    return main_with_args(args, " ".join(["python benchmarks/suite.py", *argv]))
