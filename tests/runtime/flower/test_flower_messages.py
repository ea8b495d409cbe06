"""Flower messages: tensor conversion, reply validation, run settings and the app project."""

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from fl2ora.runtime.flower.client_app import node_partition  # noqa: E402
from fl2ora.runtime.flower.messages import (  # noqa: E402
    InvalidReplyError,
    array_record_to_state,
    parse_query_reply,
    parse_train_reply,
    state_to_array_record,
)
from fl2ora.runtime.flower.project import APP_PYPROJECT  # noqa: E402
from fl2ora.runtime.flower.server_app import FlowerRunSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SHAPES = {"a.lora_A": (2, 3), "a.lora_B": (3, 2), "bias": (4,)}


def good_state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def good_metrics(**overrides) -> dict:
    metrics = {"num-examples": 20, "num-steps": 3, "train-loss": 1.25, "partition-id": 1, "finite": 1}
    metrics.update(overrides)
    return {k: v for k, v in metrics.items() if v is not None}


def reply(state=None, metrics=None, extra=None) -> RecordDict:
    records = {
        "arrays": state_to_array_record(good_state() if state is None else state),
        "metrics": MetricRecord(good_metrics() if metrics is None else metrics),
    }
    records.update(extra or {})
    return RecordDict(records)


def test_state_round_trip_is_exact():
    state = good_state()
    record = state_to_array_record(state)
    assert list(record.keys()) == list(SHAPES)
    back = array_record_to_state(record)
    for name in SHAPES:
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name], state[name])


def test_valid_reply_parses_to_update():
    state = good_state()
    update = parse_train_reply(reply(state), SHAPES, partition_id=1)
    assert list(update.state) == list(SHAPES)
    for name in SHAPES:
        assert torch.equal(update.state[name], state[name])
    assert (update.client_id, update.num_examples, update.num_steps) == (1, 20, 3)
    assert update.train_loss == 1.25
    assert update.finite


def _with(name, value):
    state = good_state()
    state[name] = value
    return state


def _wrong_dtype_record():
    record = state_to_array_record(good_state())
    record["bias"] = Array(np.zeros(4, dtype=np.float64))
    return record


def _undecodable_record():
    record = state_to_array_record(good_state())
    record["bias"] = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"not an npy file")
    return record


def _lying_shape_record():
    # Declares (4,) but contains a (2, 2) array.
    record = state_to_array_record(good_state())
    real = Array(np.zeros((2, 2), dtype=np.float32))
    record["bias"] = Array(dtype="float32", shape=(4,), stype=real.stype, data=real.data)
    return record


MALFORMED = [
    # (case id, reply content, expected words in the reason)
    ("nan", lambda: reply(_with("bias", torch.tensor([0.0, math.nan, 1.0, 2.0]))), "NaN or infinite"),
    ("inf", lambda: reply(_with("a.lora_A", torch.full((2, 3), math.inf))), "NaN or infinite"),
    ("wrong shape", lambda: reply(_with("a.lora_B", torch.zeros(2, 3))), "has shape (2, 3), expected (3, 2)"),
    ("missing tensor", lambda: reply({k: v for k, v in good_state().items() if k != "bias"}), "missing tensors ['bias']"),
    ("extra tensor", lambda: reply({**good_state(), "frozen.weight": torch.zeros(1)}), "unexpected tensors ['frozen.weight']"),
    ("zero examples", lambda: reply(metrics=good_metrics(**{"num-examples": 0})), "num-examples must be positive"),
    ("negative examples", lambda: reply(metrics=good_metrics(**{"num-examples": -5})), "num-examples must be positive"),
    ("float examples", lambda: reply(metrics=good_metrics(**{"num-examples": 20.0})), "'num-examples' must be an int"),
    ("missing examples", lambda: reply(metrics=good_metrics(**{"num-examples": None})), "no 'num-examples'"),
    ("zero steps", lambda: reply(metrics=good_metrics(**{"num-steps": 0})), "num-steps must be >= 1"),
    ("nan loss", lambda: reply(metrics=good_metrics(**{"train-loss": math.nan})), "train-loss must be a finite"),
    ("non-finite training", lambda: reply(metrics=good_metrics(finite=0)), "became NaN or infinite"),
    ("other partition", lambda: reply(metrics=good_metrics(**{"partition-id": 2})), "reports partition 2"),
    ("no arrays", lambda: RecordDict({"metrics": MetricRecord(good_metrics())}), "no ArrayRecord 'arrays'"),
    ("no metrics", lambda: RecordDict({"arrays": state_to_array_record(good_state())}), "no MetricRecord 'metrics'"),
    ("extra record", lambda: reply(extra={"config": ConfigRecord({"x": 1})}), "unexpected records ['config']"),
    ("float64 tensor", lambda: RecordDict({"arrays": _wrong_dtype_record(), "metrics": MetricRecord(good_metrics())}),
     "dtype float64, expected float32"),
    ("undecodable", lambda: RecordDict({"arrays": _undecodable_record(), "metrics": MetricRecord(good_metrics())}),
     "cannot be decoded"),
    ("declared shape lies", lambda: RecordDict({"arrays": _lying_shape_record(), "metrics": MetricRecord(good_metrics())}),
     "decodes to shape (2, 2)"),
]


@pytest.mark.parametrize("make_content, reason", [(m, r) for _, m, r in MALFORMED], ids=[c for c, _, _ in MALFORMED])
def test_malformed_reply_rejected(make_content, reason):
    with pytest.raises(InvalidReplyError) as raised:
        parse_train_reply(make_content(), SHAPES, partition_id=1)
    assert reason in str(raised.value)


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"partition-id": 0}, "no 'num-partitions'"),
        ({"partition-id": 0, "num-partitions": 4}, "num-partitions=4"),
        ({"partition-id": 3, "num-partitions": 3}, "outside [0, 3)"),
        ({"partition-id": -1, "num-partitions": 3}, "outside [0, 3)"),
    ],
)
def test_invalid_query_reply(metrics, reason):
    with pytest.raises(InvalidReplyError, match=reason.replace("[", r"\[").replace(")", r"\)")):
        parse_query_reply(RecordDict({"metrics": MetricRecord(metrics)}), num_partitions=3)


def test_query_reply_gives_partition():
    content = RecordDict({"metrics": MetricRecord({"partition-id": 2, "num-partitions": 3})})
    assert parse_query_reply(content, num_partitions=3) == 2


@pytest.mark.parametrize(
    "node_config, reason",
    [
        ({}, "node_config\\['partition-id'\\] must be an int"),
        ({"partition-id": 0}, "node_config\\['num-partitions'\\] must be an int"),
        ({"partition-id": "0", "num-partitions": 3}, "must be an int, got '0'"),
        ({"partition-id": 3, "num-partitions": 3}, "must be in \\[0, 3\\)"),
        ({"partition-id": True, "num-partitions": 3}, "must be an int, got True"),
    ],
)
def test_invalid_node_config(node_config, reason):
    with pytest.raises(ValueError, match=reason):
        node_partition(node_config)


@pytest.mark.parametrize(
    "run_config, reason",
    [
        ({"rounds": 3}, "Unknown run config key 'rounds'"),
        ({"min-replies": 0}, "min-replies must be >= 1"),
        ({"min-replies": 1.5}, "'min-replies' must be int"),
        ({"round-timeout": 0.0}, "round-timeout must be > 0"),
        ({"node-wait-timeout": -1.0}, "node-wait-timeout must be >= 0"),
        ({"overwrite": 1}, "'overwrite' must be bool"),
        ({"output": 3}, "'output' must be str"),
    ],
)
def test_invalid_run_settings(run_config, reason):
    with pytest.raises(ValueError, match=reason):
        FlowerRunSettings.from_run_config(run_config)


def test_run_settings_round_trip():
    settings = FlowerRunSettings(config="/x.yaml", output="/runs/a", overwrite=True, min_replies=2,
                                 round_timeout=30.0, node_wait_timeout=5.0)
    assert FlowerRunSettings.from_run_config(settings.to_run_config()) == settings
    # TOML integers are accepted where seconds are expected.
    assert FlowerRunSettings.from_run_config({"round-timeout": 30}).round_timeout == 30.0


def test_app_project_matches_settings_and_repository_copy():
    project = tomllib.loads(APP_PYPROJECT)
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fl2ora.runtime.flower.server_app:app",
        "clientapp": "fl2ora.runtime.flower.client_app:app",
    }
    assert app["config"] == FlowerRunSettings().to_run_config()
    assert (REPO / "flower_app" / "pyproject.toml").read_text() == APP_PYPROJECT
