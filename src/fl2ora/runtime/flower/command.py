"""The ``fl2ora flower`` subcommand: one experiment on a local Flower federation over TLS.

Examples::

    fl2ora flower configs/quickstart.yaml --output runs/quickstart-flower
    fl2ora flower configs/quickstart.yaml --set federated.rounds=2 --round-timeout 120

This module imports Flower only when the command runs, so ``fl2ora --help`` works
without the ``flower`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_flower_command(commands: Any) -> None:
    """Add the ``flower`` subparser to the ``fl2ora`` subcommands."""
    flower = commands.add_parser(
        "flower",
        help="run one experiment on a local Flower federation: a SuperLink and one SuperNode per client, over TLS",
    )
    flower.add_argument("config", help="YAML configuration file, e.g. configs/quickstart.yaml")
    flower.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration value (repeatable; values are YAML)")
    flower.add_argument("--output", help="run directory (default: runs/<name>-<date>-<time>)")
    flower.add_argument("--overwrite", action="store_true", help="replace a run directory that already contains a run")
    flower.add_argument("--flower-dir", help="folder for certificates, Flower state and process logs "
                        "(default: <output>.flower)")
    flower.add_argument("--insecure", action="store_true",
                        help="run without TLS; traffic on 127.0.0.1 is then unencrypted (debugging only)")
    flower.add_argument("--min-replies", type=int, default=1,
                        help="valid client updates a round needs to change the global model (default: 1)")
    flower.add_argument("--round-timeout", type=float, default=600.0,
                        help="seconds to wait for the replies of one round (default: 600)")
    flower.add_argument("--node-wait-timeout", type=float, default=300.0,
                        help="seconds to wait before round 1 for every SuperNode to connect (default: 300)")
    flower.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before the whole run is stopped (default: no limit)")
    flower.add_argument("--quiet", action="store_true", help="log warnings only on the console; no streamed run log")


INSTALL_FLOWER_EXTRA = ".venv/bin/python -m pip install -e '.[flower]'"
"""Command that installs the ``flower`` extra into the project's ``.venv``, as docs/flower.md documents."""


def run_flower_command(args: argparse.Namespace, configure_logging: Callable[[bool], None]) -> int:
    """Run the ``flower`` subcommand; return the exit code (0 only when the run completed).

    Returns 2 without a traceback when a module of the ``flower`` extra is missing.
    """
    from fl2ora.config import load_config
    from fl2ora.report import format_results_table
    from fl2ora.rundir import SUMMARY_FILE, check_output_folder, reject_output_file

    try:
        from fl2ora.runtime.flower.deploy import run_local_deployment
    except ModuleNotFoundError as error:
        # A missing fl2ora module is a broken install or a bug, not a missing extra.
        if error.name is None or error.name.split(".")[0] == "fl2ora":
            raise
        print(
            f"fl2ora: error: fl2ora flower needs the module {error.name!r}, which is not installed. "
            f"Install the flower extra: {INSTALL_FLOWER_EXTRA}",
            file=sys.stderr,
        )
        return 2

    config = load_config(args.config, args.overrides)
    output = Path(args.output) if args.output else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    reject_output_file(output)
    # The ServerApp checks the folder again, but only after the whole federation has started.
    check_output_folder(output, args.overwrite)
    configure_logging(args.quiet)
    if config.perf.batched_clients > 1:
        logger.warning(
            "perf.batched_clients=%d has no effect under Flower: each SuperNode trains its own client. "
            "It applies to `fl2ora run` only.", config.perf.batched_clients,
        )
    echo = None if args.quiet else (lambda line: print(line, flush=True))
    try:
        outcome = run_local_deployment(
            config,
            output,
            folder=args.flower_dir,
            overwrite=args.overwrite,
            insecure=args.insecure,
            min_replies=args.min_replies,
            round_timeout=args.round_timeout,
            node_wait_timeout=args.node_wait_timeout,
            run_timeout=args.run_timeout,
            echo=echo,
        )
    except KeyboardInterrupt:
        print("fl2ora: interrupted; the SuperLink and SuperNodes were stopped", file=sys.stderr)
        return 130
    if not outcome.succeeded:
        print(
            f"fl2ora: Flower run {outcome.run_id} ended with status {outcome.status} {outcome.details}; "
            f"see the logs in {args.flower_dir or str(output) + '.flower'}/logs",
            file=sys.stderr,
        )
        return 1
    summary = json.loads((output / SUMMARY_FILE).read_text())
    print(format_results_table(summary))
    print(f"Run directory: {output}")
    return 0
