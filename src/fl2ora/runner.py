"""Run one experiment from a configuration into a run directory."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fl2ora.config import RunConfig, config_to_dict
from fl2ora.rundir import LOG_FILE, RunDirectory

logger = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy every fl2ora log record at INFO and above into ``path`` while the block runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def run_experiment(config: RunConfig, output: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Build the experiment of ``config``, run it in process and fill ``output``.

    Returns:
        The run summary (also written to ``summary.json``).

    Raises:
        FileExistsError: when ``output`` already holds a run and ``overwrite`` is false.
    """
    # Imported here so that configuration errors are reported before torch loads.
    from fl2ora.experiment import build_experiment
    from fl2ora.runtime.simulation import run_simulation

    run_dir = RunDirectory(output, overwrite=overwrite)
    with log_to_file(run_dir.file(LOG_FILE)):
        resolved = config_to_dict(config)
        run_dir.write_config(resolved)
        logger.info("Run directory %s; configuration: %s", run_dir.path, resolved)
        experiment = build_experiment(config)
        run_dir.write_partition(experiment.class_counts)
        return run_simulation(experiment, run_dir)
