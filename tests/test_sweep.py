"""Sweeps and comparison tables."""

import csv
import json

import numpy as np
import pytest

from fl2ora.compare import comparison_rows, read_run, write_comparison
from fl2ora.config import ConfigError, config_to_dict, load_config
from fl2ora.sweep import parse_grid, plan_sweep, run_sweep
from test_cli import REPO


def test_parse_grid_reads_yaml_values():
    grid = parse_grid(["lora.rank=1,2", "method=fl2ora,coop", "lora.layers=[0,1],all", "eval.calibration=standard"])
    assert grid == {
        "lora.rank": [1, 2],
        "method": ["fl2ora", "coop"],
        "lora.layers": [[0, 1], "all"],
        "eval.calibration": ["standard"],
    }


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["lora.rank"], "key=v1,v2"),
        (["=1,2"], "key=v1,v2"),
        (["lora.rank="], "key=v1,v2"),
        (["seed=1", "seed=2"], "given twice"),
        (["seed=0,0"], "Grid key 'seed' lists the value 0 more than once"),
        (["seed=0,1,00"], "Grid key 'seed' lists the value 0 more than once"),  # 00 is YAML for 0
        (["lora.layers=[0,1],all,[0, 1]"], r"Grid key 'lora.layers' lists the value \[0, 1\] more than once"),
        (["method=coop", "loss.name=dca,mdca,dca"], "Grid key 'loss.name' lists the value 'dca' more than once"),
        (["seed=,,"], r"Grid item 'seed=,,' lists no value\. Give at least one, e\.g\. seed=0,1\."),
        (["lora.rank=[1"], r"Grid item 'lora.rank=\[1': a value is not valid YAML \(.*\)\. Close its brackets"),
    ],
)
def test_parse_grid_invalid(items, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(items)


def test_parse_grid_keeps_true_and_one_apart():
    # True == 1 in Python, but they are different configuration values.
    assert parse_grid(["flag=true,1"]) == {"flag": [True, 1]}


def test_plan_rejects_duplicate_value(tmp_path):
    base = config_to_dict(load_config(REPO / "configs" / "quickstart.yaml"))
    with pytest.raises(ConfigError, match="Grid key 'seed' lists the value 3 more than once"):
        plan_sweep(base, {"lora.rank": [2, 4], "seed": [3, 5, 3]}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_plan_rejects_invalid_cell_before_running(tmp_path):
    base = config_to_dict(load_config(REPO / "configs" / "quickstart.yaml"))
    with pytest.raises(ConfigError, match=r"Sweep cell \{'lora.rank': 0\} is invalid: lora.rank must be >= 1"):
        plan_sweep(base, {"lora.rank": [2, 0]}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def write_fake_run(path, config, metrics, random_init=True):
    import yaml

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "summary.json").write_text(json.dumps({"final": {"mean": metrics}, "random_init": random_init}))


def test_comparison_groups_seeds_and_marks_best(tmp_path):
    runs = []
    values = {("a", 0): (0.5, 0.10), ("a", 1): (0.7, 0.20), ("b", 0): (0.55, 0.05), ("b", 1): (0.55, 0.07)}
    for (method, seed), (accuracy, ece) in values.items():
        path = tmp_path / f"{method}{seed}"
        metrics = {"accuracy": accuracy, "ece": ece, "mce": 2 * ece, "ace": ece + 0.01}
        write_fake_run(path, {"method": method, "seed": seed, "name": "x"}, metrics)
        runs.append(read_run(path))
    rows = write_comparison(runs, tmp_path / "out")
    by_method = {row["label"]["method"]: row for row in rows}
    assert by_method["a"]["accuracy"] == pytest.approx(np.mean([0.5, 0.7]))
    assert by_method["a"]["accuracy_std"] == pytest.approx(np.std([0.5, 0.7]))
    assert by_method["b"]["ece"] == pytest.approx(0.06)
    assert by_method["a"]["runs"] == 2

    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert "| a | 2 | **60.00 ± 10.00** | 15.00 ± 5.00 |" in markdown  # a has the highest accuracy
    assert "**6.00 ± 1.00**" in markdown  # b has the lowest ECE
    assert "pipeline check" in markdown
    with (tmp_path / "out" / "comparison.csv").open() as stream:
        table = list(csv.DictReader(stream))
    best = {row["method"]: row["best_ece"] for row in table}
    assert best == {"a": "0", "b": "1"}
    assert (tmp_path / "out" / "ece_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_read_run_rejects_unfinished(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(FileNotFoundError, match="summary.json is missing"):
        read_run(tmp_path)


def fake_metrics(accuracy, ece):
    return {"accuracy": accuracy, "ece": ece, "mce": 2 * ece, "ace": ece + 0.01}


def test_comparison_counts_repeated_seed_once(tmp_path, caplog):
    # Method a: seed 0 run twice with different results, seed 1 once, and an exact copy of seed 1.
    # Method b: two distinct seeds.
    values = {
        "a0": ("a", 0, 0.4, 0.10),
        "a0-again": ("a", 0, 0.6, 0.30),
        "a1": ("a", 1, 0.9, 0.05),
        "a1-copy": ("a", 1, 0.9, 0.05),
        "b0": ("b", 0, 0.5, 0.20),
        "b1": ("b", 1, 0.7, 0.10),
    }
    runs = []
    for name, (method, seed, accuracy, ece) in values.items():
        write_fake_run(tmp_path / name, {"method": method, "seed": seed, "name": "x"}, fake_metrics(accuracy, ece))
        runs.append(read_run(tmp_path / name))

    with caplog.at_level("WARNING", logger="fl2ora.compare"):
        rows = write_comparison(runs, tmp_path / "out")

    by_method = {row["label"]["method"]: row for row in rows}
    a = by_method["a"]
    seed_accuracy = [np.mean([0.4, 0.6]), 0.9]
    seed_ece = [np.mean([0.10, 0.30]), 0.05]
    assert a["seeds"] == [0, 1]
    assert a["runs"] == 4
    assert a["accuracy"] == pytest.approx(np.mean(seed_accuracy))
    assert a["accuracy_std"] == pytest.approx(np.std(seed_accuracy))
    assert a["ece"] == pytest.approx(np.mean(seed_ece))
    assert a["ece_std"] == pytest.approx(np.std(seed_ece))
    assert a["mce"] == pytest.approx(np.mean([2 * e for e in seed_ece]))
    assert by_method["b"]["accuracy_std"] == pytest.approx(np.std([0.5, 0.7]))
    assert by_method["b"]["repeated_seeds"] == []

    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 2
    assert str(tmp_path / "a0") in warnings[0]
    assert str(tmp_path / "a0-again") in warnings[0]
    assert "seed 0" in warnings[0]
    assert "(method=a)" in warnings[0]
    assert str(tmp_path / "a1-copy") in warnings[1]
    assert "seed 1" in warnings[1]

    markdown = (tmp_path / "out" / "comparison.md").read_text()
    accuracy_cell = f"{100 * np.mean(seed_accuracy):.2f} ± {100 * np.std(seed_accuracy):.2f}"
    assert f"| a | 2 | **{accuracy_cell}** |" in markdown
    assert "| b | 2 |" in markdown
    assert "Repeated seeds: runs of one configuration and seed were averaged into one value" in markdown
    assert f"seed 0: {tmp_path / 'a0'}, {tmp_path / 'a0-again'}" in markdown
    assert f"seed 1: {tmp_path / 'a1'}, {tmp_path / 'a1-copy'}" in markdown

    with (tmp_path / "out" / "comparison.csv").open() as stream:
        table = {row["method"]: row for row in csv.DictReader(stream)}
    assert table["a"]["seeds"] == "2"
    assert table["a"]["runs"] == "4"
    assert float(table["a"]["accuracy"]) == pytest.approx(np.mean(seed_accuracy))
    assert table["b"]["seeds"] == "2"


def test_comparison_without_repeats_has_no_note(tmp_path, caplog):
    runs = []
    for seed, accuracy in [(0, 0.5), (1, 0.7)]:
        write_fake_run(tmp_path / f"r{seed}", {"method": "a", "seed": seed, "name": "x"}, fake_metrics(accuracy, 0.1))
        runs.append(read_run(tmp_path / f"r{seed}"))
    with caplog.at_level("WARNING", logger="fl2ora.compare"):
        rows = write_comparison(runs, tmp_path / "out")
    assert rows[0]["seeds"] == [0, 1]
    assert rows[0]["accuracy"] == pytest.approx(np.mean([0.5, 0.7]))
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []
    assert "Repeated seeds" not in (tmp_path / "out" / "comparison.md").read_text()


def two_fake_runs(root):
    paths = []
    for method, accuracy in [("a", 0.5), ("b", 0.7)]:
        path = root / f"run-{method}"
        write_fake_run(path, {"method": method, "seed": 0, "name": "x"}, fake_metrics(accuracy, 0.1))
        paths.append(str(path))
    return paths


def test_compare_cli_default_output_is_new_folder(tmp_path, monkeypatch, capsys):
    import re
    import time

    from fl2ora.cli import main

    runs = two_fake_runs(tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    real_strftime = time.strftime

    def fixed_strftime(pattern, *args):
        return "20250102-030405" if pattern == "%Y%m%d-%H%M%S" else real_strftime(pattern, *args)

    monkeypatch.setattr(time, "strftime", fixed_strftime)

    assert main(["compare", *runs]) == 0
    first = work / "runs" / "comparison-20250102-030405"
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"Comparison folder: {first.relative_to(work)} (comparison.md, comparison.csv, ece_vs_accuracy.png)"
    )
    for name in ("comparison.md", "comparison.csv", "ece_vs_accuracy.png"):
        assert (first / name).is_file(), name
        assert not (work / name).exists(), name
    (first / "comparison.md").write_text("earlier comparison\n")

    # A second comparison in the same second gets its own folder and keeps the first one.
    assert main(["compare", runs[0]]) == 0
    second = work / "runs" / "comparison-20250102-030405-2"
    assert f"Comparison folder: {second.relative_to(work)} " in capsys.readouterr().out
    assert (second / "comparison.md").is_file()
    assert (first / "comparison.md").read_text() == "earlier comparison\n"

    monkeypatch.setattr(time, "strftime", real_strftime)
    assert main(["compare", runs[0]]) == 0
    folders = sorted(path.name for path in (work / "runs").iterdir())
    assert len(folders) == 3
    assert any(re.fullmatch(r"comparison-\d{8}-\d{6}", name) for name in folders if name not in {first.name, second.name})


def test_compare_cli_explicit_output(tmp_path, monkeypatch, capsys):
    from fl2ora.cli import main

    runs = two_fake_runs(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "chosen"
    assert main(["compare", *runs, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "| a | 1 | 50.00 ± 0.00 |" in out
    assert out.strip().splitlines()[-1].startswith(f"Comparison folder: {output} ")
    assert (output / "comparison.csv").is_file()
    assert not (tmp_path / "runs").exists()


def test_compare_cli_unfinished_run_writes_nothing(tmp_path, monkeypatch, capsys):
    from fl2ora.cli import main

    runs = two_fake_runs(tmp_path / "in")
    unfinished = tmp_path / "in" / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("name: x\n")
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *runs, str(unfinished)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"fl2ora: error: {unfinished} is not a finished fl2ora run: summary.json is missing."
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_full_grid_sweep_on_real_cifar10(cifar10_archive, tmp_path):
    base = config_to_dict(
        load_config(
            REPO / "configs" / "quickstart.yaml",
            [
                f"data.root={cifar10_archive}",
                "data.max_train_per_class=8",
                "data.max_test_per_class=4",
                "partition.num_clients=3",
                "partition.min_samples=2",
                "federated.rounds=1",
                "federated.fraction=1.0",
                "maple.depth=2",
            ],
        )
    )
    grid = parse_grid(
        [
            "method=zeroshot,fl2ora,coop,kgcoop,maple,layernorm,bitfit,full",
            "loss.name=none,dca,mdca",
            "federated.aggregation=fedavg,fedprox,feddyn,fednova",
        ]
    )
    rows = run_sweep(base, grid, tmp_path)
    assert len(rows) == 8 * 3 * 4
    cells = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert len(cells) == 96
    for cell in cells:
        for name in ("config.yaml", "metrics.jsonl", "summary.json", "predictions.npz", "reliability.png", "adapter.safetensors", "run.log"):
            assert (cell / name).is_file(), f"{cell.name}/{name}"

    with (tmp_path / "comparison.csv").open() as stream:
        table = list(csv.DictReader(stream))
    assert len(table) == 96
    accuracies = [float(row["accuracy"]) for row in table]
    assert all(0.0 <= value <= 1.0 for value in accuracies)
    assert {row["best_accuracy"] for row in table if float(row["accuracy"]) == max(accuracies)} == {"1"}
    assert (tmp_path / "ece_vs_accuracy.png").is_file()

    # A second sweep finds every cell complete and runs nothing.
    stamps = {cell: (cell / "summary.json").stat().st_mtime_ns for cell in cells}
    run_sweep(base, grid, tmp_path)
    assert stamps == {cell: (cell / "summary.json").stat().st_mtime_ns for cell in cells}


def tiny_base(root):
    return config_to_dict(
        load_config(
            REPO / "configs" / "quickstart.yaml",
            [
                "data.dataset=image_folder",
                f"data.root={root}",
                "partition.num_clients=2",
                "partition.min_samples=2",
                "federated.rounds=1",
            ],
        )
    )


def test_failed_cell_listed_and_others_run(tiny_image_folder, tmp_path):
    from fl2ora.sweep import SweepError

    base = tiny_base(tiny_image_folder)
    grid = {"data.root": [str(tmp_path / "missing"), str(tiny_image_folder)]}
    with pytest.raises(SweepError, match="1 of 2 sweep cells failed"):
        run_sweep(base, grid, tmp_path / "sweep")
    cells = plan_sweep(base, grid, tmp_path / "sweep")
    assert not (cells[0].path / "summary.json").exists()
    assert (cells[1].path / "summary.json").is_file()
    table = (tmp_path / "sweep" / "comparison.md").read_text()
    assert "FAILED: 1 of 2 cells" in table
    assert "missing" in table


def test_finished_cell_of_other_config_runs_again(tiny_image_folder, tmp_path):
    base = tiny_base(tiny_image_folder)
    grid = {"seed": [0]}
    run_sweep(base, grid, tmp_path)
    cell = plan_sweep(base, grid, tmp_path)[0].path
    first = (cell / "summary.json").stat().st_mtime_ns
    run_sweep(base, grid, tmp_path)
    assert (cell / "summary.json").stat().st_mtime_ns == first  # same configuration: skipped
    changed = {**base, "federated": {**base["federated"], "rounds": 2}}
    run_sweep(changed, grid, tmp_path)
    assert json.loads((cell / "summary.json").read_text())["rounds"] == 2


def test_sanitised_cell_names_stay_distinct(tmp_path):
    base = config_to_dict(load_config(REPO / "configs" / "quickstart.yaml"))
    cells = plan_sweep(base, {"coop.init": ["a photo of a", "a_photo_of_a"]}, tmp_path)
    assert cells[0].path != cells[1].path
