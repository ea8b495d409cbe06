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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fl2ora.federated.rules import FedDynClientState, FedDynServerState
from fl2ora.model.trainable import describe_mismatch
from fl2ora.runtime.faults import fault_point

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT_VERSION = 1


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
    """Read the checkpoint of ``run_dir``.

    Raises:
        CheckpointError: when the file is missing, unreadable or inconsistent; the
            message names the file and what is wrong.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint in {str(run_dir)!r} ({CHECKPOINT_FILE} is missing): the run stopped before its "
            "first round completed. Start it again without --resume."
        )
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as stream:
            header = stream.metadata() or {}
        state = json.loads(header["state"])
        config = json.loads(header.get("config", "{}"))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Checkpoint {path} is unreadable or corrupt: {error}") from error
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"Checkpoint {path} has format version {header.get('format_version')!r}; this fl2ora reads {FORMAT_VERSION}."
        )

    global_state: dict[str, torch.Tensor] = {}
    server: dict[str, torch.Tensor] = {}
    clients: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "global":
            global_state[rest] = tensor
        elif kind == "server" and rest.startswith("h/"):
            server[rest[2:]] = tensor
        elif kind == "client":
            client_id, _, tail = rest.partition("/gradient/")
            clients.setdefault(int(client_id), {})[tail] = tensor
        else:
            raise CheckpointError(f"Checkpoint {path} holds an unexpected tensor {name!r}.")
    expected_clients = set(state.get("client_ids", []))
    if set(clients) != expected_clients:
        raise CheckpointError(
            f"Checkpoint {path} lists client states {sorted(expected_clients)} but holds {sorted(clients)}."
        )
    return Checkpoint(
        round=int(state["round"]),
        global_state=global_state,
        server_state=FedDynServerState(h=server) if state.get("has_server_state") else None,
        client_states={k: FedDynClientState(gradient=v) for k, v in clients.items()},
        history=state["history"],
        bytes_per_round=state["bytes_per_round"],
        wall_time_seconds=float(state.get("wall_time_seconds", 0.0)),
        config=config,
    )


def check_tensors_match(saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Check that ``saved`` has exactly the names and shapes of ``expected``.

    Raises:
        CheckpointError: listing missing and unexpected names and shape mismatches.
    """
    problem = describe_mismatch(saved, expected, label="checkpoint")
    if problem is not None:
        raise CheckpointError(
            f"The checkpoint's {what} does not match the model built from the configuration. {problem}"
        )
