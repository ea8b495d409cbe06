"""The ``fl2ora`` command end to end."""

import json
import logging
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


def one_line_error(stderr: str) -> str:
    """Return the single line of ``stderr``, failing when there are more."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


OUTPUT_COMMANDS = {
    "run": ["run", str(REPO / "configs" / "quickstart.yaml")],
    "sweep": ["sweep", str(REPO / "configs" / "quickstart.yaml"), "--grid", "seed=0,1"],
    "reproduce": ["reproduce", "in_distribution"],
    "compare": ["compare", "some-run"],
    "flower": ["flower", str(REPO / "configs" / "quickstart.yaml")],
}


@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
@pytest.mark.parametrize("below", [False, True])
def test_output_file_rejected(command, below, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    output = existing / "run" if below else existing

    code = main([*OUTPUT_COMMANDS[command], "--output", str(output)])

    assert code == 2
    error = one_line_error(capsys.readouterr().err)
    assert error.startswith(f"fl2ora: error: --output {str(output)!r} ")
    if below:
        assert f"lies below {str(existing)!r}, which is an existing file" in error
    else:
        assert "is an existing file, not a folder" in error
    assert "Give the path of a folder" in error
    assert existing.read_text() == "keep me\n"


def test_flower_warns_batched_clients_ignored(tmp_path, monkeypatch, caplog):
    import fl2ora.runtime.flower.deploy as deploy

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "run_local_deployment", stop)
    args = ["flower", str(REPO / "configs" / "quickstart.yaml"), "--set", "perf.batched_clients=3"]
    with caplog.at_level(logging.WARNING):
        code = main([*args, "--output", str(tmp_path / "run"), "--quiet"])
    assert code == 130
    warnings = [r.getMessage() for r in caplog.records if r.name == "fl2ora.runtime.flower.command"]
    assert warnings == [
        "perf.batched_clients=3 has no effect under Flower: each SuperNode trains its own client. "
        "It applies to `fl2ora run` only."
    ]


def test_sweep_rejects_duplicate_grid_value(tmp_path, capsys):
    output = tmp_path / "sweep"
    code = main(["sweep", str(REPO / "configs" / "quickstart.yaml"), "--grid", "seed=0,0", "--output", str(output)])
    assert code == 2
    error = one_line_error(capsys.readouterr().err)
    assert "Grid key 'seed' lists the value 0 more than once" in error
    assert "List each value once" in error
    assert not output.exists()


def write_tiny_config(folder: Path, data_root: Path, **model) -> Path:
    values = {
        "name": "ctrl-c",
        "seed": 2,
        "model": {"name": "tiny", "random_init": True, **model},
        "data": {"dataset": "image_folder", "root": str(data_root), "augment": False},
        "partition": {"method": "dirichlet", "num_clients": 2, "beta": 1.0, "min_samples": 4},
        "federated": {"rounds": 2, "fraction": 1.0},
        "train": {"lr": 0.05, "batch_size": 8},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def press_ctrl_c_twice() -> None:
    """Call the installed SIGINT handler twice, as two Ctrl-C presses would, without sending a signal."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    handler(signal.SIGINT, None)  # the first press only requests a stop at the next safe point
    handler(signal.SIGINT, None)  # the second raises KeyboardInterrupt at once


def interrupt_on_call(monkeypatch, module, name: str, call: int) -> None:
    """Make the ``call``-th call of ``module.name`` run, then receive two Ctrl-C presses."""
    original = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(name)
        if len(calls) == call:
            press_ctrl_c_twice()
        return result

    monkeypatch.setattr(module, name, wrapper)


# Where the second Ctrl-C arrives, and the checkpoint round that the run directory then contains.
SECOND_CTRL_C_POINTS = [
    # During the build, before the run directory exists, so nothing is saved.
    ("experiment", "build_experiment", 1, None),
    # During round 2's checkpoint write, after the temporary file is complete, so round 1's checkpoint stays.
    ("checkpoint", "save_file", 2, 1),
    # While the final outputs are written, after the last checkpoint.
    ("outputs", "plot_reliability_diagram", 1, 2),
]


@pytest.mark.parametrize(("module_name", "name", "call", "saved_round"), SECOND_CTRL_C_POINTS)
def test_second_ctrl_c_exits_130(module_name, name, call, saved_round, tiny_image_folder, tmp_path, monkeypatch, capsys):
    import signal

    import fl2ora.experiment
    import fl2ora.runtime.checkpoint
    import fl2ora.runtime.outputs
    from fl2ora.runtime.checkpoint import load_checkpoint

    modules = {
        "experiment": fl2ora.experiment,
        "checkpoint": fl2ora.runtime.checkpoint,
        "outputs": fl2ora.runtime.outputs,
    }
    config = write_tiny_config(tmp_path, tiny_image_folder)
    run = tmp_path / "run"
    interrupt_on_call(monkeypatch, modules[module_name], name, call)
    handler_before = signal.getsignal(signal.SIGINT)

    code = main(["run", str(config), "--output", str(run), "--quiet"])

    assert code == 130
    assert signal.getsignal(signal.SIGINT) is handler_before
    lines = capsys.readouterr().err.strip().splitlines()
    assert "fl2ora: stopping at the next safe point (Ctrl-C again to stop at once)" in lines
    assert not any(line.startswith("Traceback") for line in lines)
    message = lines[-1]
    stopped = "fl2ora: stopped at once by a second Ctrl-C"
    if saved_round is None:
        assert message == f"{stopped} before this run wrote {run}, so nothing was saved. Start the run again."
        assert not run.exists()
        return
    assert load_checkpoint(run).round == saved_round
    assert message == (
        f"{stopped}. {run} contains the checkpoint after round {saved_round}. Continue with: fl2ora run --resume {run}"
    )
    assert not (run / "checkpoint.safetensors.tmp").exists()
    assert not (run / "summary.json").exists()

    # The resumed run finishes both rounds.
    monkeypatch.undo()
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert [record["round"] for record in read_metrics(run)] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2


def test_sweep_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    import fl2ora.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fl2ora.runner, "run_experiment", interrupted)
    output = tmp_path / "sweep"
    code = main(["sweep", str(REPO / "configs" / "quickstart.yaml"), "--grid", "seed=0,1", "--output", str(output), "--quiet"])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fl2ora: interrupted. The finished cells in {output} are kept, and the same command "
        "run again skips them and runs the others."
    )
