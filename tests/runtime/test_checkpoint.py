"""Checkpoints, exact resume after SIGKILL or Ctrl-C, and safe loading."""

import errno
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fl2ora.config import ConfigError
from fl2ora.federated.rules import FedDynClientState, FedDynServerState
from fl2ora.model.trainable import load_adapter
from fl2ora.runner import resume_experiment
from fl2ora.runtime import checkpoint as checkpoint_module
from fl2ora.runtime.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


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


def test_resume_rejects_changed_config_and_mismatched_tensors(uninterrupted, tmp_path):
    config, _ = uninterrupted
    run = tmp_path / "run"
    result = fl2ora("run", str(config), "--output", str(run), env={"FL2ORA_KILL_AT": "aggregate:2"})
    assert result.returncode == -signal.SIGKILL
    saved_config = (run / "config.yaml").read_text()

    with pytest.raises(ConfigError, match=r"\['lora.rank', 'train.lr'\] differ from the saved run.*--allow-change lora.rank,train.lr"):
        resume_experiment(run, ["lora.rank=4", "train.lr=0.1"])
    with pytest.raises(CheckpointError, match=r"shape mismatches: \[.*checkpoint \(2, 64\), model \(4, 64\)"):
        resume_experiment(run, ["lora.rank=4"], allow_changes=["lora.rank"])
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
