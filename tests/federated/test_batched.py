"""Batched client updates: each client's result equals its sequential ``client_update``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl2ora.config import ConfigError, PerfConfig, config_from_dict
from fl2ora.experiment import build_experiment
from fl2ora.federated.algorithm import FederatedAlgorithm
from fl2ora.federated.batched import ClientTask, batched_client_update, batched_group_size, train_client_group
from fl2ora.federated.client import client_update
from fl2ora.federated.rules import FedDynClientState
from fl2ora.federated.sampling import client_seed
from fl2ora.methods.segmented_lora import lora_layers
from fl2ora.model.trainable import load_adapter, trainable_state_dict
from fl2ora.perf.context_dropout import ContextDropout
from fl2ora.rundir import RunDirectory
from fl2ora.runtime.simulation import run_simulation

STATE_TOLERANCE = 1e-5
CLIENT_SIZES = (10, 7, 4)
"""Training images kept per client: unequal, so with batch 4 the clients take 3, 2 and 1 steps per epoch."""


def tiny_values(root, **sections):
    values = {
        "name": "batched",
        "seed": 3,
        "model": {"name": "tiny", "random_init": True},
        "data": {"dataset": "image_folder", "root": str(root), "augment": True},
        "partition": {"method": "dirichlet", "num_clients": 3, "beta": 1.0, "min_samples": 5},
        "federated": {"rounds": 2, "fraction": 1.0},
        "train": {"lr": 0.05, "batch_size": 4, "local_epochs": 2},
        "eval": {"every": 1},
    }
    for section, overrides in sections.items():
        values[section] = {**values.get(section, {}), **overrides}
    return values


def tiny_experiment(root, **sections):
    """Build the experiment and keep the first :data:`CLIENT_SIZES` training images of each client."""
    experiment = build_experiment(config_from_dict(tiny_values(root, **sections)))
    experiment.client_train = [
        dataset.subset(np.arange(size)) for dataset, size in zip(experiment.client_train, CLIENT_SIZES)
    ]
    cache = experiment.model.image_feature_cache
    if cache is not None and not experiment.config.data.augment:
        for dataset in experiment.client_train:
            cache.register(dataset)  # as build_experiment registers the full training sets
    return experiment


def tasks_for(experiment, clients, penalties=None):
    return [
        ClientTask(client_id=k, dataset=experiment.client_train[k], seed=client_seed(experiment.config.seed, 1, k),
                   penalty=None if penalties is None else penalties[k])
        for k in clients
    ]


def sequential_updates(experiment, global_state, tasks):
    config = experiment.config
    return [
        client_update(experiment.model, global_state, task.dataset, config.train, client_id=task.client_id,
                      seed=task.seed, device=experiment.device, precision=config.model.precision,
                      loss_config=config.loss, penalty=task.penalty)
        for task in tasks
    ]


def batched_updates(experiment, global_state, tasks):
    config = experiment.config
    return batched_client_update(experiment.model, global_state, tasks, config.train, experiment.device,
                                 config.model.precision, config.loss)


def assert_updates_equal(batched, sequential, global_state):
    assert [u.client_id for u in batched] == [u.client_id for u in sequential]
    for got, expected in zip(batched, sequential):
        assert got.num_examples == expected.num_examples
        assert got.num_steps == expected.num_steps
        assert got.finite == expected.finite
        if math.isnan(expected.train_loss):
            assert math.isnan(got.train_loss)
        else:
            assert got.train_loss == pytest.approx(expected.train_loss, rel=1e-6, abs=1e-6)
        assert got.state.keys() == expected.state.keys()
        for name, tensor in expected.state.items():
            assert got.state[name].dtype == torch.float32
            torch.testing.assert_close(got.state[name], tensor, rtol=0, atol=STATE_TOLERANCE, msg=name)
        # Training moved the tensors far beyond the tolerance, so equality is not vacuous.
        moved = max(float((expected.state[k] - global_state[k]).abs().max()) for k in global_state)
        assert moved > 100 * STATE_TOLERANCE or expected.num_steps == 0


@pytest.mark.parametrize("group", [2, 3])
def test_groups_match_sequential_updates(tiny_image_folder, group):
    experiment = tiny_experiment(tiny_image_folder)
    # LoRA dropout 0.25 on both encoders (full-context dropout on the trimmed text encoder).
    dropouts = [m for m in experiment.model.modules() if isinstance(m, (torch.nn.Dropout, ContextDropout))]
    assert {type(m) for m in dropouts} == {torch.nn.Dropout, ContextDropout}
    assert all(m.p == 0.25 for m in dropouts)
    global_state = trainable_state_dict(experiment.model)
    tasks = tasks_for(experiment, range(group))
    assert [len(task.dataset) for task in tasks] == list(CLIENT_SIZES[:group])  # run out at different steps

    sequential = sequential_updates(experiment, global_state, tasks)
    assert len({u.num_steps for u in sequential}) > 1
    batched = batched_updates(experiment, global_state, tasks)
    assert_updates_equal(batched, sequential, global_state)


def test_fedprox_matches_sequential(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    global_state = trainable_state_dict(experiment.model)
    # Start away from the anchor, so the proximal term and its gradient are not zero.
    start = {name: tensor + 0.05 for name, tensor in global_state.items()}
    algorithm = FederatedAlgorithm("fedprox", num_clients=3, momentum=0.9, mu=0.5)
    penalty = algorithm.client_penalty(global_state, None, experiment.device)
    tasks = tasks_for(experiment, range(3), penalties=[penalty] * 3)
    sequential = sequential_updates(experiment, start, tasks)
    without_penalty = sequential_updates(experiment, start, tasks_for(experiment, range(3)))
    name = next(iter(global_state))
    assert not torch.allclose(sequential[0].state[name], without_penalty[0].state[name], atol=1e-4)
    assert_updates_equal(batched_updates(experiment, start, tasks), sequential, start)


def test_feddyn_states_match_sequential(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    global_state = trainable_state_dict(experiment.model)
    algorithm = FederatedAlgorithm("feddyn", num_clients=3, momentum=0.9, alpha=0.1)
    generator = torch.Generator().manual_seed(4)
    penalties = [
        algorithm.client_penalty(global_state, FedDynClientState(
            gradient={k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in global_state.items()}
        ), experiment.device)
        for _ in range(3)
    ]
    tasks = tasks_for(experiment, range(3), penalties)
    assert_updates_equal(batched_updates(experiment, global_state, tasks),
                         sequential_updates(experiment, global_state, tasks), global_state)


def test_cached_features_match_sequential(tiny_image_folder):
    # Text-only LoRA without augmentation: the training images come from the image-feature cache.
    experiment = tiny_experiment(tiny_image_folder, data={"augment": False}, lora={"encoder": "text"})
    cache = experiment.model.image_feature_cache
    global_state = trainable_state_dict(experiment.model)
    tasks = tasks_for(experiment, range(3))
    sequential = sequential_updates(experiment, global_state, tasks)
    assert all(cache.lookup(experiment.model, t.dataset, experiment.device, training=True) is not None for t in tasks)
    assert_updates_equal(batched_updates(experiment, global_state, tasks), sequential, global_state)


def test_frozen_text_matches_sequential(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder, lora={"encoder": "vision"})
    global_state = trainable_state_dict(experiment.model)
    tasks = tasks_for(experiment, range(2))
    assert_updates_equal(batched_updates(experiment, global_state, tasks),
                         sequential_updates(experiment, global_state, tasks), global_state)


def nan_on_call(call: int):
    """Return a penalty that is 0 except on its ``call``-th use, where it is NaN."""
    calls = {"n": 0}

    def penalty(parameters):
        calls["n"] += 1
        zero = sum(p.sum() for p in parameters.values()) * 0.0
        return zero * math.nan if calls["n"] == call else zero

    return penalty


def test_nan_client_dropped_alone(tiny_image_folder, caplog):
    experiment = tiny_experiment(tiny_image_folder)
    global_state = trainable_state_dict(experiment.model)
    tasks = tasks_for(experiment, range(3), penalties=[None, nan_on_call(2), None])
    sequential = sequential_updates(experiment, global_state, tasks)
    tasks = tasks_for(experiment, range(3), penalties=[None, nan_on_call(2), None])  # fresh call counter
    batched = batched_updates(experiment, global_state, tasks)
    assert [u.finite for u in batched] == [True, False, True]
    assert batched[1].num_steps == 1
    assert "Client 1: training loss became nan at step 2; its update is dropped" in caplog.text
    assert_updates_equal(batched, sequential, global_state)


def test_model_state_after_update(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    model = experiment.model
    global_state = trainable_state_dict(model)
    layers = [(name, id(layer)) for name, layer in lora_layers(model)]
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    updates = batched_updates(experiment, global_state, tasks_for(experiment, range(2)))
    # The caller's random state is untouched, the peft layers are back, and the model has the
    # last client's tensors in eval mode, as after sequential updates.
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)
    assert [(name, id(layer)) for name, layer in lora_layers(model)] == layers
    assert not model.training
    for name, tensor in trainable_state_dict(model).items():
        assert torch.equal(tensor, updates[-1].state[name]), name


def test_group_of_one_uses_client_update(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    global_state = trainable_state_dict(experiment.model)
    tasks = tasks_for(experiment, [1])
    (got,) = train_client_group(experiment.model, global_state, tasks, experiment.config.train, experiment.device)
    (expected,) = sequential_updates(experiment, global_state, tasks)
    for name, tensor in expected.state.items():
        assert torch.equal(got.state[name], tensor), name


def test_empty_client_rejected(tiny_image_folder):
    experiment = tiny_experiment(tiny_image_folder)
    tasks = tasks_for(experiment, range(2))
    tasks[1].dataset = experiment.client_train[1].subset(np.arange(0))
    with pytest.raises(ValueError, match="Client 1 has no training samples"):
        batched_updates(experiment, trainable_state_dict(experiment.model), tasks)


def test_group_size_falls_back(tiny_image_folder, caplog):
    values = tiny_values(tiny_image_folder)
    values["method"] = "coop"
    experiment = build_experiment(config_from_dict(values))  # a prompt learner: no LoRA layer
    assert batched_group_size(experiment.model, 3) == 1
    assert batched_group_size(experiment.model, 3) == 1
    assert caplog.text.count("perf.batched_clients=3 does not apply") == 1  # warned once per model
    fl2ora = tiny_experiment(tiny_image_folder)
    assert batched_group_size(fl2ora.model, 3) == 3
    assert batched_group_size(fl2ora.model, 1) == 1
    with pytest.raises(ValueError, match="Cannot train clients in one batch: the classifier is a"):
        batched_client_update(experiment.model, trainable_state_dict(experiment.model),
                              tasks_for(experiment, range(2)), experiment.config.train, experiment.device)


@pytest.mark.parametrize("aggregation", ["fedavg", "feddyn", "fednova"])
def test_simulation_matches_sequential_run(tiny_image_folder, tmp_path, aggregation):
    summaries, adapters, probabilities = [], [], []
    for group in (1, 2):
        # Three clients per round: one group of two, then one client alone.
        experiment = tiny_experiment(tiny_image_folder, perf={"batched_clients": group},
                                     federated={"aggregation": aggregation}, train={"local_epochs": 1})
        folder = tmp_path / f"group-{group}"
        summaries.append(run_simulation(experiment, RunDirectory(folder)))
        adapters.append(load_adapter(folder / "adapter.safetensors"))
        with np.load(folder / "predictions.npz") as predictions:
            probabilities.append(predictions["probs"])
    sequential, batched = summaries
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=0, atol=STATE_TOLERANCE, msg=name)
    np.testing.assert_allclose(probabilities[1], probabilities[0], rtol=0, atol=1e-5)
    for metric, value in sequential["final"]["mean"].items():
        assert batched["final"]["mean"][metric] == pytest.approx(value, abs=1e-5), metric


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "perf.batched_clients must be >= 1, got 0"),
        (-2, "perf.batched_clients must be >= 1, got -2"),
        (1.5, "perf.batched_clients must be an integer, got 1.5"),
        (True, "perf.batched_clients must be an integer, got True"),
        ("2", "perf.batched_clients must be an integer, got '2'"),
    ],
)
def test_invalid_batched_clients_rejected(value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"perf": {"batched_clients": value}})
    with pytest.raises(ConfigError, match=message):
        PerfConfig(batched_clients=value)


def test_batched_clients_default_off():
    assert PerfConfig().batched_clients == 1
    assert config_from_dict({"perf": {"batched_clients": 4}}).perf.batched_clients == 4
