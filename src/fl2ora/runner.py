"""Run one experiment from a configuration into a run directory."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from fl2ora.config import RunConfig, config_to_dict
from fl2ora.rundir import LOG_FILE, RunDirectory, check_output_folder

logger = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _RecordBuffer(logging.Handler):
    """Keep log records in memory until the run directory exists."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[logging.Handler]:
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
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def _differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    from fl2ora.compare import flatten

    saved_flat, current_flat = flatten(saved), flatten(current)
    return sorted(k for k in set(saved_flat) | set(current_flat) if saved_flat.get(k) != current_flat.get(k))


def _check_allowed_keys(allowed: list[str], resolved: dict[str, Any]) -> None:
    """Reject an ``--allow-change`` key that names no configuration key, so a typo is not ignored."""
    import difflib

    from fl2ora.compare import flatten
    from fl2ora.config import ConfigError

    keys = sorted(flatten(resolved))
    for key in allowed:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"--allow-change names {key!r}, which is not a configuration key.{hint} "
                "Give the dotted key as in --set, e.g. federated.rounds."
            )


def resume_experiment(
    output: str | Path,
    overrides: list[str] | None = None,
    allow_changes: list[str] | None = None,
    interrupt: Any = None,
) -> dict[str, Any]:
    """Continue a stopped run from its last checkpoint and finish it.

    The configuration is read from the run directory. Overrides may change only the
    keys listed in ``allow_changes``; any other difference is rejected, because the
    resumed rounds would no longer continue the same run.

    Raises:
        ConfigError: naming the keys that differ from the saved configuration.
        CheckpointError: when the checkpoint is missing, corrupt, or does not fit the
            model or ``federated.rounds``.
        FileExistsError: when the run already finished.
    """
    from fl2ora.config import ConfigError, apply_overrides, config_from_dict
    from fl2ora.experiment import build_experiment
    from fl2ora.rundir import CONFIG_FILE, SUMMARY_FILE
    from fl2ora.runtime.checkpoint import CHECKPOINT_FILE, check_round, load_checkpoint
    from fl2ora.runtime.simulation import check_resumable, run_simulation

    run_dir = RunDirectory(output, resume=True)
    if run_dir.file(SUMMARY_FILE).exists():
        raise FileExistsError(f"Run {str(run_dir.path)!r} already finished; there is nothing to resume.")
    saved = yaml.safe_load(run_dir.file(CONFIG_FILE).read_text())
    config = config_from_dict(apply_overrides(saved, overrides or []))
    # Compare resolved configurations, so keys added by a newer fl2ora take their defaults.
    saved_resolved = config_to_dict(config_from_dict(saved))
    _check_allowed_keys(allow_changes or [], saved_resolved)
    changed = [
        key for key in _differing_keys(saved_resolved, config_to_dict(config)) if key not in (allow_changes or [])
    ]
    if changed:
        raise ConfigError(
            f"Resuming with a changed configuration: {changed} differ from the saved run. "
            f"Drop those overrides, or allow them with --allow-change {','.join(changed)}."
        )
    checkpoint = load_checkpoint(run_dir.path) if run_dir.file(CHECKPOINT_FILE).exists() else None
    if checkpoint is not None and checkpoint.config and checkpoint.config != saved_resolved:
        edited = _differing_keys(checkpoint.config, saved_resolved)
        if [key for key in edited if key not in (allow_changes or [])]:
            raise ConfigError(
                f"{run_dir.file(CONFIG_FILE)} differs from the configuration stored in the checkpoint in {edited}; "
                "it was edited after the run started. Restore it, or allow the keys with --allow-change."
            )
    if checkpoint is not None:
        check_round(checkpoint, config.federated.rounds, run_dir.path)
    with log_to_file(run_dir.file(LOG_FILE)):
        experiment = build_experiment(config)
        if checkpoint is None:
            # Stopped before the first round completed: start again in place.
            logger.info("No checkpoint in %s yet; starting the run from round 1", run_dir.path)
            run_dir.truncate_records(0)
            run_dir.write_config(config_to_dict(config))
            run_dir.write_partition(experiment.class_counts)
            return run_simulation(experiment, run_dir, interrupt=interrupt)
        check_resumable(experiment, checkpoint)
        run_dir.write_config(config_to_dict(config))
        return run_simulation(experiment, run_dir, resume=checkpoint, interrupt=interrupt)


def run_experiment(
    config: RunConfig, output: str | Path, overwrite: bool = False, interrupt: Any = None
) -> dict[str, Any]:
    """Build the experiment of ``config``, run it in process and fill ``output``.

    Returns:
        The run summary (also written to ``summary.json``).

    Raises:
        FileExistsError: when ``output`` already holds a run and ``overwrite`` is false.
    """
    # Imported here so that configuration errors are reported before torch loads.
    from fl2ora.experiment import build_experiment
    from fl2ora.runtime.simulation import run_simulation

    check_output_folder(Path(output), overwrite)
    # Build first, so that a configuration the data or model cannot satisfy fails
    # before an existing folder is replaced; the build's log lines are kept for run.log.
    buffer = _RecordBuffer()
    root = logging.getLogger()
    root.addHandler(buffer)
    resolved = config_to_dict(config)
    try:
        logger.info("Configuration:\n%s", yaml.safe_dump(resolved, sort_keys=False).rstrip())
        experiment = build_experiment(config)
    finally:
        root.removeHandler(buffer)
    run_dir = RunDirectory(output, overwrite=overwrite)
    with log_to_file(run_dir.file(LOG_FILE)) as handler:
        for record in buffer.records:
            handler.handle(record)
        run_dir.write_config(resolved)
        logger.info("Run directory %s", run_dir.path)
        run_dir.write_partition(experiment.class_counts)
        return run_simulation(experiment, run_dir, interrupt=interrupt)
