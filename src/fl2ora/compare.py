"""Comparison tables and plots across run directories.

Runs whose resolved configurations differ only in ``seed`` form one row; each
metric is reported as mean ± standard deviation over the distinct seeds, with the
best value of each column marked. Several runs of one seed (a copy, or the same
configuration run twice) are averaged into one value for that seed first, so each
seed counts once.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fl2ora.rundir import CONFIG_FILE, SUMMARY_FILE

logger = logging.getLogger(__name__)

TABLE_METRICS = [("accuracy", "Acc", "max"), ("ece", "ECE", "min"), ("mce", "MCE", "min"), ("ace", "ACE", "min")]
"""Columns of the comparison table: summary key, header, and which end is best."""


@dataclass
class RunRecord:
    """One finished run: its folder, flattened configuration and final client-mean metrics."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, float]
    random_init: bool


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_run(path: str | Path) -> RunRecord:
    """Read a finished run directory.

    Raises:
        FileNotFoundError: when the folder has no ``summary.json`` (the run did not finish)
            or no ``config.yaml``.
    """
    path = Path(path)
    for name in (SUMMARY_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a finished fl2ora run: {name} is missing.")
    summary = json.loads((path / SUMMARY_FILE).read_text())
    config = flatten(yaml.safe_load((path / CONFIG_FILE).read_text()))
    return RunRecord(
        path=path, config=config, metrics=summary["final"]["mean"], random_init=bool(summary.get("random_init"))
    )


def _label_keys(records: Sequence[RunRecord]) -> list[str]:
    """Configuration keys that differ between runs, except the seed and output-only keys."""
    keys = sorted({key for record in records for key in record.config})
    ignored = {"seed", "name"}
    return [
        key
        for key in keys
        if key not in ignored and len({json.dumps(r.config.get(key), sort_keys=True) for r in records}) > 1
    ]


def _format_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def comparison_rows(records: Sequence[RunRecord], keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Group runs that differ only in seed and compute mean and standard deviation per metric.

    Runs of one group that share a seed are averaged into one value for that seed
    before the statistics over seeds, and a warning names them.

    Args:
        records: finished runs.
        keys: configuration keys that label a row; by default every key that differs
            between the runs, except ``seed`` and ``name``.

    Returns:
        One dict per group: ``{"label": {key: value}, "runs": n, "seeds": [distinct seeds],
        "repeated_seeds": [(seed, [run paths]), ...], "<metric>": mean, "<metric>_std": std}``,
        mean and std over the distinct seeds, std with ddof 0.
    """
    keys = list(keys) if keys is not None else _label_keys(records)
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        label = json.dumps({key: record.config.get(key) for key in keys}, sort_keys=True)
        groups.setdefault(label, []).append(record)
    rows = []
    for label, members in groups.items():
        by_seed = _group_by_seed(members)
        repeated = [
            (runs[0].config.get("seed"), [str(run.path) for run in runs]) for runs in by_seed.values() if len(runs) > 1
        ]
        settings = ", ".join(f"{key}={_format_value(value)}" for key, value in json.loads(label).items())
        for seed, paths in repeated:
            logger.warning(
                "Runs %s have the same configuration%s and seed %s, so their metrics are averaged into one value "
                "that counts once in the mean and std over seeds.",
                ", ".join(paths),
                f" ({settings})" if settings else "",
                seed,
            )
        row: dict[str, Any] = {
            "label": json.loads(label),
            "runs": len(members),
            "seeds": [runs[0].config.get("seed") for runs in by_seed.values()],
            "repeated_seeds": repeated,
            "random_init": any(m.random_init for m in members),
        }
        for metric, _, _ in TABLE_METRICS:
            per_seed = np.array(
                [np.mean([run.metrics[metric] for run in runs]) for runs in by_seed.values()], dtype=np.float64
            )
            row[metric] = float(per_seed.mean())
            row[f"{metric}_std"] = float(per_seed.std())
        rows.append(row)
    return rows


def _group_by_seed(members: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Group runs by seed in first-seen order, keyed by the seed's JSON so that ``1`` and ``true`` stay apart."""
    by_seed: dict[str, list[RunRecord]] = {}
    for member in members:
        by_seed.setdefault(json.dumps(member.config.get("seed")), []).append(member)
    return by_seed


def _best(rows: Sequence[dict[str, Any]], metric: str, direction: str) -> float:
    values = [row[metric] for row in rows if math.isfinite(row[metric])]
    if not values:
        return math.nan
    return max(values) if direction == "max" else min(values)


def write_comparison(records: Sequence[RunRecord], output: str | Path, keys: Sequence[str] | None = None) -> list[dict]:
    """Write ``comparison.md``, ``comparison.csv`` and ``ece_vs_accuracy.png`` into ``output``.

    Metrics are final-round client means in percent; the best value of each column
    is marked in bold in the Markdown table and with ``best_<metric>`` in the CSV.

    Returns:
        The rows of :func:`comparison_rows`.

    Raises:
        ValueError: when ``records`` is empty.
    """
    if not records:
        raise ValueError("No finished runs to compare; pass run directories that contain summary.json.")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    keys = list(keys) if keys is not None else _label_keys(records)
    rows = comparison_rows(records, keys)
    best = {metric: _best(rows, metric, direction) for metric, _, direction in TABLE_METRICS}

    # Markdown: one column per label key, then mean ± std in percent.
    header = [*keys, "seeds", *[title for _, title, _ in TABLE_METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_format_value(row["label"].get(key)) for key in keys] + [str(len(row["seeds"]))]
        for metric, _, _ in TABLE_METRICS:
            cell = f"{100 * row[metric]:.2f} ± {100 * row[metric + '_std']:.2f}"
            cells.append(f"**{cell}**" if row[metric] == best[metric] else cell)
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "Final-round metrics averaged over clients (unweighted), in percent: mean ± std over seeds. "
        "Bold: best per column (highest accuracy, lowest calibration error).",
    ]
    repeated = [(seed, paths) for row in rows for seed, paths in row["repeated_seeds"]]
    if repeated:
        listing = "; ".join(f"seed {seed}: {', '.join(paths)}" for seed, paths in repeated)
        notes.append(
            "Repeated seeds: runs of one configuration and seed were averaged into one value for that seed, "
            f"so each seed counts once in the seeds column and in mean ± std ({listing})."
        )
    if any(row["random_init"] for row in rows):
        notes.append(
            "WARNING: runs with a random-initialised backbone are included: their numbers are a pipeline check, "
            "not evidence about CLIP."
        )
    (output / "comparison.md").write_text("\n".join(lines + notes) + "\n")

    with (output / "comparison.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        metric_columns = [c for metric, _, _ in TABLE_METRICS for c in (metric, f"{metric}_std", f"best_{metric}")]
        writer.writerow([*keys, "seeds", "runs", *metric_columns, "random_init"])
        for row in rows:
            values = [_format_value(row["label"].get(key)) for key in keys] + [len(row["seeds"]), row["runs"]]
            for metric, _, _ in TABLE_METRICS:
                values += [row[metric], row[f"{metric}_std"], int(row[metric] == best[metric])]
            writer.writerow([*values, int(row["random_init"])])

    plot_ece_vs_accuracy(rows, keys, output / "ece_vs_accuracy.png")
    logger.info("Wrote the comparison of %d runs in %d rows to %s", len(records), len(rows), output)
    return rows


def plot_ece_vs_accuracy(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: Path) -> None:
    """Scatter each row's ECE against its accuracy, coloured by method, with seed error bars."""
    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    methods = sorted({str(row["label"].get("method", "run")) for row in rows})
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    for row in rows:
        method = str(row["label"].get("method", "run"))
        axes.errorbar(
            100 * row["accuracy"],
            100 * row["ece"],
            xerr=100 * row["accuracy_std"],
            yerr=100 * row["ece_std"],
            fmt="o",
            color=colours[method],
            alpha=0.8,
            capsize=2,
        )
    for method in methods:
        axes.plot([], [], "o", color=colours[method], label=method)
    axes.set_xlabel("accuracy (%)")
    axes.set_ylabel("ECE (%)")
    title = "ECE against accuracy, final round, client mean"
    if any(row["random_init"] for row in rows):
        title += "\nRandom-initialised backbone: pipeline check only"
    axes.set_title(title)
    axes.legend(title="method", fontsize="small", loc="upper right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
