"""Sweeps: the cross product of configuration values, one run directory per cell."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fl2ora.compare import read_run, write_comparison
from fl2ora.config import ConfigError, config_from_dict
from fl2ora.rundir import SUMMARY_FILE

logger = logging.getLogger(__name__)


@dataclass
class SweepCell:
    """One point of the grid: its overrides and its run directory."""

    overrides: dict[str, Any]
    values: dict[str, Any]
    """The base configuration with the overrides applied."""
    path: Path


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """Parse ``key=v1,v2`` items into value lists, each value read as YAML.

    A value that contains a comma inside brackets (``lora.layers=[0,1],all``) is kept whole.

    >>> parse_grid(["lora.rank=2,4", "method=fl2ora"])
    {'lora.rank': [2, 4], 'method': ['fl2ora']}

    Raises:
        ConfigError: on an item without ``=``, an empty value list, a repeated key or a
            value listed twice for one key.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"Grid item {item!r} must have the form key=v1,v2, e.g. lora.rank=2,4.")
        if key in grid:
            raise ConfigError(f"Grid key {key!r} is given twice; list all its values in one item.")
        # Split on commas that are not inside brackets.
        values = [part for part in re.split(r",(?![^\[]*\])", raw) if part.strip()]
        if not values:
            raise ConfigError(f"Grid item {item!r} lists no value. Give at least one, e.g. {key}=0,1.")
        try:
            grid[key] = [yaml.safe_load(value) for value in values]
        except yaml.YAMLError as error:
            reason = str(error).splitlines()[0]
            raise ConfigError(
                f"Grid item {item!r}: a value is not valid YAML ({reason}). Close its brackets, or quote it."
            ) from None
        _check_distinct_values(key, grid[key])
    return grid


def _check_distinct_values(key: str, values: list[Any]) -> None:
    """Raise ConfigError when one grid key lists a value twice, because both copies would be the same cell.

    Values are compared after YAML parsing, so ``seed=0,00`` repeats the value 0. ``True`` and
    ``1`` count as different values although they compare equal in Python.
    """
    for index, value in enumerate(values):
        for earlier in values[:index]:
            if earlier == value and isinstance(earlier, bool) == isinstance(value, bool):
                raise ConfigError(
                    f"Grid key {key!r} lists the value {value!r} more than once, so the same cell would run "
                    "and be counted twice. List each value once."
                )


def _cell_name(overrides: dict[str, Any]) -> str:
    parts = [f"{key}={value}" for key, value in overrides.items()]
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts) or "default")
    if name != ",".join(parts):
        # Sanitising can map two cells to one name; a digest of the exact values keeps them apart.
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name}-{digest}"
    return name


def plan_sweep(base: dict[str, Any], grid: dict[str, list[Any]], output: Path) -> list[SweepCell]:
    """List every cell of the grid, validating each cell's configuration before anything runs.

    Raises:
        ConfigError: naming the first cell whose configuration is invalid, or a key that
            lists one value twice.
    """
    keys = list(grid)
    for key in keys:
        _check_distinct_values(key, grid[key])
    cells = []
    for combination in itertools.product(*(grid[key] for key in keys)):
        overrides = dict(zip(keys, combination))
        values = base
        for key, value in overrides.items():
            values = _set_dotted(values, key, value)
        try:
            config_from_dict(values)
        except ConfigError as error:
            raise ConfigError(f"Sweep cell {overrides} is invalid: {error}") from error
        cells.append(SweepCell(overrides=overrides, values=values, path=output / _cell_name(overrides)))
    return cells


def run_sweep(base: dict[str, Any], grid: dict[str, list[Any]], output: str | Path) -> list[dict]:
    """Run every cell not yet complete, then write the comparison table of all cells.

    A cell whose folder holds ``summary.json`` is skipped. A cell that fails is
    logged with its error and left out of the table; the others still run.

    Returns:
        The comparison rows.
    """
    from fl2ora.runner import run_experiment

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cells = plan_sweep(base, grid, output)
    logger.info("Sweep of %d cells into %s", len(cells), output)
    failed = []
    for index, cell in enumerate(cells, start=1):
        config = config_from_dict(cell.values)
        if is_finished_run_of(cell.path, config):
            logger.info("Cell %d/%d %s is complete; skipping", index, len(cells), cell.overrides)
            continue
        logger.info("Cell %d/%d: %s", index, len(cells), cell.overrides)
        try:
            run_experiment(config, cell.path, overwrite=True)
        except Exception as error:  # one failed cell must not stop the others
            logger.error("Cell %s failed: %s", cell.overrides, error)
            failed.append((cell.overrides, str(error)))

    records = [read_run(cell.path) for cell in cells if (cell.path / SUMMARY_FILE).is_file()]
    keys = [key for key in grid if key != "seed"]
    rows = write_comparison(records, output, keys=keys) if records else []
    if failed:
        lines = [f"- {overrides}: {error}" for overrides, error in failed]
        with (output / "comparison.md").open("a") as stream:
            stream.write(f"\nFAILED: {len(failed)} of {len(cells)} cells did not finish and are not in the table:\n")
            stream.write("\n".join(lines) + "\n")
        raise SweepError(f"{len(failed)} of {len(cells)} sweep cells failed; see {output / 'comparison.md'} and their run.log.")
    return rows


class SweepError(RuntimeError):
    """Some cells of a sweep failed; the others ran and are tabulated."""


def is_finished_run_of(path: Path, config: Any) -> bool:
    """Return True when ``path`` holds a finished run of exactly ``config``."""
    from fl2ora.config import config_to_dict
    from fl2ora.rundir import CONFIG_FILE

    if not (path / SUMMARY_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        return False
    try:
        saved = config_to_dict(config_from_dict(yaml.safe_load((path / CONFIG_FILE).read_text())))
    except (ConfigError, yaml.YAMLError, TypeError):
        return False
    if saved != config_to_dict(config):
        logger.warning("%s holds a finished run of another configuration; running it again", path)
        return False
    return True


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    result = dict(values)
    node = result
    parts = key.split(".")
    for part in parts[:-1]:
        child = dict(node.get(part) or {})
        node[part] = child
        node = child
    node[parts[-1]] = value
    return result
