"""The in-process simulation: FedAvg semantics, reproducibility and the run directory."""

import json

import numpy as np
import pytest
import torch

from fl2ora.config import config_from_dict
from fl2ora.experiment import build_experiment
from fl2ora.federated.aggregation import fedavg
from fl2ora.federated.client import client_update
from fl2ora.federated.sampling import client_seed
from fl2ora.evaluation.evaluate import predict_probabilities
from fl2ora.model.trainable import load_adapter, load_trainable_state_dict, trainable_state_dict
from fl2ora.rundir import RunDirectory, read_metrics
from fl2ora.runtime.simulation import run_simulation


def tiny_config(root, **sections):
    values = {
        "name": "unit",
        "seed": 3,
        "model": {"name": "tiny", "random_init": True},
        "data": {"dataset": "image_folder", "root": str(root), "augment": False},
        "partition": {"method": "dirichlet", "num_clients": 2, "beta": 1.0, "min_samples": 5},
        "federated": {"rounds": 1, "fraction": 1.0},
        "train": {"lr": 0.05, "batch_size": 8},
        "eval": {"every": 1},
    }
    for section, overrides in sections.items():
        values[section] = {**values.get(section, {}), **overrides}
    return config_from_dict(values)


def test_fedavg_round_loads_weighted_average_before_evaluation(tiny_image_folder, tmp_path):
    config = tiny_config(tiny_image_folder)
    experiment = build_experiment(config)
    initial = trainable_state_dict(experiment.model)

    # Expected: each client trained from the same initial state, averaged by training-set size.
    updates = [
        client_update(
            experiment.model, initial, experiment.client_train[k], config.train,
            client_id=k, seed=client_seed(config.seed, 1, k), device=experiment.device,
        )
        for k in range(2)
    ]
    sizes = [len(experiment.client_train[k]) for k in range(2)]
    assert sizes[0] != sizes[1]
    expected = fedavg([u.state for u in updates], sizes)
    # The two clients really moved apart, so "last client" and "average" differ.
    assert any(not torch.allclose(updates[0].state[k], updates[1].state[k]) for k in expected)

    load_trainable_state_dict(experiment.model, initial)
    run_simulation(experiment, RunDirectory(tmp_path / "run"))

    adapter = load_adapter(tmp_path / "run" / "adapter.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=1e-6, atol=1e-7)

    # The evaluated model is the average, not the last-trained client.
    load_trainable_state_dict(experiment.model, expected)
    probs = predict_probabilities(experiment.model, experiment.eval_dataset, 64, experiment.device)
    saved = np.load(tmp_path / "run" / "predictions.npz")
    np.testing.assert_allclose(saved["probs"], probs, rtol=1e-5, atol=1e-6)
    load_trainable_state_dict(experiment.model, updates[1].state)
    last_client = predict_probabilities(experiment.model, experiment.eval_dataset, 64, experiment.device)
    assert not np.allclose(saved["probs"], last_client, rtol=1e-5, atol=1e-6)


def test_client_update_starts_fresh_each_time(tiny_image_folder):
    config = tiny_config(tiny_image_folder)
    experiment = build_experiment(config)
    initial = trainable_state_dict(experiment.model)
    kwargs = dict(client_id=0, seed=11, device=experiment.device)
    first = client_update(experiment.model, initial, experiment.client_train[0], config.train, **kwargs)
    # Another client trains in between; a shared optimizer or leftover weights would leak here.
    client_update(experiment.model, initial, experiment.client_train[1], config.train, client_id=1, seed=5, device=experiment.device)
    second = client_update(experiment.model, initial, experiment.client_train[0], config.train, **kwargs)
    for name in first.state:
        assert torch.equal(first.state[name], second.state[name]), name
    assert first.num_examples == len(experiment.client_train[0])
    assert first.num_steps == -(-first.num_examples // config.train.batch_size)


def test_run_directory_contents_and_metrics(tiny_image_folder, tmp_path):
    config = tiny_config(tiny_image_folder, federated={"rounds": 3, "fraction": 0.5}, eval={"every": 2, "last_rounds": 2})
    experiment = build_experiment(config)
    summary = run_simulation(experiment, RunDirectory(tmp_path / "run"))

    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2, 3]
    evaluated = [r for r in records if "mean" in r]
    assert [r["round"] for r in evaluated] == [2, 3]
    for record in records:
        assert len(record["clients_trained"]) == 1
    for record in evaluated:
        assert set(record["clients"]) == {"0", "1"}
        for name, value in record["mean"].items():
            per_client = [record["clients"][k][name] for k in ("0", "1")]
            assert value == pytest.approx(np.mean(per_client))
        for name in ("accuracy", "ece", "mce", "ace", "classwise_ece", "confidence", "macro_f1"):
            assert 0.0 <= record["mean"][name] <= 1.0
    last = [r["mean"]["ece"] for r in evaluated]
    assert summary["last_rounds"]["mean"]["ece"] == pytest.approx(np.mean(last))
    assert summary["last_rounds"]["std"]["ece"] == pytest.approx(np.std(last))
    assert summary["random_init"] is True
    assert "pipeline check" in summary["warning"]
    assert summary["trainable_parameters"] == sum(t.numel() for t in load_adapter(tmp_path / "run" / "adapter.safetensors").values())
    assert summary["bytes_per_round"][0]["up"] == 4 * summary["trainable_parameters"]

    predictions = np.load(tmp_path / "run" / "predictions.npz")
    assert predictions["probs"].shape == (len(experiment.eval_labels), 3)
    np.testing.assert_array_equal(predictions["label"], experiment.eval_labels)
    pooled_accuracy = float((predictions["probs"].argmax(1) == predictions["label"]).mean())
    assert summary["final"]["pooled"]["accuracy"] == pytest.approx(pooled_accuracy)
    assert (tmp_path / "run" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_results(tiny_image_folder, tmp_path):
    config = tiny_config(tiny_image_folder, federated={"rounds": 2})
    first = run_simulation(build_experiment(config), RunDirectory(tmp_path / "a"))
    second = run_simulation(build_experiment(config), RunDirectory(tmp_path / "b"))
    assert first["final"] == second["final"]
    assert first["last_rounds"] == second["last_rounds"]


def test_fedprox_with_zero_mu_equals_fedavg(tiny_image_folder, tmp_path):
    fedavg_run = run_simulation(build_experiment(tiny_config(tiny_image_folder)), RunDirectory(tmp_path / "avg"))
    prox_config = tiny_config(tiny_image_folder, federated={"aggregation": "fedprox", "mu": 0.0})
    prox_run = run_simulation(build_experiment(prox_config), RunDirectory(tmp_path / "prox"))
    avg, prox = load_adapter(tmp_path / "avg" / "adapter.safetensors"), load_adapter(tmp_path / "prox" / "adapter.safetensors")
    for name in avg:
        assert torch.equal(avg[name], prox[name]), name
    assert fedavg_run["final"] == prox_run["final"]


def test_temperature_scaling_holds_out_validation(tiny_image_folder, tmp_path):
    config = tiny_config(tiny_image_folder, temperature={"mode": "central", "validation_fraction": 0.25})
    experiment = build_experiment(config)
    trained = {str(path) for dataset in experiment.client_train for path in dataset.sources}
    held_out = {str(path) for path in experiment.val_dataset.sources}
    assert held_out and trained.isdisjoint(held_out)
    summary = run_simulation(experiment, RunDirectory(tmp_path / "run"))
    scaling = summary["temperature_scaling"]
    assert scaling["temperature"] > 0
    assert scaling["after"]["mean"]["accuracy"] == pytest.approx(scaling["before"]["mean"]["accuracy"])
    assert scaling["before"]["mean"] == summary["final"]["mean"]
