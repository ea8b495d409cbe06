"""The domain-generalisation table of ``fl2ora reproduce``: per-domain rows and their mean row."""

import json

import numpy as np

from fl2ora.reproduce import METRICS, OVERALL_HELD_OUT_LABEL, ReproduceRun, tabulate

DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


def write_heldout_run(path, domain, rounds):
    """Write ``metrics.jsonl`` with one evaluated record per row of ``rounds`` (metrics in METRICS order)."""
    path.mkdir(parents=True)
    lines = []
    for index, values in enumerate(rounds, start=1):
        metrics = {key: float(value) for (key, _), value in zip(METRICS, values)}
        lines.append(json.dumps({"round": index, "mean": metrics, "heldout": {domain: metrics}}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_domain_generalization_mean_row(tmp_path):
    rng = np.random.default_rng(0)
    last = 2
    runs, per_domain = [], {}
    for method in ("fl2ora", "promptfl"):
        for domain in DOMAINS:
            rounds = rng.uniform(0.0, 1.0, size=(3, len(METRICS)))
            path = tmp_path / "pacs" / method / domain
            write_heldout_run(path, domain, rounds)
            runs.append(ReproduceRun("pacs", method, domain, path, {}))
            per_domain[(method, domain)] = rounds[-last:].mean(axis=0)

    header, rows = tabulate("domain_generalization", runs, last)

    assert header == ["dataset", "method", "held-out domain", "Acc", "ECE", "MCE", "ACE"]
    assert [row[2] for row in rows] == [*DOMAINS, OVERALL_HELD_OUT_LABEL] * 2
    for method, title, overall in (("fl2ora", "FL²oRA", rows[4]), ("promptfl", "PromptFL", rows[9])):
        assert overall[:3] == ["pacs", title, OVERALL_HELD_OUT_LABEL]
        domain_means = np.array([per_domain[(method, domain)] for domain in DOMAINS])  # (domains, metrics)
        for column, (mean, std) in enumerate(zip(domain_means.mean(axis=0), domain_means.std(axis=0))):
            assert overall[3 + column] == f"{100 * mean:.2f} ± {100 * std:.2f}", (method, METRICS[column])
    # The mean row's Acc equals the mean of the per-domain rows' Acc cells, to the cells' rounding.
    shown = [float(row[3].split(" ± ")[0]) for row in rows[:4]]
    assert abs(float(rows[4][3].split(" ± ")[0]) - np.mean(shown)) <= 0.01
