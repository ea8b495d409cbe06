"""Measuring tools of the benchmark suite and ``benchmarks/throughput.py``: FLOPs, matmul
throughput, peak memory, step times and a description of the machine.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix multiplies,
convolutions and attention, one multiply-add counting 2 FLOPs. Element-wise work
(softmax, LayerNorm, GELU, dropout, the optimizer update) is not counted, which is
the usual convention of model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

logger = logging.getLogger(__name__)


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# NOTE: torch 2.14.1's FlopCounterMode has formulas for the CUDA attention kernels only, so the
# CPU kernel's two attention matmuls per block would count as zero. These use the same formulas.
_EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flop
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
        _cpu_flash_attention_backward_flop
    )


@dataclass
class FlopCount:
    """FLOPs counted by ``FlopCounterMode`` (one multiply-add counts as 2 FLOPs)."""

    total: int
    by_operator: dict[str, int]
    """Total per ATen operator, such as ``aten.mm``."""
    by_module: dict[str, int]
    """Total per module path, such as ``ZeroShotClassifier.clip.text_model``, nested paths included."""


def count_flops_detailed(fn: Callable[[], object]) -> FlopCount:
    """Run ``fn`` once and count the FLOPs of its matrix multiplies, convolutions and attention.

    Returns the total, the total per operator and the total per module. Backward passes run
    inside ``fn`` are counted too. Element-wise ops are not counted.

    >>> layer = torch.nn.Linear(3, 4)
    >>> count_flops_detailed(lambda: layer(torch.ones(2, 3))).by_operator  # 2 * batch * in * out
    {'aten.addmm': 48}
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with counter:
        fn()
    counts = counter.get_flop_counts()
    return FlopCount(
        total=counter.get_total_flops(),
        by_operator={str(op): flops for op, flops in counts.get("Global", {}).items()},
        by_module={name: sum(ops.values()) for name, ops in counts.items() if name != "Global"},
    )


def count_flops(fn: Callable[[], object]) -> int:
    """Run ``fn`` once and return the total of :func:`count_flops_detailed`.

    >>> layer = torch.nn.Linear(3, 4)
    >>> count_flops(lambda: layer(torch.ones(2, 3)))  # 2 * batch * in * out
    48
    """
    return count_flops_detailed(fn).total


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class MatmulResult:
    """Sustained ``torch.mm`` throughput of square matrices."""

    device: str
    dtype: str
    flops_per_second: float
    """Best rate over the sizes tried."""
    best_size: int
    by_size: dict[int, dict[str, float]]
    """Per size n: ``reps`` products of 2 * n**3 FLOPs in ``seconds``, and ``flops_per_second``."""

    def rates(self) -> dict[str, Any]:
        """Return the summary of :func:`measure_matmul`: the best rate and size, the rate per size and the dtype."""
        return {
            "flops_per_second": self.flops_per_second,
            "best_size": self.best_size,
            "by_size": {n: entry["flops_per_second"] for n, entry in self.by_size.items()},
            "dtype": self.dtype,
        }


def measure_matmul_detailed(
    sizes: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32, min_seconds: float = 1.0
) -> MatmulResult:
    """Measure the sustained throughput of ``torch.mm`` on n x n matrices, for each n in ``sizes``.

    Each size gets one untimed product, then repeats products for at least
    ``min_seconds``. Its rate is ``2 * n**3 * reps / seconds``, and the best size wins.

    Raises:
        ValueError: when ``sizes`` is empty or contains a size < 1, or ``min_seconds`` < 0.
    """
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive matrix sizes, got {list(sizes)!r}. Try [2048].")
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}.")
    # CUDA launches are asynchronous: synchronise after a chunk of products, not after each one.
    chunk = 8 if device.type == "cuda" else 1

    by_size: dict[int, dict[str, float]] = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)
        synchronize(device)

        reps = 0
        start = time.perf_counter()
        while True:
            for _ in range(chunk):
                torch.mm(a, b, out=out)
            synchronize(device)
            reps += chunk
            seconds = time.perf_counter() - start
            if seconds >= min_seconds:
                break
        rate = 2 * n**3 * reps / seconds
        by_size[n] = {"reps": reps, "seconds": seconds, "flops_per_second": rate}
        logger.info("matmul %d x %d %s: %d products in %.2f s, %.1f GFLOP/s", n, n, dtype, reps, seconds, rate / 1e9)
        del a, b, out

    best_size = max(by_size, key=lambda n: by_size[n]["flops_per_second"])
    return MatmulResult(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        flops_per_second=by_size[best_size]["flops_per_second"],
        best_size=best_size,
        by_size=by_size,
    )


def measure_matmul(
    sizes: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32, min_seconds: float = 1.0
) -> dict[str, Any]:
    """Measure ``torch.mm`` as :func:`measure_matmul_detailed` does and return the summary.

    Returns:
        ``{"flops_per_second": best rate, "best_size": n, "by_size": {n: rate}, "dtype": name}``.

    Raises:
        ValueError: when ``sizes`` is empty or contains a size < 1, or ``min_seconds`` < 0.
    """
    return measure_matmul_detailed(sizes, device, dtype, min_seconds).rates()


def current_rss_bytes() -> int:
    """Return this process's resident set size in bytes (from ``/proc/self/statm``, else the peak so far)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PeakMemory:
    """Peak memory while a block runs: CUDA ``max_memory_allocated``, or the process RSS sampled on the CPU.

    On the CPU a thread reads the RSS every ``interval`` seconds. It also runs during
    torch kernels, which release the GIL. A peak shorter than the interval can be missed.

    Attributes:
        peak_bytes: the peak after the block.
        start_bytes: the RSS (or allocated CUDA memory) when the block started.
        kind: ``rss`` or ``cuda_max_memory_allocated``.
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self.start_bytes = 0
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.peak_bytes = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the operating system.

    Between measurements that each build a model, glibc keeps the freed parameter
    memory in its heap, so the process RSS would grow by a model per measurement.
    ``malloc_trim`` returns it; on other C libraries only the garbage collection runs.
    """
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then return the seconds of ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


_MATMUL_OPERATORS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def profile_shares(fn: Callable[[], object], device: torch.device) -> dict[str, Any]:
    """Profile one call of ``fn`` and return the share of operator self time in matmuls, attention and the rest.

    Also returns the matmul operators' FLOP rate (the profiler's FLOP estimate for
    mm, addmm, bmm and baddbmm over their self time) and the five slowest other
    operators: together they explain why a step's MFU is below the matmul reference.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, with_flops=True) as profiler:
        fn()
        synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [
        e for e in profiler.key_averages()
        if e.device_type == torch.autograd.DeviceType.CPU and getattr(e, attribute) > 0
    ]
    total = sum(getattr(e, attribute) for e in events) or 1.0

    def category(name: str) -> str:
        if name in _MATMUL_OPERATORS:
            return "matmul"
        if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
            return "attention"
        return "other"

    shares = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in events:
        shares[category(event.key)] += getattr(event, attribute) / total
    gemm = [e for e in events if e.key in _MATMUL_OPERATORS[:4]]
    gemm_seconds = sum(getattr(e, attribute) for e in gemm) / 1e6
    others = sorted((e for e in events if category(e.key) == "other"), key=lambda e: getattr(e, attribute), reverse=True)
    return {
        "time": "device" if device.type == "cuda" else "cpu",
        "shares": shares,
        "matmul_flops_per_second": sum(e.flops for e in gemm) / gemm_seconds if gemm_seconds else 0.0,
        "slowest_other": [{"op": e.key, "share": getattr(e, attribute) / total} for e in others[:5]],
    }


def median(values: Sequence[float]) -> float:
    """Return the median; NaN for an empty sequence."""
    return statistics.median(values) if values else math.nan


def load_average() -> float:
    """Return the 1-minute load average, or NaN where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def describe_machine(device: torch.device) -> dict[str, Any]:
    """Return the CPU model, core counts, memory, torch and Python versions, thread count and platform.

    On CUDA it also returns the GPU's name. ``memory_bytes`` is None where ``/proc/meminfo`` is missing.
    """
    cpu_model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    machine = {
        "cpu_model": cpu_model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": memory,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


@dataclass
class Stopwatch:
    """Seconds since construction; ``lap()`` returns and restarts."""

    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
