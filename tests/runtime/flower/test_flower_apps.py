"""The fl2ora ClientApp and ServerApp called in process through a test Grid."""

import copy
import logging
import math

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402

from fl2ora.config import config_from_dict, config_to_dict  # noqa: E402
from fl2ora.experiment import build_experiment  # noqa: E402
from fl2ora.federated.client import client_update  # noqa: E402
from fl2ora.federated.rules import FedDynClientState, feddyn_penalty  # noqa: E402
from fl2ora.federated.sampling import client_seed, sample_clients  # noqa: E402
from fl2ora.model.trainable import load_adapter, trainable_state_dict  # noqa: E402
from fl2ora.rundir import read_metrics  # noqa: E402
from fl2ora.runtime.flower import client_app, server_app  # noqa: E402
from fl2ora.runtime.flower.inprocess import InProcessGrid  # noqa: E402
from fl2ora.runtime.flower.keys import FEDDYN_STATE_KEY  # noqa: E402
from fl2ora.runtime.flower.messages import (  # noqa: E402
    array_record_to_state,
    record_to_feddyn_state,
    state_to_array_record,
)
from fl2ora.runtime.flower.server_app import FlowerRunSettings  # noqa: E402


def tiny_config(root, **sections):
    values = {
        "name": "flower-unit",
        "seed": 3,
        "model": {"name": "tiny", "random_init": True, "device": "cpu"},
        # 12 training and 8 test images per class keep every client update to a few steps.
        "data": {"dataset": "image_folder", "root": str(root), "augment": False, "max_train_per_class": 12,
                 "max_test_per_class": 8},
        "partition": {"method": "dirichlet", "num_clients": 3, "beta": 1.0, "min_samples": 3},
        "federated": {"rounds": 1, "fraction": 1.0},
        "train": {"lr": 0.05, "batch_size": 8},
        "eval": {"every": 1},
    }
    for section, overrides in sections.items():
        values[section] = {**values.get(section, {}), **overrides}
    return config_from_dict(values)


def nodes(count):
    return [{"partition-id": k, "num-partitions": count} for k in range(count)]


def run_server(grid, config, tmp_path, **settings):
    """Call the real ServerApp object with a run config pointing at ``config`` saved as YAML."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(config)))
    run_settings = FlowerRunSettings(config=str(config_path), output=str(tmp_path / "run"), node_wait_timeout=0.0,
                                     **settings)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_settings.to_run_config())
    server_app.app(grid, context)
    return tmp_path / "run"


def train_messages(messages):
    return [m for m in messages if m.metadata.message_type == "train"]


def round_of(message):
    return int(message.metadata.group_id)


def test_replies_carry_trainable_tensors_and_counts(tiny_image_folder, tmp_path):
    config = tiny_config(tiny_image_folder, federated={"rounds": 2, "fraction": 0.67})
    reference = build_experiment(config)
    initial = trainable_state_dict(reference.model)
    grid = InProcessGrid(client_app.app, nodes(3), seed=11)
    run_dir = run_server(grid, config, tmp_path)

    # Every node was asked for its partition once; training went to the sampled partitions' nodes.
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert sorted(m.metadata.dst_node_id for m in queries) == sorted(grid.contexts)
    for round_index in (1, 2):
        sampled = sample_clients(3, 0.67, round_index, config.seed)
        sent = [m for m in train_messages(grid.sent) if round_of(m) == round_index]
        assert sorted(m.metadata.dst_node_id for m in sent) == sorted(grid.node_id_of(p) for p in sampled)

    # The first instruction carries exactly the initial trainable state.
    first = train_messages(grid.sent)[0]
    sent_state = array_record_to_state(first.content["arrays"])
    assert list(sent_state) == list(initial)
    for name in initial:
        assert torch.equal(sent_state[name], initial[name])

    replies = train_messages(grid.received)
    assert len(replies) == 4
    for reply in replies:
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        arrays, metrics = reply.content["arrays"], reply.content["metrics"]
        assert list(arrays.keys()) == list(initial)
        for name, tensor in initial.items():
            assert tuple(arrays[name].shape) == tuple(tensor.shape)
            assert arrays[name].dtype == "float32"
        partition = metrics["partition-id"]
        size = len(reference.client_train[partition])
        assert metrics["num-examples"] == size
        assert metrics["num-steps"] == math.ceil(size / config.train.batch_size)
        assert metrics["finite"] == 1
        assert reply.metadata.src_node_id == grid.node_id_of(partition)

    summary = yaml.safe_load((run_dir / "summary.json").read_text())
    assert summary["runtime"] == "flower"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        # Traffic: the instruction payload once per sampled node, and every reply's records.
        assert record["bytes"]["down"] == len(record["clients_trained"]) * sum(
            r.count_bytes() for r in first.content.values()
        )
        received = [m for m in replies if round_of(m) == record["round"]]
        assert record["bytes"]["up"] == sum(r.count_bytes() for m in received for r in m.content.values())


def test_feddyn_state_persists_across_rounds(tiny_image_folder, tmp_path):
    alpha = 0.1
    config = tiny_config(
        tiny_image_folder,
        partition={"num_clients": 2},
        federated={"rounds": 2, "aggregation": "feddyn", "alpha": alpha},
    )
    grid = InProcessGrid(client_app.app, nodes(2), seed=4)
    run_server(grid, config, tmp_path)

    sent = {round_of(m): array_record_to_state(m.content["arrays"]) for m in train_messages(grid.sent)}
    trained = {
        (round_of(m), m.content["metrics"]["partition-id"]): array_record_to_state(m.content["arrays"])
        for m in train_messages(grid.received)
    }
    assert sorted(trained) == [(1, 0), (1, 1), (2, 0), (2, 1)]

    reference = build_experiment(config)
    for partition in (0, 1):
        # g^1 = -alpha (theta_k^1 - theta^0); g^2 = g^1 - alpha (theta_k^2 - theta^1), in float64.
        g1 = {n: -alpha * (trained[1, partition][n].double() - sent[1][n].double()) for n in sent[1]}
        g2 = {n: g1[n] - alpha * (trained[2, partition][n].double() - sent[2][n].double()) for n in sent[1]}
        stored = record_to_feddyn_state(grid.contexts[grid.node_id_of(partition)].state[FEDDYN_STATE_KEY]).gradient
        for name in g2:
            torch.testing.assert_close(stored[name].double(), g2[name], rtol=0, atol=1e-7)

        # Round 2 trained with g^1 in its penalty: repeating that update by hand gives the reply exactly.
        g1_state = FedDynClientState(gradient={n: v.float() for n, v in g1.items()})
        redo = client_update(
            reference.model, sent[2], reference.client_train[partition], config.train, client_id=partition,
            seed=client_seed(config.seed, 2, partition), device=reference.device,
            penalty=lambda params: feddyn_penalty(params, sent[2], g1_state, alpha),
        )
        for name in redo.state:
            assert torch.equal(redo.state[name], trained[2, partition][name]), name


def fedavg_numpy(states, weights):
    total = float(sum(weights))
    return {name: sum(np.float64(w) * s[name].double().numpy() for s, w in zip(states, weights)) / total
            for name in states[0]}


def test_nan_reply_rejected_in_full_run(tiny_image_folder, tmp_path, caplog):
    config = tiny_config(tiny_image_folder)

    def poison_partition_1(instruction, reply, context):
        if reply.metadata.message_type != "train" or context.node_config["partition-id"] != 1:
            return reply
        content = copy.deepcopy(reply.content)
        state = array_record_to_state(content["arrays"])
        first = next(iter(state))
        state[first] = state[first].clone()
        state[first].view(-1)[0] = math.nan
        content["arrays"] = state_to_array_record(state)
        return Message(content, reply_to=instruction)

    grid = InProcessGrid(client_app.app, nodes(3), reply_hook=poison_partition_1, seed=2)
    with caplog.at_level(logging.WARNING, logger="fl2ora"):
        run_dir = run_server(grid, config, tmp_path)

    record = read_metrics(run_dir)[0]
    assert record["clients_failed"] == [1]
    assert record["clients_dropped"] == [1]
    assert record["global_model_updated"] is True
    assert "rejected the reply of partition 1" in caplog.text
    assert "NaN or infinite" in caplog.text

    # The new global model is the FedAvg of partitions 0 and 2 only.
    good = [m for m in train_messages(grid.received) if m.content["metrics"]["partition-id"] != 1]
    expected = fedavg_numpy(
        [array_record_to_state(m.content["arrays"]) for m in good], [m.content["metrics"]["num-examples"] for m in good]
    )
    adapter = load_adapter(run_dir / "adapter.safetensors")
    for name, value in expected.items():
        np.testing.assert_allclose(adapter[name].numpy(), value, rtol=1e-6, atol=1e-7)


def test_missing_reply_logged_and_min_replies_keeps_model(tiny_image_folder, tmp_path, caplog):
    config = tiny_config(tiny_image_folder)
    initial = trainable_state_dict(build_experiment(config).model)

    def drop_partition_2(instruction, reply, context):
        is_lost = reply.metadata.message_type == "train" and context.node_config["partition-id"] == 2
        return None if is_lost else reply

    grid = InProcessGrid(client_app.app, nodes(3), reply_hook=drop_partition_2, seed=8)
    with caplog.at_level(logging.WARNING, logger="fl2ora"):
        run_dir = run_server(grid, config, tmp_path, min_replies=3)

    record = read_metrics(run_dir)[0]
    assert record["clients_missing"] == [2]
    assert record["global_model_updated"] is False
    node = grid.node_id_of(2)
    assert f"partition 2 (node {node}) sent no reply" in caplog.text
    assert "2 valid replies, fewer than min-replies=3; the global model is unchanged" in caplog.text
    adapter = load_adapter(run_dir / "adapter.safetensors")
    for name, tensor in initial.items():
        assert torch.equal(adapter[name], tensor), name


def test_client_error_reply_counts_as_failed(tiny_image_folder, tmp_path, caplog):
    # Node 0's data-root does not exist: its ClientApp raises, and the grid replies with an error, as a SuperNode does.
    config = tiny_config(tiny_image_folder, federated={"rounds": 1})
    grid = InProcessGrid(client_app.app, nodes(3), seed=1)
    grid.contexts[grid.node_id_of(0)].node_config["data-root"] = str(tiny_image_folder / "missing")
    with caplog.at_level(logging.WARNING, logger="fl2ora"):
        run_dir = run_server(grid, config, tmp_path)
    record = read_metrics(run_dir)[0]
    assert record["clients_failed"] == [0]
    assert record["clients_dropped"] == [0]
    assert "partition 0 (node" in caplog.text
    assert "failed" in caplog.text
