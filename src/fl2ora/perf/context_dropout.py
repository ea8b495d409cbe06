"""LoRA dropout that draws the mask of the full text context, so trimmed prompts keep the same masks.

``perf.trim_text_padding`` runs the text encoder only up to the longest prompt's
end-of-text token. With LoRA dropout on the text encoder (FL²oRA's 0.25), a plain
``nn.Dropout`` on the shorter input would draw fewer random numbers and give every
kept token a different mask, so training would no longer reproduce the untrimmed
run. :class:`ContextDropout` draws the mask for the full ``(C, L, W)`` context and
keeps its first positions. On the CPU that is the same mask, bit for bit, as
``nn.Dropout`` draws on the untrimmed input (``torch.nn.functional.dropout`` there
is ``input * empty_like(input).bernoulli_(1 - p).div_(1 - p)``), and the generator
advances by the same amount.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class ContextDropout(nn.Module):
    """Dropout of ``(C, T, ...)`` inputs whose mask is drawn for ``(C, context_length, ...)``.

    Args:
        p: dropout probability, in [0, 1).
        context_length: the untrimmed sequence length L, e.g. 77 for CLIP.

    Raises:
        ValueError: on ``p`` outside [0, 1) or ``context_length`` < 1.
    """

    def __init__(self, p: float, context_length: int) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}. LoRA dropout uses 0.25.")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length!r}. CLIP uses 77.")
        self.p = p
        self.context_length = context_length

    def extra_repr(self) -> str:
        return f"p={self.p}, context_length={self.context_length}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.dim() < 2 or x.shape[1] >= self.context_length:
            # Not trimmed: plain dropout, as nn.Dropout draws it.
            return F.dropout(x, self.p, training=True)
        if x.device.type != "cpu":
            raise RuntimeError(
                f"ContextDropout got a trimmed input on {x.device}, where dropout masks are drawn by another "
                "kernel than on the CPU. Build the experiment on that device, or set perf.trim_text_padding=false."
            )
        shape = (x.shape[0], self.context_length, *x.shape[2:])
        noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * noise[:, : x.shape[1]]


def _lora_dropout_dicts(text_model: nn.Module) -> list[nn.ModuleDict]:
    """Return peft's ``lora_dropout`` dictionaries inside ``text_model``."""
    return [
        module.lora_dropout
        for module in text_model.modules()
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict)
    ]


def use_context_dropout(text_model: nn.Module, context_length: int, enabled: bool) -> int:
    """Swap the text encoder's LoRA ``nn.Dropout`` modules for :class:`ContextDropout`, or back.

    Only CPU inputs get the full-context mask (CUDA draws dropout masks with another
    kernel), so call this with ``enabled`` true only for a model on the CPU.

    Returns:
        The number of modules swapped.
    """
    swapped = 0
    for dropouts in _lora_dropout_dicts(text_model):
        for key, module in list(dropouts.items()):
            if enabled and type(module) is nn.Dropout and module.p > 0:
                dropouts[key] = ContextDropout(module.p, context_length)
                swapped += 1
            elif not enabled and isinstance(module, ContextDropout):
                dropouts[key] = nn.Dropout(module.p)
                swapped += 1
    if swapped:
        logger.debug("Swapped %d LoRA dropout modules of the text encoder (context dropout %s)", swapped, enabled)
    return swapped
