"""The Flower runtime and the in-process simulation produce the same run for the same configuration.

Tolerance: none. Tensors cross the wire as fp32 bytes and the server aggregates the
updates in partition order, as the simulation does, so the final adapter, the
predictions and every metric are compared for exact equality.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from fl2ora.config import config_from_dict  # noqa: E402
from fl2ora.experiment import build_experiment  # noqa: E402
from fl2ora.model.trainable import load_adapter  # noqa: E402
from fl2ora.rundir import RunDirectory, read_metrics  # noqa: E402
from fl2ora.runtime.flower import client_app  # noqa: E402
from fl2ora.runtime.flower.inprocess import InProcessGrid  # noqa: E402
from fl2ora.runtime.flower.server_app import FlowerRunSettings, run_federation  # noqa: E402
from fl2ora.runtime.simulation import run_simulation  # noqa: E402

EVAL_KEYS = ("clients", "mean", "pooled")


def config_for(root, aggregation):
    return config_from_dict(
        {
            "name": f"equivalence-{aggregation}",
            "seed": 7,
            "model": {"name": "tiny", "random_init": True, "device": "cpu"},
            "data": {"dataset": "image_folder", "root": str(root), "augment": False, "max_train_per_class": 12,
                     "max_test_per_class": 8},
            # Dirichlet sizes differ, so FedAvg weights and FedNova step counts differ between clients.
            "partition": {"method": "dirichlet", "num_clients": 3, "beta": 1.0, "min_samples": 3},
            "federated": {"rounds": 3, "fraction": 0.67, "aggregation": aggregation, "mu": 0.05, "alpha": 0.05},
            "train": {"lr": 0.05, "batch_size": 4},
            "eval": {"every": 2},
        }
    )


@pytest.mark.parametrize("aggregation", ["fedavg", "fednova", "feddyn", "fedprox"])
def test_flower_equals_simulation(aggregation, tiny_image_folder, tmp_path):
    config = config_for(tiny_image_folder, aggregation)
    simulated = run_simulation(build_experiment(config), RunDirectory(tmp_path / "simulation"))
    grid = InProcessGrid(client_app.app, [{"partition-id": k, "num-partitions": 3} for k in range(3)], seed=13)
    federated = run_federation(
        grid, config, FlowerRunSettings(output=str(tmp_path / "flower"), node_wait_timeout=0.0)
    )

    if aggregation == "fednova":
        steps = {m.content["metrics"]["num-steps"] for m in grid.received if m.metadata.message_type == "train"}
        assert len(steps) > 1, "clients must take different step counts for FedNova to differ from FedAvg"

    # Final adapter: bit for bit.
    expected, actual = load_adapter(tmp_path / "simulation" / "adapter.safetensors"), load_adapter(
        tmp_path / "flower" / "adapter.safetensors"
    )
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name

    # Final and last-rounds metrics, and every evaluated round's scores.
    assert federated["final"] == simulated["final"]
    assert federated["last_rounds"] == simulated["last_rounds"]
    assert (federated["runtime"], simulated["runtime"]) == ("flower", "simulation")
    simulated_records, federated_records = read_metrics(tmp_path / "simulation"), read_metrics(tmp_path / "flower")
    assert [r["round"] for r in federated_records] == [r["round"] for r in simulated_records] == [1, 2, 3]
    for sim, fl in zip(simulated_records, federated_records):
        assert fl["clients_trained"] == sim["clients_trained"]
        assert fl["clients_dropped"] == sim["clients_dropped"] == []
        assert fl["train_loss"] == sim["train_loss"]
        for key in EVAL_KEYS:
            assert (key in fl) == (key in sim)
            if key in sim:
                assert json.dumps(fl[key], sort_keys=True) == json.dumps(sim[key], sort_keys=True)

    saved_sim, saved_fl = np.load(tmp_path / "simulation" / "predictions.npz"), np.load(
        tmp_path / "flower" / "predictions.npz"
    )
    for key in ("client_id", "sample_index", "label", "probs"):
        np.testing.assert_array_equal(saved_fl[key], saved_sim[key])
