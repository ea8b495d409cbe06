"""The study's settings on real images: domain skew, leave-one-domain-out, base-to-new."""

import json
from pathlib import Path

import numpy as np
import pytest

from fl2ora.cli import main
from fl2ora.config import ConfigError, config_from_dict
from fl2ora.experiment import build_experiment
from fl2ora.settings import build_splits, sample_shots, split_base_new

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def archive(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"real data archive not found at {path}")
    return path


def tiny(dataset: str, root: Path, **sections):
    values = {
        "seed": 1,
        "model": {"name": "tiny", "random_init": True},
        "data": {"dataset": dataset, "root": str(root), "max_train_per_class": 6, "max_test_per_class": 3},
        "partition": {"min_samples": 2, "num_clients": 5},
        "federated": {"rounds": 1, "fraction": 1.0},
    }
    for section, overrides in sections.items():
        values[section] = {**values.get(section, {}), **overrides}
    return config_from_dict(values)


def test_split_base_new_rounds_base_up():
    base, new = split_base_new(101)
    assert len(base) == 51 and len(new) == 50
    assert set(base).isdisjoint(new)


def test_sample_shots_exact_per_class():
    labels = np.repeat(np.arange(4), 10)
    chosen = sample_shots(labels, np.array([1, 3]), shots=4, seed=0)
    assert np.bincount(labels[chosen], minlength=4).tolist() == [0, 4, 0, 4]
    assert np.array_equal(chosen, sample_shots(labels, np.array([1, 3]), shots=4, seed=0))
    with pytest.raises(ConfigError, match="fewer than setting.shots=16"):
        sample_shots(labels, np.array([0]), shots=16, seed=0)


@pytest.mark.slow
def test_pacs_domain_skew_clients_per_domain():
    config = tiny("pacs", archive("pacs.tar.gz"), setting={"kind": "domain_skew", "clients_per_domain": 2})
    splits = build_splits(config)
    assert list(splits.groups) == ["art_painting", "cartoon", "photo", "sketch"]
    assert all(len(ids) == 2 for ids in splits.groups.values())
    train_files = {str(splits.train.sources[i]) for rows in splits.client_train for i in rows}
    test_files = {str(splits.test.sources[i]) for rows in splits.client_test for i in rows}
    assert train_files.isdisjoint(test_files)
    for domain, ids in splits.groups.items():
        for client in ids:
            assert all(f"/{domain}/" in str(splits.train.sources[i]) for i in splits.client_train[client])
            assert all(f"/{domain}/" in str(splits.test.sources[i]) for i in splits.client_test[client])


@pytest.mark.slow
def test_pacs_leave_one_domain_out_never_trains_on_target():
    config = tiny(
        "pacs", archive("pacs.tar.gz"), setting={"kind": "leave_one_domain_out", "held_out_domain": "photo"}
    )
    splits = build_splits(config)
    assert "photo" not in splits.groups and list(splits.heldout) == ["photo"]
    trained = [str(splits.train.sources[i]) for rows in splits.client_train for i in rows]
    assert trained and not any("/photo/" in path for path in trained)
    target = [str(splits.test.sources[i]) for i in splits.heldout["photo"]]
    assert target and all("/photo/" in path for path in target)


@pytest.mark.slow
def test_caltech_base_to_new_split_and_new_class_names():
    config = tiny(
        "caltech101",
        archive("caltech-101.tar.gz"),
        setting={"kind": "base_to_new", "shots": 4},
        partition={"num_clients": 10},
    )
    experiment = build_experiment(config)
    splits = experiment.splits
    assert len(splits.classnames) == 50 and len(splits.new_classnames) == 50
    assert set(splits.classnames).isdisjoint(splits.new_classnames)
    dealt = np.concatenate(splits.client_classes)
    assert sorted(dealt.tolist()) == list(range(50))  # every base class to exactly one client
    for classes, rows in zip(splits.client_classes, splits.client_train):
        counts = np.bincount(splits.train.labels[rows], minlength=50)
        assert counts[classes].tolist() == [4] * len(classes)
        assert counts.sum() == 4 * len(classes)
    # The new classes are scored against their own names, not the base names.
    assert experiment.new_model.classnames == splits.new_classnames
    assert experiment.model.classnames == splits.classnames
    assert int(experiment.new_eval_dataset.labels.max()) < 50


@pytest.mark.slow
def test_reproduce_domain_skew_and_base_to_new_end_to_end(tmp_path, capsys):
    quick = [
        "--set", "model.name=tiny", "--set", "model.random_init=true",
        "--set", "data.max_train_per_class=6", "--set", "data.max_test_per_class=3",
        "--set", "partition.min_samples=2", "--set", "setting.shots=2",
        "--set", "federated.rounds=1", "--quiet",
    ]
    code = main(
        ["reproduce", "domain_skew", "--datasets", "pacs", "--data-root", f"pacs={archive('pacs.tar.gz')}",
         "--output", str(tmp_path / "ds"), *quick]
    )
    assert code == 0
    table = (tmp_path / "ds" / "table.md").read_text()
    for domain in ("art_painting", "cartoon", "photo", "sketch", "all (client mean)"):
        assert table.count(f"| {domain} |") == 2, domain  # one row per method
    assert "pipeline check" in table

    code = main(
        ["reproduce", "base_to_new", "--datasets", "caltech101",
         "--data-root", f"caltech101={archive('caltech-101.tar.gz')}", "--output", str(tmp_path / "b2n"), *quick]
    )
    assert code == 0
    rows = (tmp_path / "b2n" / "table.csv").read_text().splitlines()
    assert rows[0] == "dataset,method,base Acc,new Acc,HM,base ECE,new ECE,local Acc,local ECE"
    assert len(rows) == 3
    record = json.loads((tmp_path / "b2n" / "caltech101" / "fl2ora" / "metrics.jsonl").read_text().splitlines()[-1])
    part = record["base_to_new"]
    base, new = part["base"]["accuracy"], part["new"]["accuracy"]
    expected = 0.0 if base + new == 0 else 2 * base * new / (base + new)
    assert part["harmonic_mean_accuracy"] == pytest.approx(expected)


def test_reproduce_rejects_unknown_setting_and_dataset(capsys):
    assert main(["reproduce", "cross_silo"]) == 2
    assert "Unknown setting 'cross_silo'" in capsys.readouterr().err
    assert main(["reproduce", "domain_skew", "--datasets", "cifar10"]) == 2
    assert "not part of domain_skew" in capsys.readouterr().err


def test_reproduce_default_presets_from_other_directory(tmp_path, monkeypatch):
    import yaml

    from fl2ora.config import config_to_dict, load_config
    from fl2ora.reproduce import plan_runs

    monkeypatch.chdir(tmp_path)
    runs = plan_runs("in_distribution", None, Path("out"), datasets=["cifar10"])

    assert [(run.dataset, run.method) for run in runs] == [("cifar10", "fl2ora"), ("cifar10", "promptfl")]
    for run in runs:
        preset = REPO / "configs" / "paper" / f"cifar10_{run.method}.yaml"
        assert run.values == yaml.safe_load(preset.read_text())
        assert config_to_dict(config_from_dict(run.values)) == config_to_dict(load_config(preset))
        assert run.path == Path("out") / "cifar10" / run.method


def test_reproduce_relative_presets_from_working_directory(tmp_path, monkeypatch):
    import yaml

    from fl2ora.reproduce import plan_runs

    values = yaml.safe_load((REPO / "configs" / "paper" / "cifar10_fl2ora.yaml").read_text())
    values["name"] = "my-cifar10"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "cifar10_fl2ora.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)

    runs = plan_runs("in_distribution", Path("mine"), Path("out"), datasets=["cifar10"], methods=["fl2ora"])

    assert len(runs) == 1
    assert runs[0].values == values


def test_reproduce_missing_presets_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "in_distribution", "--presets", "configs/paper"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "fl2ora: error: Presets folder 'configs/paper' does not exist (a relative --presets is read from the "
        f"working directory {str(tmp_path)!r}). Give the folder that contains <dataset>_<method>.yaml files, "
        f"such as {str(REPO / 'configs' / 'paper')!r}."
    )
    assert not (tmp_path / "runs").exists()


def test_reproduce_cli_default_presets_and_ctrl_c(tmp_path, monkeypatch, capsys):
    import yaml

    import fl2ora.runner

    started = []

    def interrupted(config, output, overwrite=False, interrupt=None):
        started.append((config.name, Path(output)))
        raise KeyboardInterrupt

    monkeypatch.setattr(fl2ora.runner, "run_experiment", interrupted)
    monkeypatch.chdir(tmp_path)

    code = main(["reproduce", "in_distribution", "--datasets", "cifar10", "--output", "out", "--quiet"])

    assert code == 130
    preset = yaml.safe_load((REPO / "configs" / "paper" / "cifar10_fl2ora.yaml").read_text())
    assert started == [(preset["name"], Path("out") / "cifar10" / "fl2ora")]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fl2ora: interrupted. The finished runs in out are kept, and the same command "
        "run again skips them and runs the others."
    )


@pytest.mark.slow
def test_pacs_leave_one_domain_out_end_to_end(tmp_path):
    from fl2ora.rundir import RunDirectory, read_metrics
    from fl2ora.runtime.simulation import run_simulation

    config = tiny(
        "pacs", archive("pacs.tar.gz"), setting={"kind": "leave_one_domain_out", "held_out_domain": "cartoon"}
    )
    summary = run_simulation(build_experiment(config), RunDirectory(tmp_path / "run"))
    record = read_metrics(tmp_path / "run")[-1]
    assert list(record["heldout"]) == ["cartoon"]
    assert sorted(record["groups"]) == ["art_painting", "photo", "sketch"]
    assert 0.0 <= record["heldout"]["cartoon"]["accuracy"] <= 1.0
    assert summary["num_clients"] == 6
