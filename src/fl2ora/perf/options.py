"""Command-line options of the benchmark suite (``fl2ora bench`` and ``benchmarks/suite.py``).

Kept free of torch imports, so ``fl2ora --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fl2ora.errors import ConfigError

MODELS = ("tiny", "vit-b-32", "vit-b-16")
METHODS = ("fl2ora", "coop", "kgcoop", "maple", "layernorm", "full")
DEFAULT_BATCH = {"tiny": 32, "vit-b-32": 16, "vit-b-16": 4}
"""Images per training step of the throughput measurement, by model; small for ViT-B/16 so
that the default CPU run stays short."""


def positive_int(text: str) -> int:
    """Parse an argparse value that must be an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """Parse an argparse value that must be an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _batch_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in MODELS:
            raise argparse.ArgumentTypeError(f"expected MODEL=N[,MODEL=N] with MODEL in {list(MODELS)}, got {item!r}")
        sizes[name] = positive_int(value)
    return sizes


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the suite's options to ``parser``."""
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="random-initialised architectures of the throughput and round sections "
                             "(default: all three)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="fine-tuning methods measured per model (default: all six)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto picks CUDA when available; the matmul reference is fp32 on the CPU and "
                             "bf16 on CUDA, where training also runs with bf16 autocast (default: auto)")
    parser.add_argument("--batch-size", type=_batch_sizes, default={}, metavar="MODEL=N[,MODEL=N]",
                        help="training images per step by model, e.g. vit-b-16=8,tiny=64 "
                             f"(default: {','.join(f'{k}={v}' for k, v in DEFAULT_BATCH.items())})")
    parser.add_argument("--steps", type=positive_int, default=2,
                        help="timed training steps, and as many evaluation batches, per model and method (default: 2)")
    parser.add_argument("--warmup", type=non_negative_int, default=0,
                        help="untimed steps before timing, after the FLOP-counting step that already warms up "
                             "(default: 0)")
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="rounds of each round measurement; the last is the steady state with warm caches "
                             "(default: 2)")
    parser.add_argument("--round-clients", type=positive_int, default=2,
                        help="clients trained in every round of the round and speed-up sections, one step each "
                             "over a training batch of images (default: 2)")
    parser.add_argument("--round-test-images", type=positive_int, default=4,
                        help="test images per client in the round and speed-up sections (default: 4)")
    parser.add_argument("--speedup-model", choices=MODELS, default="vit-b-32",
                        help="architecture of the speed-up on/off section (default: vit-b-32)")
    parser.add_argument("--protocol-model", choices=MODELS, default="vit-b-16",
                        help="architecture of the CoOp image-cache case in a round shaped like the CIFAR "
                             "protocol's, which the 10x target reads (default: vit-b-16, the study's)")
    parser.add_argument("--scale-model", choices=MODELS, default="vit-b-32",
                        help="architecture of the 100-client section; its LoRA state, and so its aggregation "
                             "and checkpoint work, equals ViT-B/16's (default: vit-b-32)")
    parser.add_argument("--scale-clients", type=positive_int, default=100,
                        help="clients of the scale section (default: 100, the study's CIFAR protocol)")
    parser.add_argument("--scale-sampled", type=positive_int, default=10,
                        help="clients trained in the scale section's round (default: 10, i.e. 10%%)")
    parser.add_argument("--scale-train-images", type=positive_int, default=10,
                        help="training images per sampled client in the scale round (default: 10)")
    parser.add_argument("--scale-test-images", type=positive_int, default=2,
                        help="test images per client in the scale round (default: 2)")
    parser.add_argument("--data", type=Path, default=None,
                        help="CIFAR-10 folder or .tar.gz for the scale section, which then holds the whole "
                             "training set in memory (default: generated 32 px images, as the other sections use)")
    parser.add_argument("--sections", nargs="+", default=["steps", "rounds", "speedups", "scale"],
                        choices=["steps", "rounds", "speedups", "scale"],
                        help="sections to run (default: all)")
    parser.add_argument("--matmul-seconds", type=_positive_float, default=1.0,
                        help="seconds of products per matrix size of the matmul reference (default: 1.0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's choice, usually the usable cores)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="write the report to this Markdown file")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for generated images and run directories (default: a temporary folder, "
                             "removed at the end)")


def check_bench_arguments(args: argparse.Namespace) -> None:
    """Reject combinations of options that no single option's type can catch.

    Runs before any measurement, so a bad combination fails in a second instead of
    after the sections that precede the one it breaks.

    Raises:
        ConfigError: with a one-line message naming the options and the fix.
    """
    if args.scale_sampled > args.scale_clients:
        raise ConfigError(
            f"--scale-sampled {args.scale_sampled} is larger than --scale-clients {args.scale_clients}: the "
            f"scale round cannot sample more clients than exist. Use --scale-sampled {args.scale_clients} or "
            f"less, or raise --scale-clients."
        )
    if args.data is not None and "scale" in args.sections and not args.data.exists():
        raise ConfigError(
            f"--data {args.data} does not exist. Give the path of a CIFAR-10 folder or .tar.gz, or drop --data "
            "to use generated images."
        )
