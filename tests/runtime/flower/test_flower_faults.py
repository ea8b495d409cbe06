"""Strategy-level faults: malformed, failed and missing replies never reach the average."""

import logging
import math
import typing

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from fl2ora.config import FederatedConfig, config_from_dict  # noqa: E402
from fl2ora.federated.algorithm import FederatedAlgorithm  # noqa: E402
from fl2ora.runtime.flower import client_app  # noqa: E402
from fl2ora.runtime.flower.inprocess import InProcessGrid  # noqa: E402
from fl2ora.runtime.flower.messages import array_record_to_state, state_to_array_record  # noqa: E402
from fl2ora.runtime.flower.nodes import PartitionDirectory  # noqa: E402
from fl2ora.runtime.flower.strategies import STRATEGIES, Fl2oraFedProx, make_strategy  # noqa: E402

SHAPES = {"w": (2, 3), "b": (3,)}
EXAMPLES = {0: 10, 1: 30, 2: 20}


def global_state():
    return {"w": torch.zeros(2, 3), "b": torch.ones(3)}


def client_state(partition):
    generator = torch.Generator().manual_seed(100 + partition)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def good_content(partition):
    metrics = {"num-examples": EXAMPLES[partition], "num-steps": 2, "train-loss": 0.5 + partition,
               "partition-id": partition, "finite": 1}
    return RecordDict({"arrays": state_to_array_record(client_state(partition)), "metrics": MetricRecord(metrics)})


def corrupt(kind, partition):
    """Return partition's reply content with one defect."""
    state = client_state(partition)
    metrics = {"num-examples": EXAMPLES[partition], "num-steps": 2, "train-loss": 1.0,
               "partition-id": partition, "finite": 1}
    if kind == "nan":
        state["w"][0, 0] = math.nan
    elif kind == "inf":
        state["b"][1] = -math.inf
    elif kind == "wrong shape":
        state["w"] = torch.zeros(3, 2)
    elif kind == "missing key":
        del state["b"]
    elif kind == "extra key":
        state["frozen"] = torch.zeros(1)
    elif kind == "zero examples":
        metrics["num-examples"] = 0
    elif kind == "negative examples":
        metrics["num-examples"] = -3
    else:
        raise AssertionError(kind)
    return RecordDict({"arrays": state_to_array_record(state), "metrics": MetricRecord(metrics)})


def stub_app(make_content):
    """Return a ClientApp with fl2ora's query handler whose training reply is ``make_content(partition)``."""
    app = ClientApp()
    app.query()(client_app.query)

    @app.train()
    def train(message, context):
        content = make_content(context.node_config["partition-id"])
        if content is None:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="simulated ClientApp failure"), reply_to=message)
        return Message(content, reply_to=message)

    return app


def run_one_round(make_content, aggregation="fedavg", min_replies=1):
    config = config_from_dict({"seed": 5, "partition": {"num_clients": 3},
                               "federated": {"fraction": 1.0, "aggregation": aggregation}})
    algorithm = FederatedAlgorithm(aggregation, num_clients=3, momentum=0.9, mu=0.01)
    grid = InProcessGrid(stub_app(make_content), [{"partition-id": k, "num-partitions": 3} for k in range(3)], seed=3)
    directory = PartitionDirectory(3, query_timeout=5.0)
    strategy = make_strategy(config, algorithm, global_state(), directory, min_replies=min_replies)
    directory.wait_until_complete(grid, timeout=0.0)
    messages = strategy.configure_train(1, state_to_array_record(global_state()), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays, metrics


def fedavg_numpy(partitions):
    total = sum(EXAMPLES[p] for p in partitions)
    return {name: sum(EXAMPLES[p] * client_state(p)[name].double().numpy() for p in partitions) / total
            for name in SHAPES}


KINDS = ["nan", "inf", "wrong shape", "missing key", "extra key", "zero examples", "negative examples"]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_reply_never_averaged(kind, caplog):
    with caplog.at_level(logging.WARNING, logger="fl2ora"):
        strategy, arrays, _ = run_one_round(lambda p: corrupt(kind, p) if p == 1 else good_content(p))

    # The new global model is the weighted average of partitions 0 and 2 only.
    expected = fedavg_numpy([0, 2])
    assert arrays is not None
    for name, value in expected.items():
        np.testing.assert_allclose(strategy.global_state[name].numpy(), value, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(array_record_to_state(arrays)[name].numpy(), strategy.global_state[name].numpy())
    record = strategy.round_records[1]
    assert record["clients_failed"] == [1]
    assert record["clients_dropped"] == [1]
    assert record["clients_missing"] == []
    assert "rejected the reply of partition 1" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_too_few_valid_replies_keep_model(kind, caplog):
    with caplog.at_level(logging.WARNING, logger="fl2ora"):
        strategy, arrays, metrics = run_one_round(lambda p: corrupt(kind, p) if p != 0 else good_content(p), min_replies=2)
    assert arrays is None
    for name, tensor in global_state().items():
        assert torch.equal(strategy.global_state[name], tensor)
    assert metrics["valid-replies"] == 1
    assert strategy.round_records[1]["global_model_updated"] is False
    assert "1 valid replies, fewer than min-replies=2; the global model is unchanged" in caplog.text


def test_error_reply_logged_by_partition(caplog):
    with caplog.at_level(logging.WARNING, logger="fl2ora"):
        strategy, _, _ = run_one_round(lambda p: None if p == 2 else good_content(p))
    assert strategy.round_records[1]["clients_failed"] == [2]
    assert "partition 2 (node" in caplog.text
    assert "simulated ClientApp failure" in caplog.text
    for name, value in fedavg_numpy([0, 1]).items():
        np.testing.assert_allclose(strategy.global_state[name].numpy(), value, rtol=1e-6, atol=1e-7)


def test_fednova_uses_reported_steps():
    def content(partition):
        steps = {0: 1, 1: 4, 2: 2}[partition]
        metrics = {"num-examples": EXAMPLES[partition], "num-steps": steps, "train-loss": 1.0,
                   "partition-id": partition, "finite": 1}
        return RecordDict({"arrays": state_to_array_record(client_state(partition)), "metrics": MetricRecord(metrics)})

    strategy, _, _ = run_one_round(content, aggregation="fednova")
    # Hand formula with rho = 0.9: ||a||_1 = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho).
    rho = 0.9
    norms = {p: (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho) for p, tau in {0: 1, 1: 4, 2: 2}.items()}
    shares = {p: EXAMPLES[p] / sum(EXAMPLES.values()) for p in EXAMPLES}
    tau_eff = sum(shares[p] * norms[p] for p in EXAMPLES)
    start = global_state()
    for name in SHAPES:
        direction = sum(shares[p] * (start[name].double() - client_state(p)[name].double()) / norms[p] for p in EXAMPLES)
        expected = start[name].double() - tau_eff * direction
        np.testing.assert_allclose(strategy.global_state[name].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_fedprox_instruction_carries_mu():
    config = config_from_dict({"partition": {"num_clients": 3}, "federated": {"aggregation": "fedprox", "mu": 0.25,
                                                                            "fraction": 1.0}})
    algorithm = FederatedAlgorithm("fedprox", num_clients=3, momentum=0.9, mu=0.25)
    grid = InProcessGrid(stub_app(good_content), [{"partition-id": k, "num-partitions": 3} for k in range(3)])
    directory = PartitionDirectory(3, query_timeout=5.0)
    strategy = make_strategy(config, algorithm, global_state(), directory)
    assert isinstance(strategy, Fl2oraFedProx)
    directory.wait_until_complete(grid, timeout=0.0)
    messages = list(strategy.configure_train(1, state_to_array_record(global_state()), ConfigRecord(), grid))
    assert len(messages) == 3
    assert messages[0].content["config"]["proximal-mu"] == 0.25
    assert messages[0].content["config"]["server-round"] == 1


@pytest.mark.parametrize(
    "aggregation, fraction, min_replies, error",
    [
        ("fedavg", 0.34, 2, "min-replies=2 exceeds the 1 clients sampled per round"),
        ("fedavg", 1.0, 0, "min_replies must be >= 1"),
        ("scaffold", 1.0, 1, "Unknown aggregation 'scaffold'"),
    ],
)
def test_invalid_strategy_settings(aggregation, fraction, min_replies, error):
    config = config_from_dict({"partition": {"num_clients": 3}, "federated": {"fraction": fraction}})
    algorithm = FederatedAlgorithm(aggregation, num_clients=3, momentum=0.9)
    with pytest.raises(ValueError, match=error):
        make_strategy(config, algorithm, global_state(), PartitionDirectory(3, 5.0), min_replies=min_replies)


def test_every_aggregation_has_a_strategy():
    choices = typing.get_args(typing.get_type_hints(FederatedConfig)["aggregation"])
    assert set(STRATEGIES) == set(choices) == {"fedavg", "fedprox", "feddyn", "fednova"}


def test_duplicate_partition_node_ignored(caplog):
    grid = InProcessGrid(stub_app(good_content), [{"partition-id": 0, "num-partitions": 2}] * 2
                         + [{"partition-id": 1, "num-partitions": 3}], seed=9)
    directory = PartitionDirectory(2, query_timeout=5.0)
    with caplog.at_level(logging.WARNING, logger="fl2ora"):
        directory.wait_until_complete(grid, timeout=0.0)
    # One node serves partition 0; the second claimant and the node with 3 partitions are ignored.
    assert directory.node_of(0) in grid.contexts
    assert directory.missing_partitions() == [1]
    assert "already serves" in caplog.text
    assert "num-partitions=3" in caplog.text
