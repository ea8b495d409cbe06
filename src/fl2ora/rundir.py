"""The run directory: one folder holding everything a run produces."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fl2ora.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.npz"
RELIABILITY_FILE = "reliability.png"
ADAPTER_FILE = "adapter.safetensors"
PARTITION_FILE = "partition.json"
LOG_FILE = "run.log"
MARKER_FILE = ".fl2ora-run"
"""Written first into every run directory; only folders holding it may be overwritten."""
TIMINGS_FILE = "timings.jsonl"


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars and non-finite floats (as null) for strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path``."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def check_output_folder(path: Path, overwrite: bool) -> bool:
    """Check that a run may be written into ``path``, without changing anything.

    Returns:
        True when ``path`` holds a previous run that ``overwrite`` allows replacing.

    Raises:
        FileExistsError: when ``path`` holds a run and ``overwrite`` is false, or holds
            anything that fl2ora did not create.
    """
    if not path.exists() or not any(path.iterdir()):
        return False
    finished = (path / SUMMARY_FILE).exists()
    is_run = (path / CONFIG_FILE).exists()
    if not overwrite:
        what = "a finished run" if finished else ("an unfinished run" if is_run else "other files")
        hint = f" or continue it with fl2ora run --resume {path}" if is_run and not finished else ""
        raise FileExistsError(
            f"Output folder {str(path)!r} already holds {what}. "
            f"Choose another --output, pass --overwrite to replace it{hint}."
        )
    if not (path / MARKER_FILE).is_file():
        raise FileExistsError(
            f"Refusing to overwrite {str(path)!r}: it has no {MARKER_FILE} marker, so it is not a "
            "folder fl2ora created. Choose another --output."
        )
    return True


class RunDirectory:
    """Create and fill a run directory.

    Args:
        path: the folder; created when missing.
        overwrite: allow a folder that already holds a run (its files are removed
            first); only folders with fl2ora's marker file qualify.
        resume: open an existing run directory to continue it, keeping its files.

    Raises:
        FileExistsError: when ``path`` holds a finished run and ``overwrite`` is false,
            or is a non-empty folder that is not a run directory.
    """

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False) -> None:
        self.path = Path(path)
        if resume:
            if not (self.path / CONFIG_FILE).is_file():
                raise FileNotFoundError(
                    f"Cannot resume {str(self.path)!r}: it holds no {CONFIG_FILE}, so it is not an fl2ora run directory."
                )
            return
        if check_output_folder(self.path, overwrite):
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER_FILE).write_text("This folder is an fl2ora run directory.\n")

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: Mapping[str, Any]) -> None:
        self.file(CONFIG_FILE).write_text(yaml.safe_dump(dict(config), sort_keys=False))

    def write_partition(self, counts: Mapping[str, Any]) -> None:
        write_json_atomic(self.file(PARTITION_FILE), counts)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with self.file(METRICS_FILE).open("a") as stream:
            stream.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def append_timings(self, record: Mapping[str, Any]) -> None:
        """Append one round's wall-clock timings; kept apart so that ``metrics.jsonl`` is reproducible."""
        with self.file(TIMINGS_FILE).open("a") as stream:
            stream.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")

    def truncate_records(self, last_round: int) -> None:
        """Drop metrics and timings records of rounds after ``last_round`` (a resumed run redoes them)."""
        for name in (METRICS_FILE, TIMINGS_FILE):
            path = self.file(name)
            if not path.exists():
                continue
            kept = [line for line in path.read_text().splitlines() if line.strip() and _record_round(line) <= last_round]
            temporary = path.with_suffix(path.suffix + ".tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, path)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.file(SUMMARY_FILE), summary)

    def write_predictions(
        self, client_id: np.ndarray, sample_index: np.ndarray, labels: np.ndarray, probs: np.ndarray
    ) -> None:
        """Save the final predictions: per test sample its client, dataset index, label and probabilities."""
        np.savez_compressed(
            self.file(PREDICTIONS_FILE),
            client_id=client_id.astype(np.int64),
            sample_index=sample_index.astype(np.int64),
            label=labels.astype(np.int64),
            probs=probs.astype(np.float32),
        )


def _record_round(line: str) -> int:
    try:
        return int(json.loads(line)["round"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        # A line cut short by a crash belongs to a round that did not complete.
        return 1 << 62


def read_metrics(path: str | Path) -> list[dict]:
    """Read every record of a run's ``metrics.jsonl``."""
    lines = Path(path, METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def reject_output_file(path: Path) -> None:
    """Reject an --output folder path that is an existing file or lies below one, before any work starts.

    Raises:
        ConfigError: naming the path and the file in the way.
    """
    for candidate in (path, *path.parents):
        # exists() is False for a path below a file, so the loop reaches the file itself.
        if not candidate.exists():
            continue
        if candidate.is_dir():
            return
        where = "is" if candidate == path else f"lies below {str(candidate)!r}, which is"
        raise ConfigError(
            f"--output {str(path)!r} {where} an existing file, not a folder. "
            "Give the path of a folder (it is created when missing)."
        )
