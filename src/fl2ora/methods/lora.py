"""FL²oRA: LoRA on CLIP's attention projections, injected with ``peft``.

The study adapts the q, k and v projections of every block of both encoders with
rank 2, alpha 1, dropout 0.25 on the LoRA input, B initialised to zero and scale
alpha / sqrt(r) (rsLoRA). Hugging Face's CLIP keeps q, k, v and out as separate
``nn.Linear`` layers, so each gets its own adapter, as in the study.
"""

from __future__ import annotations

import logging
import re

import peft
import torch
from torch import nn
from transformers import CLIPModel

from fl2ora.config import ConfigError, LoraConfig

logger = logging.getLogger(__name__)

_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
_ENCODERS = {"vision": "vision_model", "text": "text_model"}
_NAMED_RANGES = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top-K")


def resolve_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """Turn a layer selection into sorted 0-based block indices.

    Named ranges for L blocks: ``bottom``, ``mid`` and ``up`` are the first, middle
    and last third; ``half-bottom`` and ``half-up`` the first and last half;
    ``top-K`` (or ``topK``) the last K blocks. For L = 12 these are the study's
    ranges (bottom 0-3, mid 4-7, up 8-11, half-up 6-11).

    >>> resolve_layers("up", 12)
    [8, 9, 10, 11]
    >>> resolve_layers("top-2", 12)
    [10, 11]

    Raises:
        ConfigError: on an unknown name or an index outside ``[0, num_layers)``.
    """
    third, half = num_layers // 3, num_layers // 2
    if isinstance(spec, str):
        ranges = {
            "all": range(num_layers),
            "bottom": range(third),
            "mid": range(third, num_layers - third),
            "up": range(num_layers - third, num_layers),
            "half-bottom": range(half),
            "half-up": range(num_layers - half, num_layers),
        }
        top = re.fullmatch(r"top-?(\d+)", spec)
        if top:
            count = int(top.group(1))
            if not 1 <= count <= num_layers:
                raise ConfigError(f"lora.layers={spec!r} needs 1 <= K <= {num_layers} (the encoder's blocks).")
            indices = list(range(num_layers - count, num_layers))
        elif spec in ranges:
            indices = list(ranges[spec])
        else:
            raise ConfigError(
                f"Unknown lora.layers {spec!r}. Use one of {list(_NAMED_RANGES)} or a list of block indices."
            )
    else:
        bad = [i for i in spec if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"lora.layers indices {bad} are outside [0, {num_layers - 1}] for this encoder.")
        indices = sorted(set(spec))
    if not indices:
        raise ConfigError(f"lora.layers={spec!r} selects no block of a {num_layers}-block encoder.")
    return indices


def lora_target_modules(clip: CLIPModel, config: LoraConfig) -> list[str]:
    """List the fully qualified names of the linear layers that get LoRA."""
    encoders = ["vision", "text"] if config.encoder == "both" else [config.encoder]
    targets = []
    for encoder in encoders:
        encoder_config = clip.config.vision_config if encoder == "vision" else clip.config.text_config
        for layer in resolve_layers(config.layers, encoder_config.num_hidden_layers):
            for projection in config.projections:
                targets.append(f"{_ENCODERS[encoder]}.encoder.layers.{layer}.self_attn.{_PROJECTIONS[projection]}")
    return targets


def apply_lora(clip: CLIPModel, config: LoraConfig, seed: int = 0) -> list[str]:
    """Freeze ``clip`` and inject LoRA adapters in place; only they stay trainable.

    The random initialisation of the A matrices depends only on ``seed``; the
    caller's random state is left untouched.

    Returns:
        The names of the adapted modules.
    """
    targets = lora_target_modules(clip, config)
    peft_config = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        use_rslora=config.scaling == "rslora",
        target_modules=targets,
        bias="none",
        init_lora_weights=True,  # A: Kaiming-uniform, B: zeros, so the adapted model starts at CLIP
    )
    for parameter in clip.parameters():
        parameter.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(peft_config, clip)
    for name, parameter in clip.named_parameters():
        parameter.requires_grad_("lora_" in name)
    logger.info(
        "LoRA r=%d alpha=%s scaling=%s dropout=%s on %d modules (%s encoder)",
        config.rank, config.alpha, config.scaling, config.dropout, len(targets), config.encoder,
    )
    return targets


def count_trainable(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
