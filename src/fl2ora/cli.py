"""The ``fl2ora`` command line.

Examples::

    fl2ora run configs/quickstart.yaml
    fl2ora run configs/paper/cifar10_fl2ora.yaml --set federated.rounds=10 --output runs/cifar10
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from fl2ora.config import ConfigError, config_to_dict, load_config

logger = logging.getLogger("fl2ora")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl2ora", description="Federated, calibrated fine-tuning of CLIP.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one federated experiment from a YAML configuration")
    run.add_argument("config", help="YAML configuration file, e.g. configs/quickstart.yaml")
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
    return parser


def _configure_logging(log_file: Path | None, quiet: bool) -> None:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(formatter)
    root.addHandler(console)
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _command_run(args: argparse.Namespace) -> int:
    # Imported here so that `fl2ora --help` and config errors stay fast.
    from fl2ora.experiment import build_experiment
    from fl2ora.report import format_results_table
    from fl2ora.rundir import LOG_FILE, RunDirectory
    from fl2ora.runtime.simulation import run_simulation

    config = load_config(args.config, args.overrides)
    output = Path(args.output) if args.output else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = RunDirectory(output, overwrite=args.overwrite)
    _configure_logging(run_dir.file(LOG_FILE), args.quiet)
    resolved = config_to_dict(config)
    run_dir.write_config(resolved)
    logger.info("Run directory %s; configuration:\n%s", run_dir.path, resolved)

    experiment = build_experiment(config)
    run_dir.write_partition(experiment.class_counts)
    summary = run_simulation(experiment, run_dir)
    print(format_results_table(summary))
    print(f"Run directory: {run_dir.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fl2ora`` console script."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _command_run(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as error:
        print(f"fl2ora: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
