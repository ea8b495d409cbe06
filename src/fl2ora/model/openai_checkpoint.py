"""OpenAI-format CLIP checkpoints (``ViT-B-16.pt`` and the like) loaded into ``transformers.CLIPModel``.

OpenAI's ``clip`` package, and the CoOp family of code that builds on it, caches each model
as one ``.pt`` file. The file is either a TorchScript archive saved by ``torch.jit.save``
(the files OpenAI publishes, in float16) or a plain state dict written by ``torch.save``.
Both use OpenAI's key names (``visual.conv1.weight``, ``transformer.resblocks.0.ln_1.weight``,
``token_embedding.weight``, ...). This module reads either form without running code from
the file, derives the architecture as ``clip.model.build_model`` does, and renames the
tensors to Hugging Face's ``CLIPModel`` layout. Only Vision Transformer (ViT) checkpoints
are supported; OpenAI's ResNet image encoders have no ``CLIPModel`` equivalent.

Example (with a file cached by OpenAI's ``clip.load``)::

    model = load_openai_checkpoint("~/.cache/clip/ViT-B-16.pt")
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

logger = logging.getLogger(__name__)

# Tensors that OpenAI's ``build_model`` deletes before loading: metadata, not weights.
_METADATA_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})

# Storage classes that a TorchScript archive names, with the dtype of their elements.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_RESNET_PREFIXES = ("visual.layer1.", "visual.attnpool.", "visual.bn1.")

# Transforms applied to an OpenAI tensor on its way to a Hugging Face key.
_COPY = "copy"
_TRANSPOSE = "transpose"
_Q, _K, _V = "q", "k", "v"


# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------


class _ScriptObject:
    """Placeholder for a TorchScript class (``__torch__.*``) that stores its attributes and runs no code."""

    def __init__(self, *args: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


class _StorageType:
    """Placeholder for ``torch.<Kind>Storage`` in a persistent id, of which only the dtype is used."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` over a flat storage tensor.

    ``as_strided`` raises a RuntimeError when ``size``, ``stride`` and ``offset`` reach outside
    the storage, so a malformed archive cannot read past its data.
    """
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def _restore_type_tag(value: Any, _type: str) -> Any:
    return value


def _build_list(values: Any) -> list[Any]:
    return list(values)


# The only globals a TorchScript ``data.pkl`` may name besides ``__torch__.*`` classes. Each one
# builds plain data (a tensor view, a dict or a list), so unpickling cannot call anything else.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
}


class _TorchScriptDataUnpickler(pickle.Unpickler):
    """Read the module tree of a TorchScript ``data.pkl`` with an allow-list of globals.

    Tensor storages are read from ``<archive>/data/<key>`` in the same zip file.
    """

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a TorchScript weights archive"
            )
        return allowed

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"malformed storage record {pid!r}")
        if key in self._storages:
            return self._storages[key]

        record = f"{self._prefix}/data/{key}"
        try:
            raw = self._archive.read(record)
        except KeyError as error:
            raise pickle.UnpicklingError(f"storage {record!r} is missing from the archive") from error
        dtype = storage_type.dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise pickle.UnpicklingError(
                f"storage {record!r} has {len(raw)} bytes, expected {numel} x {itemsize} for {dtype}"
            )
        storage = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        self._storages[key] = storage
        return storage


def _torchscript_prefix(archive: zipfile.ZipFile) -> str | None:
    """Return the archive's top folder when it is a TorchScript archive, else None."""
    names = archive.namelist()
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) == 2 and parts[1] == "constants.pkl":
            return parts[0]
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) >= 3 and parts[1] == "code":
            return parts[0]
    return None


def _named_tensors(obj: Any, prefix: str, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(dotted attribute path, tensor)`` for every tensor below a TorchScript module."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for attribute, value in vars(obj).items():
        if attribute.startswith("_"):
            continue
        if isinstance(value, torch.Tensor):
            yield prefix + attribute, value
        elif isinstance(value, _ScriptObject):
            yield from _named_tensors(value, f"{prefix}{attribute}.", seen)


def _read_torchscript(path: Path, archive: zipfile.ZipFile, prefix: str) -> dict[str, torch.Tensor]:
    # NOTE: torch.jit.load would compile and run the TorchScript code stored in the archive, and
    # torch.load(weights_only=True) rejects TorchScript archives. Reading data.pkl with an
    # allow-list of globals recovers the same tensors as ``torch.jit.load(path).state_dict()``.
    try:
        byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
    except KeyError:
        byteorder = "little"  # archives written before PyTorch 1.13 have no byteorder record
    if byteorder != "little":
        raise ValueError(f"{path} stores tensors in {byteorder!r} byte order; only little-endian is supported.")

    try:
        data = archive.read(f"{prefix}/data.pkl")
    except KeyError as error:
        raise ValueError(f"{path} looks like a TorchScript archive but has no {prefix}/data.pkl record.") from error
    try:
        root = _TorchScriptDataUnpickler(data, archive, prefix).load()
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a plain TorchScript weights archive and was not loaded: {error}. "
            "Re-save the weights with torch.save(model.state_dict(), path) from a trusted session."
        ) from error
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"{path}: the TorchScript archive's data.pkl does not contain a module.")
    return dict(_named_tensors(root, "", set()))


def _unwrap_state_dict(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    """Strip a ``{"state_dict": ...}`` wrapper and a ``module.`` key prefix, and check that every value is a tensor."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{path} contains an object of type {type(loaded).__name__}, not a state dict. "
            "Save the weights with torch.save(model.state_dict(), path)."
        )

    state_dict: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: state dict key {key!r} is not a string.")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: state dict entry {key!r} has type {type(value).__name__}, not a tensor.")
        state_dict[key] = value

    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def read_openai_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the tensors of an OpenAI-format CLIP checkpoint without running code from the file.

    A TorchScript archive (a zip with ``constants.pkl`` or ``code/``) is read by unpickling its
    ``data.pkl`` with an allow-list of tensor-building globals. Every other file goes through
    ``torch.load(..., weights_only=True)``. A ``{"state_dict": ...}`` wrapper and a ``module.``
    prefix on every key (from ``DataParallel``) are removed.

    Args:
        path: the ``.pt`` file, e.g. ``~/.cache/clip/ViT-B-16.pt``.

    Returns:
        OpenAI key name -> tensor on the CPU, in the file's dtype (OpenAI's files are float16).

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: when the file is truncated or unreadable, contains anything besides tensors
            (such as a pickled object whose unpickling would call a function) or is not a state dict.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"OpenAI CLIP checkpoint {str(file)!r} not found. Give the path of a .pt file.")

    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                prefix = _torchscript_prefix(archive)
                if prefix is not None:
                    logger.info("Reading the tensors of TorchScript archive %s without running its code", file)
                    return _unwrap_state_dict(file, _read_torchscript(file, archive, prefix))
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as error:
        # A download cut short leaves a zip without its central directory, which torch.load reports
        # as a RuntimeError. A damaged member fails its CRC check (BadZipFile) or ends early (EOFError).
        raise ValueError(
            f"OpenAI CLIP checkpoint {str(file)!r} is truncated or is not a CLIP checkpoint "
            f"({_first_sentence(error)}). Download it again."
        ) from error
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{file} contains objects other than tensors, so weights-only loading rejected it "
            f"({_first_line(error)}). Re-save the weights with torch.save(model.state_dict(), path) "
            "from a trusted session."
        ) from error
    return _unwrap_state_dict(file, loaded)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _first_sentence(error: BaseException) -> str:
    # torch.load's message for a damaged zip continues with several sentences of general advice.
    return _first_line(error).split(". ")[0].removesuffix(".")


# ---------------------------------------------------------------------------------------------
# Architecture and key mapping
# ---------------------------------------------------------------------------------------------


def _require(state_dict: dict[str, torch.Tensor], keys: list[str]) -> None:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"OpenAI CLIP state dict is missing keys {missing}. Check that the file is a CLIP checkpoint.")


def _block_count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in state_dict if (match := pattern.match(key))}
    return len(indices)


def infer_openai_config(state_dict: dict[str, torch.Tensor]) -> CLIPConfig:
    """Derive the ``CLIPConfig`` of an OpenAI ViT checkpoint from its tensor shapes.

    Follows ``clip.model.build_model``: vision width from ``visual.conv1``, patch size from its
    kernel, image size from the number of position embeddings, text width from ``ln_final``,
    layer counts from the ``resblocks`` indices, 64-dimensional attention heads
    (``heads = width // 64``), embedding size from ``text_projection``. Both encoders use
    QuickGELU and LayerNorm epsilon 1e-5, as in OpenAI's model.

    Args:
        state_dict: OpenAI key name -> tensor, as returned by :func:`read_openai_state_dict`.

    Returns:
        A ``CLIPConfig`` whose ``CLIPModel`` has exactly the checkpoint's parameters.

    Raises:
        ValueError: for a ResNet checkpoint, a missing key the architecture depends on, or
            inconsistent shapes.
    """
    resnet_keys = sorted(key for key in state_dict if key.startswith(_RESNET_PREFIXES))
    if resnet_keys:
        raise ValueError(
            f"The checkpoint has a ResNet image encoder (keys such as {resnet_keys[0]!r}), which CLIPModel "
            "cannot hold: only ViT checkpoints are supported. "
            "Use ViT-B-32.pt, ViT-B-16.pt, ViT-L-14.pt or ViT-L-14-336px.pt."
        )
    _require(
        state_dict,
        [
            "visual.proj",
            "visual.conv1.weight",
            "visual.positional_embedding",
            "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "text_projection",
            "positional_embedding",
            "token_embedding.weight",
            "ln_final.weight",
            "transformer.resblocks.0.mlp.c_fc.weight",
        ],
    )

    # Image encoder, as build_model reads it.
    conv = state_dict["visual.conv1.weight"]  # (W_v, 3, P, P)
    vision_width, channels, patch_size = conv.shape[0], conv.shape[1], conv.shape[-1]
    vision_layers = _block_count(state_dict, "visual.transformer.resblocks.")
    positions = state_dict["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(
            f"visual.positional_embedding has {positions} rows; a square ViT needs grid**2 + 1 (class token)."
        )
    image_size = patch_size * grid

    # Text encoder.
    embed_dim = state_dict["text_projection"].shape[1]
    context_length = state_dict["positional_embedding"].shape[0]
    vocab_size = state_dict["token_embedding.weight"].shape[0]
    text_width = state_dict["ln_final.weight"].shape[0]
    text_layers = _block_count(state_dict, "transformer.resblocks.")

    for name, width in (("vision", vision_width), ("text", text_width)):
        if width < 64:
            raise ValueError(
                f"The {name} width is {width}, but OpenAI's CLIP uses width // 64 attention heads, "
                "so the width must be at least 64."
            )
    if state_dict["visual.proj"].shape != (vision_width, embed_dim):
        raise ValueError(
            f"visual.proj has shape {tuple(state_dict['visual.proj'].shape)}, "
            f"expected ({vision_width}, {embed_dim}) from visual.conv1 and text_projection."
        )

    # Only the initial value of the parameter that the checkpoint overwrites; meta tensors have no value.
    logit_scale = state_dict.get("logit_scale")
    logit_scale_init = 2.6592 if logit_scale is None or logit_scale.is_meta else float(logit_scale)
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_width,
        "intermediate_size": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_width // 64,
        "max_position_embeddings": context_length,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        # The text feature is read at <|endoftext|>, the largest id in OpenAI's vocabulary. OpenAI
        # takes the argmax of the ids and Hugging Face the first eos_token_id, which is the same
        # position for every sequence that CLIP's tokenizer produces.
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "projection_dim": embed_dim,
    }
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_width // 64,
        "num_channels": channels,
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": embed_dim,
    }
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=embed_dim,
        logit_scale_init_value=logit_scale_init,
    )


def _layer_pairs(openai_prefix: str, hf_prefix: str) -> list[tuple[str, str, str]]:
    """Return ``(OpenAI key, Hugging Face key, transform)`` for one residual attention block."""
    pairs = []
    for projection in (_Q, _K, _V):
        for suffix in ("weight", "bias"):
            hf_key = f"{hf_prefix}self_attn.{projection}_proj.{suffix}"
            pairs.append((f"{openai_prefix}attn.in_proj_{suffix}", hf_key, projection))
    renames = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for openai_name, hf_name in renames.items():
        for suffix in ("weight", "bias"):
            pairs.append((f"{openai_prefix}{openai_name}.{suffix}", f"{hf_prefix}{hf_name}.{suffix}", _COPY))
    return pairs


def _key_pairs(config: CLIPConfig) -> list[tuple[str, str, str]]:
    """Return every ``(OpenAI key, Hugging Face key, transform)`` of a ViT CLIP model."""
    pairs = [
        ("logit_scale", "logit_scale", _COPY),
        ("visual.proj", "visual_projection.weight", _TRANSPOSE),  # (W_v, D) -> (D, W_v)
        ("text_projection", "text_projection.weight", _TRANSPOSE),  # (W_t, D) -> (D, W_t)
        # Image encoder.
        ("visual.class_embedding", "vision_model.embeddings.class_embedding", _COPY),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", _COPY),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", _COPY),
        ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", _COPY),  # Hugging Face's spelling
        ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", _COPY),
        ("visual.ln_post.weight", "vision_model.post_layernorm.weight", _COPY),
        ("visual.ln_post.bias", "vision_model.post_layernorm.bias", _COPY),
        # Text encoder.
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", _COPY),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight", _COPY),
        ("ln_final.weight", "text_model.final_layer_norm.weight", _COPY),
        ("ln_final.bias", "text_model.final_layer_norm.bias", _COPY),
    ]
    for layer in range(config.vision_config.num_hidden_layers):
        pairs += _layer_pairs(f"visual.transformer.resblocks.{layer}.", f"vision_model.encoder.layers.{layer}.")
    for layer in range(config.text_config.num_hidden_layers):
        pairs += _layer_pairs(f"transformer.resblocks.{layer}.", f"text_model.encoder.layers.{layer}.")
    return pairs


def _transform(tensor: torch.Tensor, transform: str, key: str) -> torch.Tensor:
    if transform == _COPY:
        return tensor
    if transform == _TRANSPOSE:
        return tensor.t().contiguous()
    # nn.MultiheadAttention stacks the q, k and v projections along the first dimension.
    if tensor.shape[0] % 3:
        raise ValueError(f"{key} has {tensor.shape[0]} rows, not a multiple of 3 (stacked q, k and v).")
    return tensor.chunk(3, dim=0)[(_Q, _K, _V).index(transform)].contiguous()


def convert_openai_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenAI ViT CLIP state dict to the keys of ``transformers.CLIPModel``.

    ``in_proj_weight`` and ``in_proj_bias`` are split into ``q_proj``, ``k_proj`` and ``v_proj``.
    ``visual.proj`` and ``text_projection`` ``(W, D)`` are transposed into ``Linear`` weights
    ``(D, W)``. The other tensors are renamed unchanged, dtype included. OpenAI's metadata
    tensors (``input_resolution``, ``context_length``, ``vocab_size``) and causal-mask buffers
    (``*attn_mask``) are dropped.

    Args:
        state_dict: OpenAI key name -> tensor, as returned by :func:`read_openai_state_dict`.

    Returns:
        Hugging Face key name -> tensor, for ``CLIPModel(infer_openai_config(state_dict))``.

    Raises:
        ValueError: naming the OpenAI keys that are missing or that have no Hugging Face
            counterpart, and for a ResNet checkpoint.
    """
    config = infer_openai_config(state_dict)
    pairs = _key_pairs(config)

    missing = sorted({openai_key for openai_key, _, _ in pairs if openai_key not in state_dict})
    used = {openai_key for openai_key, _, _ in pairs}
    ignored = {key for key in state_dict if key in _METADATA_KEYS or key.endswith("attn_mask")}
    unexpected = sorted(set(state_dict) - used - ignored)
    if missing or unexpected:
        raise ValueError(
            "The OpenAI CLIP state dict does not match the architecture inferred from it "
            f"(vision: {config.vision_config.num_hidden_layers} layers of width {config.vision_config.hidden_size}; "
            f"text: {config.text_config.num_hidden_layers} layers of width {config.text_config.hidden_size}). "
            f"Missing keys: {missing or 'none'}. Unexpected keys: {unexpected or 'none'}. "
            "The file may be truncated or not an OpenAI-format ViT CLIP checkpoint."
        )

    converted = {}
    for openai_key, hf_key, transform in pairs:
        converted[hf_key] = _transform(state_dict[openai_key], transform, openai_key)
    return converted


def load_openai_checkpoint(path: str | os.PathLike[str]) -> CLIPModel:
    """Build a ``CLIPModel`` in eval mode from an OpenAI-format ViT CLIP ``.pt`` file.

    The model is float32; float16 weights (as in OpenAI's files) are cast on loading.

    Args:
        path: the checkpoint, a TorchScript archive or a plain state dict with OpenAI's keys.

    Returns:
        A ``CLIPModel`` whose image and text features equal those of OpenAI's architecture.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: when the file is truncated or unreadable, contains non-tensor objects, a ResNet
            model, or tensors whose names or shapes do not fit the inferred architecture (each one listed).
    """
    state_dict = read_openai_state_dict(path)
    config = infer_openai_config(state_dict)
    converted = convert_openai_state_dict(state_dict)

    model = CLIPModel(config)
    expected = model.state_dict()
    missing = [f"{key} {tuple(expected[key].shape)}" for key in expected if key not in converted]
    unexpected = [f"{key} {tuple(converted[key].shape)}" for key in converted if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}"
        for key, tensor in converted.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: the converted weights do not fit the inferred CLIPModel. Missing: {missing or 'none'}. "
            f"Unexpected: {unexpected or 'none'}. Shape mismatches: {mismatched or 'none'}."
        )
    model.load_state_dict(converted, strict=True)

    model.eval()
    vision, text = config.vision_config, config.text_config
    logger.info(
        "Loaded OpenAI CLIP checkpoint %s: ViT %d px, patch %d, %d+%d layers, embedding %d",
        path,
        vision.image_size,
        vision.patch_size,
        vision.num_hidden_layers,
        text.num_hidden_layers,
        config.projection_dim,
    )
    return model
