"""LayerNorm tuning, BitFit and full fine-tuning: train a named subset of CLIP's own parameters.

These methods add no module: they only choose which parameters of CLIP require
gradients, and the classifier stays :class:`fl2ora.model.zero_shot.ZeroShotClassifier`
with its frozen hand-written prompts. The federated core then trains and sends
exactly the selected tensors.

- ``layernorm``: weight and bias of every ``nn.LayerNorm`` of the selected
  encoder(s): ``layer_norm1`` and ``layer_norm2`` of every block, plus
  ``pre_layrnorm`` and ``post_layernorm`` (vision) or ``final_layer_norm`` (text).
- ``bitfit`` (Ben Zaken et al., ACL 2022): every bias of the selected encoder(s):
  the q, k, v and out projections and MLP ``fc1`` and ``fc2`` of every block, and
  the biases of all the LayerNorms above. CLIP's patch embedding and its
  ``visual_projection`` and ``text_projection`` have no bias.
- ``full``: every parameter of the selected encoder(s), embeddings included (for
  the text encoder that is the 49,408-row token embedding), plus that encoder's
  output projection (``visual_projection`` or ``text_projection``). ``logit_scale``
  stays frozen in every case.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

from torch import nn
from transformers import CLIPModel

logger = logging.getLogger(__name__)

SelectionKind = Literal["layernorm", "bitfit", "full"]
EncoderChoice = Literal["vision", "text", "both"]


def _encoder_modules(clip: CLIPModel, encoder: EncoderChoice) -> list[tuple[nn.Module, nn.Module]]:
    """Return (encoder, output projection) pairs for the selected encoder(s)."""
    pairs = {
        "vision": (clip.vision_model, clip.visual_projection),
        "text": (clip.text_model, clip.text_projection),
    }
    names = ["vision", "text"] if encoder == "both" else [encoder]
    return [pairs[name] for name in names]


def select_trainable(clip: CLIPModel, kind: SelectionKind, encoder: EncoderChoice = "both") -> int:
    """Freeze ``clip`` and make the parameters of one method trainable, in place.

    Args:
        clip: the CLIP model.
        kind: ``layernorm``, ``bitfit`` or ``full`` (see the module docstring for
            the exact tensors).
        encoder: ``vision``, ``text`` or ``both``.

    Returns:
        The number of trainable parameters.

    Raises:
        ValueError: on an unknown ``kind`` or ``encoder``.
    """
    if kind not in get_args(SelectionKind):
        raise ValueError(f"Unknown selection kind {kind!r}. Use one of {list(get_args(SelectionKind))}.")
    if encoder not in get_args(EncoderChoice):
        raise ValueError(f"Unknown encoder {encoder!r}. Use one of {list(get_args(EncoderChoice))}.")

    for parameter in clip.parameters():
        parameter.requires_grad_(False)

    for model, projection in _encoder_modules(clip, encoder):
        if kind == "layernorm":
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.requires_grad_(True)
        elif kind == "bitfit":
            for name, parameter in model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias":
                    parameter.requires_grad_(True)
        else:
            model.requires_grad_(True)
            projection.requires_grad_(True)

    count = sum(p.numel() for p in clip.parameters() if p.requires_grad)
    logger.info("%s tuning on the %s encoder(s): %d trainable parameters", kind, encoder, count)
    return count
