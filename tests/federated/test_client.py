"""Local training edge cases: empty clients and non-finite losses."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from fl2ora.config import TrainConfig
from fl2ora.federated import client as client_module
from fl2ora.federated.client import client_update
from fl2ora.model.trainable import trainable_state_dict


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x)


def dataset(n=16):
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def test_empty_client_rejected():
    model = Linear()
    with pytest.raises(ValueError, match="Client 7 has no training samples"):
        client_update(model, trainable_state_dict(model), dataset(0), TrainConfig(), 7, 0, torch.device("cpu"))


def test_nan_loss_drops_update(monkeypatch, caplog):
    model = Linear()
    start = trainable_state_dict(model)
    calls = {"n": 0}
    real = client_module.training_loss

    def loss_turning_nan(logits, labels, config):
        calls["n"] += 1
        value = real(logits, labels, config)
        return value * math.nan if calls["n"] == 2 else value

    monkeypatch.setattr(client_module, "training_loss", loss_turning_nan)
    update = client_update(model, start, dataset(), TrainConfig(batch_size=4), 3, 0, torch.device("cpu"))
    assert update.finite is False
    assert update.num_steps == 1
    assert math.isnan(update.train_loss)
    assert "training loss became nan at step 2; its update is dropped" in caplog.text


def test_infinite_weights_drop_update(caplog):
    model = Linear()
    start = {name: tensor.clone() for name, tensor in trainable_state_dict(model).items()}
    start["layer.weight"][0, 0] = math.inf
    update = client_update(model, start, dataset(), TrainConfig(batch_size=4), 1, 0, torch.device("cpu"))
    assert update.finite is False


def test_round_with_only_dropped_updates_keeps_global(tiny_image_folder, monkeypatch, caplog):
    from fl2ora.config import config_from_dict
    from fl2ora.experiment import build_experiment
    from fl2ora.runtime.simulation import SimulationState, make_algorithm, run_round

    config = config_from_dict(
        {
            "model": {"name": "tiny", "random_init": True},
            "data": {"dataset": "image_folder", "root": str(tiny_image_folder), "augment": False},
            "partition": {"method": "iid", "num_clients": 2, "min_samples": 1},
            "federated": {"rounds": 1, "fraction": 1.0},
        }
    )
    experiment = build_experiment(config)
    algorithm = make_algorithm(experiment)
    state_before = trainable_state_dict(experiment.model)
    state = SimulationState(round=0, global_state=dict(state_before), server_state=None, client_states={})
    monkeypatch.setattr(client_module, "training_loss", lambda logits, labels, cfg: logits.sum() * math.inf)
    record = run_round(experiment, algorithm, state)
    assert record["clients_dropped"] == [0, 1]
    assert all(torch.equal(state.global_state[k], state_before[k]) for k in state_before)
    assert "no valid client update; the global model is unchanged" in caplog.text
