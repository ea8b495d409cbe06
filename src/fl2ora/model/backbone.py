"""CLIP backbones: Hugging Face ``CLIPModel`` from the hub cache, a local folder, or random weights."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from fl2ora.config import ConfigError, ModelConfig
from fl2ora.model.openai_checkpoint import infer_openai_config, load_openai_checkpoint, read_openai_state_dict
from fl2ora.notices import RANDOM_INIT_WARNING
from fl2ora.model.tokenizer import VOCAB_SIZE, bundled_clip_tokenizer

logger = logging.getLogger(__name__)

_TEXT_BASE = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}
_VISION_BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Small enough for tests and CPU pipeline checks: 32 px images, 4 blocks per encoder.
    "tiny": {
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2},
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "projection_dim": 64,
    },
    "vit-b-32": {
        "text_config": _TEXT_BASE,
        "vision_config": {**_VISION_BASE, "image_size": 224, "patch_size": 32},
        "projection_dim": 512,
    },
    "vit-b-16": {
        "text_config": _TEXT_BASE,
        "vision_config": {**_VISION_BASE, "image_size": 224, "patch_size": 16},
        "projection_dim": 512,
    },
}
"""Architectures that can be built with random weights, without any file."""

HUB_ARCHITECTURES = {
    "openai/clip-vit-base-patch32": "vit-b-32",
    "openai/clip-vit-base-patch16": "vit-b-16",
}
"""Hub ids whose architecture is known without reading their config."""



@dataclass
class Backbone:
    """A loaded CLIP model with its tokenizer and a description for run outputs."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    image_size: int
    description: dict[str, Any]

    @property
    def random_init(self) -> bool:
        return bool(self.description["random_init"])


def build_architecture(name: str) -> CLIPConfig:
    """Return the ``CLIPConfig`` of a named architecture.

    Raises:
        ConfigError: when ``name`` is not in :data:`ARCHITECTURES`.
    """
    if name not in ARCHITECTURES:
        raise ConfigError(f"Unknown CLIP architecture {name!r}. Available: {sorted(ARCHITECTURES)}.")
    spec = ARCHITECTURES[name]
    text = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": 77, **spec["text_config"]}
    vision = dict(spec["vision_config"])
    return CLIPConfig(
        text_config={**text, "projection_dim": spec["projection_dim"]},
        vision_config={**vision, "projection_dim": spec["projection_dim"]},
        projection_dim=spec["projection_dim"],
    )


def _is_local_folder(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def _load_tokenizer(source: str | None, local_only: bool) -> CLIPTokenizer:
    """Read the tokenizer stored with the model, or build the bundled one when there is none."""
    if source is not None:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, TypeError) as error:
            logger.info("No tokenizer files with %s (%s); using the bundled CLIP tokenizer", source, error)
        else:
            # transformers 5.25 does not raise when the vocabulary files are missing: it returns a
            # placeholder that contains only the special tokens and maps every word to <|endoftext|>.
            if len(tokenizer) > len(tokenizer.all_special_tokens):
                return tokenizer
            logger.info("No tokenizer vocabulary with %s; using the bundled CLIP tokenizer", source)
    return bundled_clip_tokenizer()


def _cached_snapshot(repo_id: str) -> str | None:
    """Return the local snapshot folder of a hub model in the Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config_file = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repository id
        return None
    if not isinstance(config_file, str):
        return None
    return str(Path(config_file).parent)


def _openai_checkpoint_file(name: str) -> Path | None:
    """Return the OpenAI-format checkpoint file that ``model.name`` names, or None for other names.

    A name ending in ``.pt`` is a file path, unless it is an existing folder (a model folder
    written by ``CLIPModel.save_pretrained`` may have any name).

    Raises:
        ConfigError: when the name ends in ``.pt`` but no such file exists, so that a mistyped
            path is not reported as missing hub weights.
    """
    file = Path(name).expanduser()
    if not name.endswith(".pt") or file.is_dir():
        return None
    if not file.is_file():
        raise ConfigError(
            f"OpenAI CLIP checkpoint file {str(file)!r} (model.name={name!r}) does not exist. "
            "Check the path, e.g. model.name=~/.cache/clip/ViT-B-16.pt."
        )
    return file


def _missing_weights_error(name: str, cause: Exception | None) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    how = (
        f"CLIP weights {name!r} are not in the local Hugging Face cache"
        + (" and HF_HUB_OFFLINE is set" if offline else "")
        + ". Fixes: give a local folder written by CLIPModel.save_pretrained (model.name=/path/to/folder); "
        "or set model.allow_download=true on a machine that can reach the Hugging Face hub; "
        "or, for a pipeline check only, model.name=tiny with model.random_init=true."
    )
    if cause is not None:
        how += f" Loader error: {cause}"
    return ConfigError(how)


def load_backbone(config: ModelConfig) -> Backbone:
    """Load or build the CLIP backbone described by ``config``.

    Architecture names (``tiny``, ``vit-b-32``, ``vit-b-16``) exist only with random
    weights. A name ending in ``.pt`` is the path of an OpenAI-format checkpoint file. A
    hub id is read from the local cache unless ``allow_download`` is set, so a missing
    model fails at once instead of after network retries.

    Raises:
        ConfigError: when the weights cannot be found, with the ways to provide them, or
            when a ``.pt`` file does not exist.
    """
    name = config.name
    local = _is_local_folder(name)
    openai_file = _openai_checkpoint_file(name)

    if config.random_init:
        if name in ARCHITECTURES:
            clip_config, source = build_architecture(name), None
        elif name in HUB_ARCHITECTURES:
            clip_config, source = build_architecture(HUB_ARCHITECTURES[name]), None
        elif openai_file is not None:
            clip_config, source = infer_openai_config(read_openai_state_dict(openai_file)), None
        elif local:
            clip_config, source = CLIPConfig.from_pretrained(name), name
        else:
            raise ConfigError(
                f"Cannot build {name!r} with random weights: its architecture is unknown offline. "
                f"Use one of {sorted(ARCHITECTURES)} or a local model folder."
            )
        # Seed only the initialisation, leaving the caller's random state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            model = CLIPModel(clip_config)
        tokenizer = _load_tokenizer(source, local_only=True) if source else bundled_clip_tokenizer()
        logger.warning("%s (model %s, init seed %d)", RANDOM_INIT_WARNING, name, config.init_seed)
    elif openai_file is not None:
        # An OpenAI-format checkpoint, as cached by OpenAI's clip package (TorchScript or state dict).
        model = load_openai_checkpoint(openai_file)
        tokenizer = bundled_clip_tokenizer(model.config.text_config.max_position_embeddings)
    else:
        if name in ARCHITECTURES:
            raise ConfigError(
                f"model.name={name!r} is an architecture without pretrained weights. "
                "Set model.random_init=true for a pipeline check, or give a hub id or a local model folder."
            )
        source = name
        if not local and not config.allow_download:
            # Resolve the cached snapshot folder ourselves: from_pretrained(local_files_only=True)
            # still contacts the hub for its user-agent in huggingface_hub 2.4.
            source = _cached_snapshot(name)
            if source is None:
                raise _missing_weights_error(name, None)
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=not config.allow_download or local)
        except OSError as error:
            raise _missing_weights_error(name, error) from error
        tokenizer = _load_tokenizer(source, local_only=not config.allow_download or local)

    model.eval()
    vision = model.config.vision_config
    text = model.config.text_config
    description = {
        "name": name,
        "random_init": config.random_init,
        "init_seed": config.init_seed if config.random_init else None,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "vision_layers": vision.num_hidden_layers,
        "text_layers": text.num_hidden_layers,
        "embedding_dim": model.config.projection_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if config.random_init:
        description["warning"] = RANDOM_INIT_WARNING
    return Backbone(model=model, tokenizer=tokenizer, image_size=vision.image_size, description=description)
