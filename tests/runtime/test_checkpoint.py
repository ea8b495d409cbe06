"""Checkpoints, exact resume after SIGKILL or Ctrl-C, safe loading, and deterministic adapter bytes."""

import errno
import json
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from fl2ora.config import ConfigError
from fl2ora.federated.rules import FedDynClientState, FedDynServerState
from fl2ora.model.trainable import load_adapter, save_adapter
from fl2ora.runner import resume_experiment
from fl2ora.runtime import checkpoint as checkpoint_module
from fl2ora.runtime.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_round,
    check_tensors_match,
    load_checkpoint,
    save_checkpoint,
)

START_OVER = "Start a new run, or point --resume at another run directory."


def write_config(folder, data_root, **sections):
    values = {
        "name": "crash",
        "seed": 5,
        "model": {"name": "tiny", "random_init": True},
        "data": {"dataset": "image_folder", "root": str(data_root), "augment": False},
        "partition": {"method": "dirichlet", "num_clients": 3, "beta": 1.0, "min_samples": 4},
        "federated": {"rounds": 3, "fraction": 0.67, "aggregation": "feddyn"},
        "train": {"lr": 0.05, "batch_size": 8},
    }
    for section, overrides in sections.items():
        values[section] = {**values.get(section, {}), **overrides}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def fl2ora(*args, env=None, **kwargs):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fl2ora", *args, "--quiet"], env=environment, capture_output=True, text=True, **kwargs)


def assert_same_outputs(run, reference):
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert (run / "adapter.safetensors").read_bytes() == (reference / "adapter.safetensors").read_bytes()
    adapter, expected = load_adapter(run / "adapter.safetensors"), load_adapter(reference / "adapter.safetensors")
    assert adapter.keys() == expected.keys()
    for name in expected:
        assert torch.equal(adapter[name], expected[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tiny_image_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, tiny_image_folder)
    result = fl2ora("run", str(config), "--output", str(folder / "run"))
    assert result.returncode == 0, result.stderr
    return config, folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["train:2", "aggregate:2", "checkpoint-write:2", "train:1", "checkpoint-write:3"])
def test_sigkill_then_resume_matches_uninterrupted(point, uninterrupted, tmp_path):
    config, reference = uninterrupted
    run = tmp_path / "run"
    killed = fl2ora("run", str(config), "--output", str(run), env={"FL2ORA_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    assert not (run / "checkpoint.safetensors.tmp").exists() or point.startswith("checkpoint-write")

    # Killed before the first checkpoint (train:1), the resumed run starts again from round 1.
    resumed = fl2ora("run", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outputs(run, reference)


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resumes(uninterrupted, tmp_path):
    config, reference = uninterrupted
    run = tmp_path / "run"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fl2ora", "run", str(config), "--output", str(run), "--quiet"],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert process.returncode == 130
    assert f"fl2ora run --resume {run}" in stderr
    assert load_checkpoint(run).round >= 1

    resumed = fl2ora("run", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outputs(run, reference)


def small_checkpoint(round_index=2):
    state = {"a.lora_A.weight": torch.randn(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
    return Checkpoint(
        round=round_index,
        global_state=state,
        server_state=FedDynServerState(h={k: torch.ones_like(v) for k, v in state.items()}),
        client_states={3: FedDynClientState(gradient={k: torch.full_like(v, 0.5) for k, v in state.items()})},
        history=[{"round": 1, "mean": {"accuracy": 0.5}}],
        bytes_per_round=[{"down": 10, "up": 20}],
        wall_time_seconds=1.5,
        config={"seed": 1},
    )


def test_checkpoint_round_trip(tmp_path):
    original = small_checkpoint()
    save_checkpoint(tmp_path, original)
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 2
    assert loaded.history == original.history
    assert loaded.bytes_per_round == original.bytes_per_round
    assert loaded.config == {"seed": 1}
    for name, tensor in original.global_state.items():
        assert torch.equal(loaded.global_state[name], tensor)
        assert torch.equal(loaded.server_state.h[name], original.server_state.h[name])
        assert torch.equal(loaded.client_states[3].gradient[name], original.client_states[3].gradient[name])


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, small_checkpoint(round_index=1))

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as stream:
            stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, small_checkpoint(round_index=2))
    assert not (tmp_path / "checkpoint.safetensors.tmp").exists()
    assert load_checkpoint(tmp_path).round == 1


class Payload:
    def __reduce__(self):
        return (os.system, ("touch executed-by-unpickling",))


def test_pickle_checkpoint_refused_without_executing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoint.safetensors").write_bytes(pickle.dumps({"state": Payload()}))
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "executed-by-unpickling").exists()


def test_missing_checkpoint_says_start_again(tmp_path):
    with pytest.raises(CheckpointError, match="Start it again without --resume"):
        load_checkpoint(tmp_path)


def test_truncated_checkpoint_rejected(tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def stopped_run(uninterrupted, tmp_path_factory):
    """A run killed during round 2, so its checkpoint is after round 1. Tests work on copies."""
    config, _ = uninterrupted
    run = tmp_path_factory.mktemp("stopped") / "run"
    result = fl2ora("run", str(config), "--output", str(run), env={"FL2ORA_KILL_AT": "aggregate:2"})
    assert result.returncode == -signal.SIGKILL
    return run


def test_resume_rejects_changed_config_and_mismatched_tensors(stopped_run, tmp_path):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    saved_config = (run / "config.yaml").read_text()

    with pytest.raises(ConfigError, match=r"\['lora.rank', 'train.lr'\] differ from the saved run.*--allow-change lora.rank,train.lr"):
        resume_experiment(run, ["lora.rank=4", "train.lr=0.1"])
    with pytest.raises(CheckpointError, match=r"shape mismatches: \[.*checkpoint \(2, 64\), model \(4, 64\)"):
        resume_experiment(run, ["lora.rank=4"], allow_changes=["lora.rank"])
    with pytest.raises(ConfigError, match=r"--allow-change names 'lora.rnak', .* Did you mean 'lora.rank'\?"):
        resume_experiment(run, ["lora.rank=4"], allow_changes=["lora.rnak"])
    assert load_checkpoint(run).round == 1
    assert (run / "config.yaml").read_text() == saved_config


def test_safetensors_write_error_becomes_oserror(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    save_checkpoint(tmp_path, small_checkpoint(round_index=1))

    def failing(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", failing)
    with pytest.raises(OSError, match="The previous checkpoint is kept"):
        save_checkpoint(tmp_path, small_checkpoint(round_index=2))
    assert load_checkpoint(tmp_path).round == 1


def tamper(folder, edit_header=None, edit_state=None, edit_tensors=None):
    """Rewrite ``folder``'s checkpoint after applying the edit functions to its header, state and tensors."""
    path = folder / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as stream:
        header = dict(stream.metadata())
        tensors = {name: stream.get_tensor(name) for name in stream.keys()}
    if edit_state is not None:
        state = json.loads(header["state"])
        edit_state(state)
        header["state"] = json.dumps(state)
    if edit_header is not None:
        edit_header(header)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata=header)
    return path


def assert_one_line_naming(message, *parts):
    assert "\n" not in message
    for part in parts:
        assert part in message, part


@pytest.mark.parametrize("key", ["round", "history", "bytes_per_round", "has_server_state", "client_ids"])
def test_missing_state_key_names_key_and_fix(key, tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())
    path = tamper(tmp_path, edit_state=lambda state: state.pop(key))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert_one_line_naming(str(error.value), str(path), f"missing the required key {key!r}", START_OVER)


@pytest.mark.parametrize("key", ["format_version", "state"])
def test_missing_header_key_names_key_and_fix(key, tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())
    path = tamper(tmp_path, edit_header=lambda header: header.pop(key))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert_one_line_naming(str(error.value), str(path), f"missing the required key {key!r}", START_OVER)


def test_missing_wall_time_defaults_to_zero(tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())
    tamper(tmp_path, edit_state=lambda state: state.pop("wall_time_seconds"))
    assert load_checkpoint(tmp_path).wall_time_seconds == 0.0


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("round", "2", "an integer"),
        ("round", 1.5, "an integer"),
        ("round", True, "an integer"),  # bool is an int subclass in Python
        ("history", {"round": 1}, "a list of round records"),
        ("bytes_per_round", None, "a list of per-round traffic records"),
        ("has_server_state", "yes", "true or false"),
        ("client_ids", "3", "a list of client ids"),
        ("wall_time_seconds", "1.5", "a number"),
    ],
)
def test_state_value_of_wrong_type_rejected(key, value, expected, tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())
    path = tamper(tmp_path, edit_state=lambda state: state.update({key: value}))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert_one_line_naming(str(error.value), str(path), f"{key} = {value!r}", f"must be {expected}", START_OVER)


def test_state_that_is_not_an_object_rejected(tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())
    path = tamper(tmp_path, edit_header=lambda header: header.update(state="[1, 2]"))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert_one_line_naming(str(error.value), str(path), "'state'", "expected a JSON object, got list", START_OVER)


def test_negative_round_rejected(tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())
    path = tamper(tmp_path, edit_state=lambda state: state.update(round=-1))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert_one_line_naming(str(error.value), str(path), "round = -1", "at least 0", START_OVER)


@pytest.mark.parametrize(
    "name, positions, value, counts",
    [
        ("global/a.lora_A.weight", [(0, 0), (1, 3)], math.nan, "2 NaN, 0 inf"),
        ("server/h/a.lora_B.weight", [(2, 1)], math.inf, "0 NaN, 1 inf"),
        ("client/3/gradient/a.lora_A.weight", [(0, 1), (0, 2), (1, 0)], -math.inf, "0 NaN, 3 inf"),
    ],
)
def test_non_finite_tensor_rejected(name, positions, value, counts, tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())

    def poison(tensors):
        for row, column in positions:
            tensors[name][row, column] = value

    path = tamper(tmp_path, edit_tensors=poison)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert_one_line_naming(
        str(error.value), str(path), f"non-finite values in 1 tensor(s): {name} ({counts})", "Start a new run (with a lower train.lr"
    )


@pytest.mark.parametrize("name", ["client/x/gradient/a.lora_A.weight", "client/3/a.lora_A.weight", "server/a"])
def test_malformed_tensor_name_rejected(name, tmp_path):
    save_checkpoint(tmp_path, small_checkpoint())
    path = tamper(tmp_path, edit_tensors=lambda tensors: tensors.update({name: torch.zeros(2)}))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert_one_line_naming(str(error.value), str(path), f"unexpected tensor {name!r}", START_OVER)


@pytest.mark.parametrize("round_index", [0, 1, 3])
def test_check_round_accepts_rounds_within_run(round_index, tmp_path):
    check_round(small_checkpoint(round_index), rounds=3, run_dir=tmp_path)


@pytest.mark.parametrize(
    "round_index, expected",
    [(4, "round = 4, beyond federated.rounds = 3"), (-1, "round = -1, but a round must be at least 0")],
)
def test_check_round_rejects_rounds_outside_run(round_index, expected, tmp_path):
    with pytest.raises(CheckpointError) as error:
        check_round(small_checkpoint(round_index), rounds=3, run_dir=tmp_path)
    assert_one_line_naming(str(error.value), str(tmp_path / "checkpoint.safetensors"), expected, "point --resume at another run directory")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_check_tensors_match_rejects_wrong_dtype(dtype):
    expected = small_checkpoint().global_state
    saved = {**expected, "a.lora_B.weight": expected["a.lora_B.weight"].to(dtype)}
    with pytest.raises(CheckpointError) as error:
        check_tensors_match(saved, expected, "global state")
    assert_one_line_naming(
        str(error.value),
        "global state has tensors of the wrong dtype",
        f"a.lora_B.weight: checkpoint {dtype}, model torch.float32",
        "start a new run",
    )
    assert "a.lora_A.weight" not in str(error.value)


def assert_resume_rejected(run, expected, overrides=None, allow_changes=None):
    """Resume ``run`` expecting a CheckpointError, and check that the run's files are kept.

    ``run.log`` may only grow, because building the experiment logs before the model check.
    """
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    with pytest.raises(CheckpointError, match=expected) as error:
        resume_experiment(run, overrides, allow_changes)
    assert "\n" not in str(error.value)
    after = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    assert after.keys() == before.keys()
    for name, data in before.items():
        if name == "run.log":
            assert after[name].startswith(data)
        else:
            assert after[name] == data, name
    return str(error.value)


def test_resume_rejects_checkpoint_without_history(stopped_run, tmp_path):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    path = tamper(run, edit_state=lambda state: state.pop("history"))
    message = assert_resume_rejected(run, "missing the required key 'history'")
    assert_one_line_naming(message, str(path), START_OVER)


def test_resume_rejects_wrong_dtype_and_non_finite(stopped_run, tmp_path):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as stream:
        name = sorted(key for key in stream.keys() if key.startswith("global/"))[0]

    tamper(run, edit_tensors=lambda tensors: tensors.update({name: tensors[name].double()}))
    model_name = name.removeprefix("global/")
    assert_resume_rejected(run, rf"global state has tensors of the wrong dtype: \['{model_name}: checkpoint torch.float64")

    def poison(tensors):
        tensors[name] = tensors[name].float()
        tensors[name].view(-1)[0] = math.nan

    tamper(run, edit_tensors=poison)
    assert_resume_rejected(run, rf"{name} \(1 NaN, 0 inf\)")


def test_resume_rejects_round_beyond_federated_rounds(stopped_run, tmp_path):
    run = shutil.copytree(stopped_run, tmp_path / "run")
    tamper(run, edit_state=lambda state: state.update(round=3))
    assert_resume_rejected(
        run,
        r"round = 3, beyond federated.rounds = 2\. If you lowered federated.rounds with --set, set it to at least 3",
        overrides=["federated.rounds=2"],
        allow_changes=["federated.rounds"],
    )

    tamper(run, edit_state=lambda state: state.update(round=7))
    assert_resume_rejected(run, r"round = 7, beyond federated.rounds = 3.*at least 7")


def test_cli_resume_broken_checkpoint_one_line(tiny_image_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, tiny_image_folder)
    save_checkpoint(run, small_checkpoint())
    path = tamper(run, edit_state=lambda state: state.pop("history"))
    saved = path.read_bytes()

    result = fl2ora("run", "--resume", str(run))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"fl2ora: error: Checkpoint {path} is missing the required key 'history'")
    assert START_OVER in result.stderr
    assert path.read_bytes() == saved


def header_of(data):
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), 8 + length


def test_save_adapter_writes_identical_bytes(tmp_path):
    state = {f"layer{i}.lora_A.weight": torch.randn(2, 3) for i in range(5)}
    state["bias"] = torch.arange(4, dtype=torch.float16)
    # Many metadata keys, so that two hash orders of them almost never coincide.
    metadata = {f"key{i}": {"value": i, "nested": [i, str(i)]} for i in range(12)}
    paths = [tmp_path / f"adapter{i}.safetensors" for i in range(3)]
    for path in paths:
        save_adapter(state, path, metadata)

    data = [path.read_bytes() for path in paths]
    assert data[1] == data[0]
    assert data[2] == data[0]

    header, data_start = header_of(data[0])
    assert list(header) == sorted(header)
    assert list(header["__metadata__"]) == sorted(metadata)
    assert data_start % 8 == 0
    with safe_open(str(paths[0]), framework="pt") as stream:
        assert stream.metadata() == {key: json.dumps(value) for key, value in metadata.items()}
    loaded = load_adapter(paths[0])
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
