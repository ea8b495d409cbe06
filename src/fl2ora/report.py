"""Human-readable results: the console table and plot titles."""

from __future__ import annotations

from typing import Any

from fl2ora.notices import RANDOM_INIT_WARNING, REFERENCE_LABEL

_COLUMNS = [
    ("accuracy", "Acc"),
    ("macro_f1", "F1"),
    ("ece", "ECE"),
    ("mce", "MCE"),
    ("ace", "ACE"),
    ("classwise_ece", "cwECE"),
    ("confidence", "Conf"),
]
_RAW_COLUMNS = [("nll", "NLL"), ("brier", "Brier")]


def reliability_title(ece: float, round_index: int, random_init: bool, calibration: str) -> str:
    """Title of the pooled reliability diagram, with every warning that applies."""
    lines = [f"Pooled reliability, round {round_index}: ECE {100 * ece:.2f}%"]
    if calibration == "reference":
        lines.append(REFERENCE_LABEL)
    if random_init:
        lines.append("Random-initialised backbone: pipeline check only")
    return "\n".join(lines)


def format_results_table(summary: dict[str, Any]) -> str:
    """Render the final and last-rounds metrics of a run summary as a plain-text table.

    Accuracy and calibration errors are in percent, NLL and Brier as raw values.
    """
    headers = ["", *[label for _, label in _COLUMNS], *[label for _, label in _RAW_COLUMNS]]

    def row(label: str, values: dict[str, float], spread: dict[str, float] | None = None) -> list[str]:
        cells = [label]
        for key, _ in _COLUMNS:
            cell = f"{100 * values[key]:.2f}"
            if spread is not None:
                cell += f" ± {100 * spread[key]:.2f}"
            cells.append(cell)
        for key, _ in _RAW_COLUMNS:
            cell = f"{values[key]:.4f}"
            if spread is not None:
                cell += f" ± {spread[key]:.4f}"
            cells.append(cell)
        return cells

    final = summary["final"]
    last = summary["last_rounds"]
    rows = [
        row(f"round {final['round']}, client mean", final["mean"]),
        row(f"round {final['round']}, pooled", final["pooled"]),
        row(
            "last round, client mean" if len(last["rounds"]) == 1 else f"last {len(last['rounds'])} rounds, client mean",
            last["mean"],
            last["std"],
        ),
    ]
    scaling = summary.get("temperature_scaling")
    if scaling:
        label = f"temperature-scaled (T={scaling['temperature']:.3f}, {scaling['mode']})"
        rows.append(row(f"{label}, client mean", scaling["after"]["mean"]))
        rows.append(row(f"{label}, pooled", scaling["after"]["pooled"]))
    widths = [max(len(line[i]) for line in [headers, *rows]) for i in range(len(headers))]
    rendered = [
        "  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths)))
        for line in [headers, *rows]
    ]
    rendered.insert(1, "  ".join("-" * width for width in widths))

    title = (
        f"{summary['name']}: {summary['method']} ({summary.get('loss', 'none')} loss, "
        f"{summary.get('aggregation', 'fedavg')}) on {summary['backbone']['name']}, "
        f"{summary['num_clients']} clients, {summary['rounds']} rounds (metrics in %, NLL and Brier raw)"
    )
    notes = []
    if summary.get("calibration_definition") == "reference":
        notes.append(f"NOTE: {REFERENCE_LABEL}.")
    if summary.get("test_split_warning"):
        notes.append(f"WARNING: {summary['test_split_warning']}")
    if summary.get("random_init"):
        notes.append(f"WARNING: {RANDOM_INIT_WARNING}")
    return "\n".join([title, *rendered, *notes])
