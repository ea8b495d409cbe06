"""The trainable state: the only tensors that travel between server and clients."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

StateDict = dict[str, torch.Tensor]


def trainable_state_dict(model: nn.Module) -> StateDict:
    """Return detached fp32 CPU copies of every parameter with ``requires_grad``, by name."""
    return {
        name: parameter.detach().to("cpu", torch.float32).clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def describe_mismatch(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], label: str = "state"
) -> str | None:
    """Describe how ``state`` differs from ``reference`` in names and shapes, or return None.

    The text lists up to five missing names, unexpected names and shape mismatches,
    with the shape in ``state`` under ``label`` and the shape in ``reference``.
    """
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    mismatched = [
        f"{name}: {label} {tuple(state[name].shape)}, model {tuple(reference[name].shape)}"
        for name in sorted(set(reference) & set(state))
        if state[name].shape != reference[name].shape
    ]
    if not (missing or unexpected or mismatched):
        return None
    return (
        f"Missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
        f"unexpected: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
        f"shape mismatches: {mismatched[:5]}."
    )


def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters of ``model``.

    Raises:
        ValueError: when names are missing or unexpected, or a shape differs; the
            message lists them. Nothing is copied in that case.
    """
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    problem = describe_mismatch(state, parameters)
    if problem is not None:
        raise ValueError(
            f"Trainable state does not match the model. {problem} "
            "Was it saved with the same method and configuration?"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])
    clear_cache = getattr(model, "clear_cache", None)
    if callable(clear_cache):
        clear_cache()


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Return the payload size of ``state`` in bytes."""
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, Any]) -> None:
    """Write ``state`` as safetensors with JSON-encoded ``metadata`` in the header.

    Equal ``state`` and ``metadata`` give byte-identical files: safetensors 0.8 writes
    the ``__metadata__`` map in hash order, which differs between writes, so the
    header is encoded again here with sorted keys.
    """
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    header = {key: json.dumps(value) for key, value in metadata.items()}
    Path(path).write_bytes(_sort_safetensors_header(save(tensors, metadata=header)))


def _sort_safetensors_header(data: bytes) -> bytes:
    """Encode the JSON header of serialized safetensors ``data`` again with sorted keys.

    The header length may change, because tensor data offsets count from the end of
    the header. The format is an 8-byte little-endian header length, the JSON header
    and the tensor data.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    # Pad with spaces to a multiple of 8 bytes, as safetensors does, so the tensor data stays aligned.
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def load_adapter(path: str | Path) -> StateDict:
    """Read a state written by :func:`save_adapter` (safetensors, no pickle)."""
    return load_file(str(path))
