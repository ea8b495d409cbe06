"""``fl2ora reproduce SETTING``: run the study's presets of one setting and tabulate them.

Each dataset of the setting runs with the FL²oRA and PromptFL presets of the
repository's ``configs/paper/`` or of another folder, one run directory each, and
finished runs are skipped. The table is written in the study's layout: accuracy,
ECE, MCE and ACE in percent as the mean ± standard deviation over the last evaluated
rounds; per domain for domain skew; per held-out domain for domain generalisation;
base, new and their harmonic mean for base-to-new.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl2ora.config import ConfigError, apply_overrides, config_from_dict
from fl2ora.rundir import read_metrics
from fl2ora.sweep import is_finished_run_of

logger = logging.getLogger(__name__)

SETTINGS: dict[str, list[str]] = {
    "in_distribution": ["cifar10", "cifar100"],
    "domain_skew": ["pacs", "office_home", "vlcs"],
    "domain_generalization": ["pacs", "office_home", "vlcs"],
    "base_to_new": ["food101", "dtd", "caltech101", "flowers102", "oxford_pets"],
}
"""The study's settings and their datasets."""

DEFAULT_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "paper"
"""The study's presets in the fl2ora source checkout, located from this file so that any working directory works."""

METHOD_PRESETS = {"fl2ora": "FL²oRA", "promptfl": "PromptFL"}
METRICS = [("accuracy", "Acc"), ("ece", "ECE"), ("mce", "MCE"), ("ace", "ACE")]


@dataclass
class ReproduceRun:
    """One run of a reproduction: its dataset, method, held-out domain and folder."""

    dataset: str
    method: str
    held_out_domain: str | None
    path: Path
    values: dict[str, Any]


def _check_presets_folder(presets: Path) -> None:
    if presets.is_dir():
        return
    if presets == DEFAULT_PRESETS:
        # NOTE: configs/ is not packaged, so an install from a wheel has no default presets.
        raise FileNotFoundError(
            f"The default presets folder {str(presets)!r} does not exist, which happens when fl2ora is "
            "installed without its repository. Give the folder with --presets DIR."
        )
    example = f", such as {str(DEFAULT_PRESETS)!r}" if DEFAULT_PRESETS.is_dir() else ""
    raise FileNotFoundError(
        f"Presets folder {str(presets)!r} does not exist (a relative --presets is read from the working "
        f"directory {str(Path.cwd())!r}). Give the folder that contains <dataset>_<method>.yaml files{example}."
    )


def _preset(presets: Path, dataset: str, method: str) -> Path:
    path = presets / f"{dataset}_{method}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"Preset {str(path)!r} not found. The presets folder must contain one <dataset>_<method>.yaml file "
            f"per dataset and method, as {str(DEFAULT_PRESETS)!r} does."
        )
    return path


def plan_runs(
    setting: str,
    presets: Path | None,
    output: Path,
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    data_roots: dict[str, str] | None = None,
    overrides: list[str] | None = None,
) -> list[ReproduceRun]:
    """List the runs of ``setting`` with their validated configurations.

    Args:
        presets: folder of ``<dataset>_<method>.yaml`` presets; a relative path is read from the
            working directory. None selects :data:`DEFAULT_PRESETS`.

    Raises:
        ConfigError: on an unknown setting, dataset or method, or an invalid configuration.
        FileNotFoundError: when the presets folder or one of its presets is missing.
    """
    import yaml

    if setting not in SETTINGS:
        raise ConfigError(f"Unknown setting {setting!r}. Choose one of {sorted(SETTINGS)}.")
    chosen = datasets or SETTINGS[setting]
    unknown = sorted(set(chosen) - set(SETTINGS[setting]))
    if unknown:
        raise ConfigError(f"Datasets {unknown} are not part of {setting}; it has {SETTINGS[setting]}.")
    chosen_methods = methods or list(METHOD_PRESETS)
    unknown = sorted(set(chosen_methods) - set(METHOD_PRESETS))
    if unknown:
        raise ConfigError(f"Unknown methods {unknown}; presets exist for {sorted(METHOD_PRESETS)}.")
    presets = DEFAULT_PRESETS if presets is None else presets
    _check_presets_folder(presets)

    runs = []
    for dataset in chosen:
        for method in chosen_methods:
            values = yaml.safe_load(_preset(presets, dataset, method).read_text())
            extra = list(overrides or [])
            if data_roots and dataset in data_roots:
                extra.append(f"data.root={data_roots[dataset]}")
            values = apply_overrides(values, extra)
            held_out: list[str | None] = [None]
            if setting == "domain_generalization":
                held_out = _domains_of(config_from_dict(values))
            for domain in held_out:
                cell = dict(values)
                path = output / dataset / method
                if domain is not None:
                    cell = apply_overrides(cell, ["setting.kind=leave_one_domain_out", f"setting.held_out_domain={domain}"])
                    path = path / domain
                config_from_dict(cell)  # validate before anything runs
                runs.append(ReproduceRun(dataset, method, domain, path, cell))
    return runs


def _domains_of(config: Any) -> list[str]:
    from fl2ora.data.catalog import load_domain_dataset

    domains = config.setting.domains
    if domains:
        return list(domains)
    return list(load_domain_dataset(config.data.dataset, config.data.root).domains)


def _stats(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


def _last_records(path: Path, last: int) -> list[dict[str, Any]]:
    records = [r for r in read_metrics(path) if "mean" in r]
    return records[-last:]


def _cell(values: list[float]) -> str:
    mean, std = _stats(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


OVERALL_HELD_OUT_LABEL = "mean over held-out domains"
"""Held-out domain cell of the domain-generalisation row that averages a method's held-out domains."""


def _held_out_overall_rows(per_domain: dict[tuple[str, str], list[list[float]]]) -> list[list[str]]:
    """Build one row per (dataset, method): the mean over its held-out domains of each metric.

    Args:
        per_domain: (dataset, method) -> one list per held-out domain of its metrics'
            means over the last rounds, in :data:`METRICS` order.

    Returns:
        Rows whose metric cells are the mean ± standard deviation (ddof 0) across the
        held-out domains, in percent.
    """
    rows = []
    for (dataset, method), domain_means in per_domain.items():
        by_metric = np.asarray(domain_means, dtype=np.float64).T  # (metrics, domains)
        rows.append([dataset, METHOD_PRESETS[method], OVERALL_HELD_OUT_LABEL, *[_cell(list(v)) for v in by_metric]])
    return rows


def tabulate(setting: str, runs: list[ReproduceRun], last: int = 5) -> tuple[list[str], list[list[str]]]:
    """Build the study-layout table of finished runs: a header and rows of strings."""
    rows: list[list[str]] = []
    if setting == "base_to_new":
        header = ["dataset", "method", "base Acc", "new Acc", "HM", "base ECE", "new ECE", "local Acc", "local ECE"]
        for run in runs:
            records = _last_records(run.path, last)
            part = [r["base_to_new"] for r in records]
            rows.append(
                [
                    run.dataset,
                    METHOD_PRESETS[run.method],
                    _cell([p["base"]["accuracy"] for p in part]),
                    _cell([p["new"]["accuracy"] for p in part]),
                    _cell([p["harmonic_mean_accuracy"] for p in part]),
                    _cell([p["base"]["ece"] for p in part]),
                    _cell([p["new"]["ece"] for p in part]),
                    _cell([p["local"]["accuracy"] for p in part]),
                    _cell([p["local"]["ece"] for p in part]),
                ]
            )
        return header, rows
    header = ["dataset", "method"]
    if setting == "domain_skew":
        header.append("domain")
    if setting == "domain_generalization":
        header.append("held-out domain")
    header += [title for _, title in METRICS]
    per_domain: dict[tuple[str, str], list[list[float]]] = {}
    for run in runs:
        records = _last_records(run.path, last)
        if setting == "domain_skew":
            for domain in records[-1]["groups"]:
                cells = [_cell([r["groups"][domain]["mean"][key] for r in records]) for key, _ in METRICS]
                rows.append([run.dataset, METHOD_PRESETS[run.method], domain, *cells])
            cells = [_cell([r["mean"][key] for r in records]) for key, _ in METRICS]
            rows.append([run.dataset, METHOD_PRESETS[run.method], "all (client mean)", *cells])
        elif setting == "domain_generalization":
            domain = run.held_out_domain
            cells = [_cell([r["heldout"][domain][key] for r in records]) for key, _ in METRICS]
            rows.append([run.dataset, METHOD_PRESETS[run.method], domain, *cells])
            per_domain.setdefault((run.dataset, run.method), []).append(
                [_stats([r["heldout"][domain][key] for r in records])[0] for key, _ in METRICS]
            )
        else:
            cells = [_cell([r["mean"][key] for r in records]) for key, _ in METRICS]
            rows.append([run.dataset, METHOD_PRESETS[run.method], *cells])
    # Runs are planned dataset by dataset and method by method, so each overall row
    # goes right after that method's held-out domain rows.
    for overall in _held_out_overall_rows(per_domain):
        last_index = max(i for i, row in enumerate(rows) if row[:2] == overall[:2])
        rows.insert(last_index + 1, overall)
    return header, rows


def run_reproduction(
    setting: str,
    presets: Path | None,
    output: Path,
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    data_roots: dict[str, str] | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Run every unfinished run of ``setting`` and write ``<output>/table.md`` and ``table.csv``.

    ``presets`` is read as in :func:`plan_runs`.

    Returns:
        The path of the Markdown table.
    """
    from fl2ora.runner import run_experiment

    runs = plan_runs(setting, presets, output, datasets, methods, data_roots, overrides)
    logger.info("Reproducing %s: %d runs into %s", setting, len(runs), output)
    random_init = False
    for index, run in enumerate(runs, start=1):
        random_init = random_init or bool(run.values.get("model", {}).get("random_init"))
        config = config_from_dict(run.values)
        if is_finished_run_of(run.path, config):
            logger.info("Run %d/%d %s is complete; skipping", index, len(runs), run.path)
            continue
        logger.info("Run %d/%d: %s", index, len(runs), run.path)
        # A folder left by an interrupted or differently configured attempt is replaced.
        run_experiment(config, run.path, overwrite=run.path.exists())

    last = config_from_dict(runs[0].values).eval.last_rounds
    header, rows = tabulate(setting, runs, last)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [
        "",
        f"{setting}: metrics in percent, mean ± std over the last {last} evaluated rounds, "
        "averaged over clients without weights unless the row says otherwise.",
    ]
    if setting == "domain_generalization":
        notes.append("Held-out rows: all predictions on the unseen domain pooled.")
        notes.append(
            f"Rows '{OVERALL_HELD_OUT_LABEL}': the mean ± std across held-out domains of each domain's "
            "mean over the last rounds (an average of the rows above it, not pooled predictions)."
        )
    if any(run.values.get("setting", {}).get("pacs_test_split") == "test_kfold" for run in runs):
        notes.append(
            "WARNING: PACS in-domain tests use test_kfold, which contains every training image "
            "(the reference code's behaviour): these in-domain numbers score training images."
        )
    if random_init:
        notes.append("WARNING: random-initialised backbone: these numbers are a pipeline check, not evidence about CLIP.")
    output.mkdir(parents=True, exist_ok=True)
    table = output / "table.md"
    table.write_text("\n".join(lines + notes) + "\n")
    with (output / "table.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    (output / "runs.json").write_text(json.dumps([str(run.path) for run in runs], indent=2) + "\n")
    return table
