"""Round checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is one safetensors file: the tensors of the global state, the server
state and every client's state, with a JSON header holding the round counter, the
records so far and the configuration. No pickle is involved, so loading one cannot
run code. It is written to a temporary file, flushed to disk and renamed over the
previous checkpoint, so a crash or a full disk during the write leaves the previous
checkpoint intact.

Random-number state needs no saving: client sampling, data order and dropout are
drawn from generators seeded by ``(seed, round, client)``, so a resumed round draws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fl2ora.federated.rules import FedDynClientState, FedDynServerState
from fl2ora.model.trainable import describe_mismatch
from fl2ora.runtime.faults import fault_point

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT_VERSION = 1

# Keys of the ``state`` header entry that every checkpoint must have, with the Python
# type each decodes to. ``wall_time_seconds`` is optional and defaults to 0.
_REQUIRED_STATE_KEYS: dict[str, tuple[type, str]] = {
    "round": (int, "an integer"),
    "history": (list, "a list of round records"),
    "bytes_per_round": (list, "a list of per-round traffic records"),
    "has_server_state": (bool, "true or false"),
    "client_ids": (list, "a list of client ids"),
}
_START_OVER = "Start a new run, or point --resume at another run directory."


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the run."""


@dataclass
class Checkpoint:
    """The state of a run after ``round`` completed rounds."""

    round: int
    global_state: dict[str, torch.Tensor]
    server_state: FedDynServerState | None
    client_states: dict[int, FedDynClientState]
    history: list[dict[str, Any]] = field(default_factory=list)
    """Records of the evaluated rounds so far."""
    bytes_per_round: list[dict[str, int]] = field(default_factory=list)
    wall_time_seconds: float = 0.0
    """Wall time spent in the rounds so far, over every session of the run."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved configuration the run was started with."""


def _flatten_tensors(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    tensors = {f"global/{name}": tensor for name, tensor in checkpoint.global_state.items()}
    if checkpoint.server_state is not None:
        tensors.update({f"server/h/{name}": tensor for name, tensor in checkpoint.server_state.h.items()})
    for client_id, state in checkpoint.client_states.items():
        tensors.update({f"client/{client_id}/gradient/{name}": t for name, t in state.gradient.items()})
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


def save_checkpoint(run_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` into ``run_dir`` atomically and return its path.

    Raises:
        OSError: when the write fails (for example a full disk); the previous
            checkpoint is left as it was and the temporary file is removed.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    temporary = path.with_name(path.name + ".tmp")
    header = {
        "format_version": str(FORMAT_VERSION),
        "state": json.dumps(
            {
                "round": checkpoint.round,
                "history": checkpoint.history,
                "bytes_per_round": checkpoint.bytes_per_round,
                "wall_time_seconds": checkpoint.wall_time_seconds,
                "has_server_state": checkpoint.server_state is not None,
                "client_ids": sorted(checkpoint.client_states),
            },
            allow_nan=False,
        ),
        "config": json.dumps(checkpoint.config),
    }
    try:
        save_file(_flatten_tensors(checkpoint), str(temporary), metadata=header)
        fault_point("checkpoint-write")
        with temporary.open("rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except SafetensorError as error:
        # safetensors reports a failed write (a full disk, for one) with its own exception type.
        temporary.unlink(missing_ok=True)
        raise OSError(f"Writing checkpoint {path} failed: {error}. The previous checkpoint is kept.") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    logger.info("Checkpoint after round %d written to %s", checkpoint.round, path)
    return path


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Read the checkpoint of ``run_dir`` and check it for consistency.

    Checks the header (format version, required keys and their types, a round of
    at least 0), the tensor names and that every tensor is finite. Checks against
    the experiment (names, shapes and dtypes of the model, ``federated.rounds``) are
    :func:`check_tensors_match` and :func:`check_round`.

    Raises:
        CheckpointError: when the file is missing, unreadable or inconsistent; the
            message names the file, what is wrong and what to do.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint in {str(run_dir)!r} ({CHECKPOINT_FILE} is missing): the run stopped before its "
            "first round completed. Start it again without --resume."
        )
    try:
        with safe_open(str(path), framework="pt") as stream:
            header = stream.metadata() or {}
            tensors = {name: stream.get_tensor(name) for name in stream.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"Checkpoint {path} is unreadable or corrupt: {error}. {_START_OVER}") from error

    state, config = _read_header(path, header)
    global_state, server, clients = _split_tensors(path, tensors)
    _check_finite(path, tensors)
    expected_clients = set(state["client_ids"])
    if set(clients) != expected_clients:
        raise CheckpointError(
            f"Checkpoint {path} lists client states {sorted(expected_clients)} but contains {sorted(clients)}. "
            f"{_START_OVER}"
        )
    return Checkpoint(
        round=state["round"],
        global_state=global_state,
        server_state=FedDynServerState(h=server) if state["has_server_state"] else None,
        client_states={k: FedDynClientState(gradient=v) for k, v in clients.items()},
        history=state["history"],
        bytes_per_round=state["bytes_per_round"],
        wall_time_seconds=float(state.get("wall_time_seconds", 0.0)),
        config=config,
    )


def _read_header(path: Path, header: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode and check the ``state`` and ``config`` entries of a checkpoint header."""
    if "format_version" not in header:
        raise _missing_key(path, "format_version")
    if header["format_version"] != str(FORMAT_VERSION):
        raise CheckpointError(
            f"Checkpoint {path} has format version {header['format_version']!r}, but this fl2ora reads "
            f"{FORMAT_VERSION}. Resume it with the fl2ora version that wrote it, or start a new run."
        )
    if "state" not in header:
        raise _missing_key(path, "state")
    state = _decode_json_object(path, header, "state")
    # A checkpoint without ``config`` still loads, and the runner then skips its check for an edited config.yaml.
    config = _decode_json_object(path, header, "config") if "config" in header else {}

    for key, (expected_type, description) in _REQUIRED_STATE_KEYS.items():
        if key not in state:
            raise _missing_key(path, key, entry="state")
        value = state[key]
        # bool is a subclass of int, so a stored ``true`` would otherwise pass as round 1.
        if not isinstance(value, expected_type) or (expected_type is int and isinstance(value, bool)):
            raise CheckpointError(
                f"Checkpoint {path} stores {key} = {value!r}, but it must be {description}. {_START_OVER}"
            )
    if state["round"] < 0:
        raise CheckpointError(
            f"Checkpoint {path} stores round = {state['round']}, but a round must be at least 0. {_START_OVER}"
        )
    wall_time = state.get("wall_time_seconds", 0.0)
    if isinstance(wall_time, bool) or not isinstance(wall_time, (int, float)):
        raise CheckpointError(
            f"Checkpoint {path} stores wall_time_seconds = {wall_time!r}, but it must be a number. {_START_OVER}"
        )
    return state, config


def _decode_json_object(path: Path, header: Mapping[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(header[key])
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"Checkpoint {path} has an invalid header entry {key!r}: it is not valid JSON ({error}). {_START_OVER}"
        ) from error
    if not isinstance(value, dict):
        raise CheckpointError(
            f"Checkpoint {path} has an invalid header entry {key!r}: expected a JSON object, got "
            f"{type(value).__name__}. {_START_OVER}"
        )
    return value


def _missing_key(path: Path, key: str, entry: str | None = None) -> CheckpointError:
    where = f"its header entry {entry!r}" if entry else "its header"
    return CheckpointError(
        f"Checkpoint {path} is missing the required key {key!r} in {where}, so it is corrupt or was not "
        f"written by fl2ora. {_START_OVER}"
    )


def _split_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Sort the flat tensor names written by :func:`save_checkpoint` back into global, server and client states."""
    global_state: dict[str, torch.Tensor] = {}
    server: dict[str, torch.Tensor] = {}
    clients: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition("/")
        client_id, separator, tail = rest.partition("/gradient/")
        if kind == "global" and rest:
            global_state[rest] = tensor
        elif kind == "server" and rest.startswith("h/") and len(rest) > 2:
            server[rest[2:]] = tensor
        elif kind == "client" and separator and tail and client_id.isdecimal():
            clients.setdefault(int(client_id), {})[tail] = tensor
        else:
            raise CheckpointError(f"Checkpoint {path} contains an unexpected tensor {name!r}. {_START_OVER}")
    return global_state, server, clients


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Reject a checkpoint with NaN or infinite values, naming up to five such tensors."""
    problems = []
    for name in sorted(tensors):
        tensor = tensors[name]
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        nan_count = int(torch.isnan(tensor).sum())
        inf_count = int(torch.isinf(tensor).sum())
        if nan_count or inf_count:
            problems.append(f"{name} ({nan_count} NaN, {inf_count} inf)")
    if problems:
        raise CheckpointError(
            f"Checkpoint {path} contains non-finite values in {len(problems)} tensor(s): "
            f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. The run diverged before this "
            "checkpoint or the file is corrupt. Start a new run (with a lower train.lr if it diverged), "
            "or point --resume at another run directory."
        )


def check_round(checkpoint: Checkpoint, rounds: int, run_dir: str | Path) -> None:
    """Check that the round stored in ``checkpoint`` lies in ``[0, rounds]``.

    Args:
        rounds: ``federated.rounds`` of the configuration the run resumes with.
        run_dir: the run directory, named in the message.

    Raises:
        CheckpointError: naming the stored round and ``rounds``.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if checkpoint.round < 0:
        raise CheckpointError(
            f"Checkpoint {path} stores round = {checkpoint.round}, but a round must be at least 0. {_START_OVER}"
        )
    if checkpoint.round > rounds:
        raise CheckpointError(
            f"Checkpoint {path} stores round = {checkpoint.round}, beyond federated.rounds = {rounds}. "
            f"If you lowered federated.rounds with --set, set it to at least {checkpoint.round}. Otherwise the "
            f"checkpoint does not belong to this run: start a new run, or point --resume at another run directory."
        )


def check_tensors_match(saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Check that ``saved`` has exactly the names, shapes and dtypes of ``expected``.

    Raises:
        CheckpointError: listing missing and unexpected names, shape mismatches and
            dtype mismatches.
    """
    problem = describe_mismatch(saved, expected, label="checkpoint")
    if problem is not None:
        raise CheckpointError(
            f"The checkpoint's {what} does not match the model built from the configuration. {problem} "
            "Resume with the configuration the run started with, or point --resume at another run directory."
        )
    wrong_dtypes = [
        f"{name}: checkpoint {saved[name].dtype}, model {expected[name].dtype}"
        for name in sorted(expected)
        if saved[name].dtype != expected[name].dtype
    ]
    if wrong_dtypes:
        raise CheckpointError(
            f"The checkpoint's {what} has tensors of the wrong dtype: "
            f"{wrong_dtypes[:5]}{' ...' if len(wrong_dtypes) > 5 else ''}. The checkpoint is corrupt or was "
            "not written by this run: start a new run, or point --resume at another run directory."
        )
