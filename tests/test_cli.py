"""The ``fl2ora`` command end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from fl2ora.cli import main
from fl2ora.rundir import read_metrics

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = [
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "predictions.npz",
    "reliability.png",
    "adapter.safetensors",
    "run.log",
    "partition.json",
]


def quick_overrides(archive: Path) -> list[str]:
    values = [
        f"data.root={archive}",
        "data.max_train_per_class=30",
        "data.max_test_per_class=15",
        "partition.num_clients=4",
        "partition.min_samples=5",
        "federated.rounds=2",
        "federated.fraction=0.5",
    ]
    return [arg for value in values for arg in ("--set", value)]


def all_finite(values) -> bool:
    if isinstance(values, dict):
        return all(all_finite(v) for v in values.values())
    if isinstance(values, list):
        return all(all_finite(v) for v in values)
    if isinstance(values, float):
        return math.isfinite(values)
    return True


@pytest.mark.slow
def test_quickstart_on_real_cifar10_is_complete_and_reproducible(cifar10_archive, tmp_path, capsys):
    config = REPO / "configs" / "quickstart.yaml"
    for name in ("a", "b"):
        code = main(["run", str(config), "--output", str(tmp_path / name), "--quiet", *quick_overrides(cifar10_archive)])
        assert code == 0
    table = capsys.readouterr().out
    assert "random-initialised" in table
    assert "ECE" in table

    run = tmp_path / "a"
    for file in RUN_FILES:
        assert (run / file).is_file(), file
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["federated"]["rounds"] == 2
    assert resolved["lora"]["rank"] == 2

    records = read_metrics(run)
    assert [r["round"] for r in records] == [1, 2]
    assert all(all_finite(r["mean"]) and all_finite(r["pooled"]) for r in records)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["backbone"]["random_init"] is True
    assert "pipeline check" in summary["warning"]
    predictions = np.load(run / "predictions.npz")
    assert predictions["probs"].shape[1] == 10
    np.testing.assert_allclose(predictions["probs"].sum(1), 1.0, rtol=1e-5)

    partition = json.loads((run / "partition.json").read_text())
    assert len(partition["train"]) == 4
    assert sum(map(sum, partition["train"])) == 300  # 30 per class, 10 classes
    assert sum(map(sum, partition["test"])) == len(predictions["label"])

    other = json.loads((tmp_path / "b" / "summary.json").read_text())
    for key in ("final", "last_rounds", "trainable_parameters", "bytes_per_round"):
        assert summary[key] == other[key], key


def test_cli_reports_config_errors(tmp_path, capsys):
    config = REPO / "configs" / "quickstart.yaml"
    code = main(["run", str(config), "--output", str(tmp_path / "x"), "--set", "lora.rnak=4"])
    assert code == 2
    error = capsys.readouterr().err
    assert "Unknown configuration key 'lora.rnak'" in error
    assert "lora.rank" in error
    assert not (tmp_path / "x").exists()


def test_cli_refuses_finished_run_without_overwrite(tmp_path, capsys):
    run = tmp_path / "done"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "summary.json").write_text("{}\n")
    code = main(["run", str(REPO / "configs" / "quickstart.yaml"), "--output", str(run)])
    assert code == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (run / "summary.json").read_text() == "{}\n"
