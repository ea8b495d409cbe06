"""The ``fl2ora`` command line.

Examples::

    fl2ora run configs/quickstart.yaml
    fl2ora run configs/paper/cifar10_fl2ora.yaml --set federated.rounds=10 --output runs/cifar10
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fl2ora.config import ConfigError, config_to_dict, load_config
from fl2ora.rundir import reject_output_file

logger = logging.getLogger("fl2ora")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl2ora", description="Federated, calibrated fine-tuning of CLIP.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one federated experiment from a YAML configuration")
    run.add_argument("config", nargs="?", help="YAML configuration file, e.g. configs/quickstart.yaml")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a stopped run from its last checkpoint (its saved configuration is used)",
    )
    run.add_argument(
        "--allow-change",
        default="",
        metavar="KEY[,KEY]",
        help="with --resume: configuration keys that --set may change, e.g. eval.every",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration value, e.g. --set lora.rank=4 (repeatable; values are YAML)",
    )
    run.add_argument("--output", help="run directory (default: runs/<name>-<date>-<time>)")
    run.add_argument("--overwrite", action="store_true", help="replace a run directory that already holds a run")
    run.add_argument("--quiet", action="store_true", help="log warnings only on the console")

    sweep = commands.add_parser("sweep", help="run the cross product of configuration values and compare the cells")
    sweep.add_argument("config", help="base YAML configuration")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        required=True,
        metavar="KEY=V1,V2",
        help="values of one key, e.g. --grid method=fl2ora,coop --grid seed=0,1 (repeatable)",
    )
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a base configuration value (repeatable)")
    sweep.add_argument("--output", help="sweep folder, one run directory per cell (default: runs/sweep-<name>)")
    sweep.add_argument("--quiet", action="store_true", help="log warnings only on the console")

    reproduce = commands.add_parser("reproduce", help="run the study's presets of one setting and write its table")
    reproduce.add_argument("setting", help="in_distribution, domain_skew, domain_generalization or base_to_new")
    reproduce.add_argument("--datasets", default="", help="comma-separated subset of the setting's datasets")
    reproduce.add_argument("--methods", default="", help="comma-separated subset of fl2ora,promptfl")
    reproduce.add_argument(
        "--data-root", action="append", default=[], metavar="DATASET=PATH",
        help="dataset folder or archive, e.g. --data-root pacs=../shared/data/pacs.tar.gz (repeatable)",
    )
    reproduce.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a value in every preset, e.g. --set model.name=tiny (repeatable)")
    reproduce.add_argument(
        "--presets", metavar="DIR",
        help="folder of <dataset>_<method>.yaml presets; a relative DIR is read from the working directory "
        "(default: configs/paper of the fl2ora checkout, whatever the working directory)",
    )
    reproduce.add_argument("--output", help="output folder (default: runs/reproduce-<setting>)")
    reproduce.add_argument("--quiet", action="store_true", help="log warnings only on the console")

    compare = commands.add_parser("compare", help="compare finished run directories in one table and plot")
    compare.add_argument("runs", nargs="+", help="run directories")
    compare.add_argument(
        "--output",
        help="folder for comparison.md, comparison.csv and ece_vs_accuracy.png "
        "(default: a new folder runs/comparison-<YYYYmmdd-HHMMSS>)",
    )

    bench = commands.add_parser(
        "bench", help="benchmark throughput, round time, memory and each speed-up on and off (random weights)"
    )
    from fl2ora.perf.options import add_bench_arguments  # imports no torch

    add_bench_arguments(bench)

    from fl2ora.runtime.flower.command import add_flower_command  # imports no Flower code

    add_flower_command(commands)
    return parser


def _configure_logging(quiet: bool) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "fl2ora_console", False)]:
        root.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.fl2ora_console = True  # type: ignore[attr-defined]
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(formatter)
    root.addHandler(console)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _interrupt_on_sigint() -> Iterator[Any]:
    """Turn the first Ctrl-C into a request to stop at the next safe point; a second one stops at once."""
    from fl2ora.runtime.simulation import InterruptFlag

    flag = InterruptFlag()

    def handle(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.set()
        print("\nfl2ora: stopping at the next safe point (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _command_run(args: argparse.Namespace) -> int:
    # Imported here so that `fl2ora --help` and config errors stay fast.
    from fl2ora.report import format_results_table
    from fl2ora.runner import resume_experiment, run_experiment
    from fl2ora.runtime.simulation import RunInterrupted

    if args.resume and args.config:
        raise ConfigError("Give either a CONFIG to start a run or --resume RUN_DIR to continue one, not both.")
    if not args.resume and not args.config:
        raise ConfigError("Missing CONFIG: fl2ora run CONFIG, or fl2ora run --resume RUN_DIR to continue a run.")
    config = None
    if args.resume:
        output = Path(args.resume)
    else:
        config = load_config(args.config, args.overrides)
        output = Path(args.output) if args.output else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        reject_output_file(output)
    _configure_logging(args.quiet)
    try:
        with _interrupt_on_sigint() as flag:
            if args.resume:
                allowed = [key for key in args.allow_change.split(",") if key]
                summary = resume_experiment(output, args.overrides, allowed, interrupt=flag)
            else:
                summary = run_experiment(config, output, overwrite=args.overwrite, interrupt=flag)
    except RunInterrupted as stop:
        saved = (
            f"holds the checkpoint after round {stop.round_index - 1}"
            if stop.round_index > 1
            else "holds no checkpoint yet, so the run starts again from round 1"
        )
        print(
            f"fl2ora: interrupted during round {stop.round_index}; {output} {saved}. "
            f"Continue with: fl2ora run --resume {output}",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        # A second Ctrl-C: the signal handler raised while the first request was pending. Further
        # Ctrl-C presses are ignored while the checkpoint is read for the message.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            print("\n" + _stopped_at_once_message(output, config), file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)
        return 130
    print(format_results_table(summary))
    print(f"Run directory: {output}")
    return 0


def _stopped_at_once_message(output: Path, config: Any) -> str:
    """Describe what a run stopped by a second Ctrl-C left in ``output``, and how to continue it.

    Args:
        config: the configuration of a new run, or None when the command resumed ``output``.
    """
    import yaml

    from fl2ora.config import config_from_dict
    from fl2ora.rundir import CONFIG_FILE, SUMMARY_FILE
    from fl2ora.runtime.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint

    stopped = "fl2ora: stopped at once by a second Ctrl-C"
    resume = f"Continue with: fl2ora run --resume {output}"
    if config is not None:
        # With --overwrite, the folder may still contain an earlier run until the new one replaces it.
        try:
            saved = yaml.safe_load((output / CONFIG_FILE).read_text())
            own = config_to_dict(config_from_dict(saved)) == config_to_dict(config)
        except (OSError, ValueError, TypeError, yaml.YAMLError):
            own = False
        if not own:
            return f"{stopped} before this run wrote {output}, so nothing was saved. Start the run again."
    if (output / SUMMARY_FILE).is_file():
        return f"{stopped} after the run finished, so {output} contains all its outputs."
    if not (output / CHECKPOINT_FILE).is_file():
        return f"{stopped}. {output} contains no checkpoint yet, so the run starts again from round 1. {resume}"
    try:
        saved_round = load_checkpoint(output).round
    except CheckpointError as error:
        return f"{stopped}. {error}"
    return f"{stopped}. {output} contains the checkpoint after round {saved_round}. {resume}"


def _command_sweep(args: argparse.Namespace) -> int:
    from fl2ora.sweep import SweepError, parse_grid, run_sweep

    base = config_to_dict(load_config(args.config, args.overrides))
    grid = parse_grid(args.grid)
    output = Path(args.output) if args.output else Path("runs") / f"sweep-{base['name']}"
    reject_output_file(output)
    _configure_logging(args.quiet)
    failure = None
    try:
        run_sweep(base, grid, output)
    except SweepError as error:
        failure = error
    except KeyboardInterrupt:
        print(
            f"\nfl2ora: interrupted. The finished cells in {output} are kept, and the same command "
            "run again skips them and runs the others.",
            file=sys.stderr,
        )
        return 130
    if (output / "comparison.md").is_file():
        print((output / "comparison.md").read_text())
    if failure is not None:
        print(f"fl2ora: error: {failure}", file=sys.stderr)
        return 1
    print(f"Sweep folder: {output} (comparison.md, comparison.csv, ece_vs_accuracy.png)")
    return 0


def _command_reproduce(args: argparse.Namespace) -> int:
    from fl2ora.reproduce import run_reproduction

    roots = {}
    for item in args.data_root:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--data-root {item!r} must have the form DATASET=PATH, e.g. pacs=data/pacs.")
        roots[name] = path
    output = Path(args.output) if args.output else Path("runs") / f"reproduce-{args.setting}"
    reject_output_file(output)
    _configure_logging(args.quiet)
    try:
        table = run_reproduction(
            args.setting,
            Path(args.presets) if args.presets else None,
            output,
            datasets=[d for d in args.datasets.split(",") if d] or None,
            methods=[m for m in args.methods.split(",") if m] or None,
            data_roots=roots,
            overrides=args.overrides,
        )
    except KeyboardInterrupt:
        print(
            f"\nfl2ora: interrupted. The finished runs in {output} are kept, and the same command "
            "run again skips them and runs the others.",
            file=sys.stderr,
        )
        return 130
    print(table.read_text())
    print(f"Runs and table in {output}")
    return 0


def _command_compare(args: argparse.Namespace) -> int:
    from fl2ora.compare import read_run, write_comparison

    output = Path(args.output) if args.output else _new_comparison_folder()
    reject_output_file(output)
    _configure_logging(quiet=True)  # shows the warning about runs that repeat a seed
    records = [read_run(path) for path in args.runs]
    write_comparison(records, output)
    print((output / "comparison.md").read_text())
    print(f"Comparison folder: {output} (comparison.md, comparison.csv, ece_vs_accuracy.png)")
    return 0


def _new_comparison_folder() -> Path:
    """Return ``runs/comparison-<YYYYmmdd-HHMMSS>``, with a ``-2``, ``-3``, ... suffix while that path exists."""
    stamped = Path("runs") / f"comparison-{time.strftime('%Y%m%d-%H%M%S')}"
    output = stamped
    suffix = 1
    while output.exists():
        suffix += 1
        output = stamped.with_name(f"{stamped.name}-{suffix}")
    return output


def _command_bench(args: argparse.Namespace, argv: list[str]) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # only random-initialised architectures are built
    from fl2ora.perf.suite import main_with_args

    _configure_logging(quiet=False)
    return main_with_args(args, " ".join(["fl2ora", *argv]))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fl2ora`` console script."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _command_run(args)
        if args.command == "sweep":
            return _command_sweep(args)
        if args.command == "compare":
            return _command_compare(args)
        if args.command == "reproduce":
            return _command_reproduce(args)
        if args.command == "bench":
            return _command_bench(args, list(sys.argv[1:] if argv is None else argv))
        if args.command == "flower":
            from fl2ora.runtime.flower.command import run_flower_command

            return run_flower_command(args, _configure_logging)
    except (ValueError, OSError) as error:
        # ConfigError and CheckpointError are ValueErrors; the data, partition and
        # training code raise ValueError with a message that names the fix, and
        # OSError covers missing files and failed writes such as a full disk.
        print(f"fl2ora: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
