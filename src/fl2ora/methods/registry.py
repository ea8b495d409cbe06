"""Build the classifier of a run's method: which CLIP parameters train and travel."""

from __future__ import annotations

import logging

from torch import nn

from fl2ora.config import ConfigError, RunConfig
from fl2ora.methods.coop import CoOpSettings, PromptLearnerClassifier
from fl2ora.methods.lora import apply_lora
from fl2ora.methods.maple import MaPLeClassifier
from fl2ora.methods.selection import select_trainable
from fl2ora.model.backbone import Backbone
from fl2ora.model.zero_shot import ZeroShotClassifier

logger = logging.getLogger(__name__)


def build_classifier(config: RunConfig, backbone: Backbone, classnames: list[str], template: str) -> nn.Module:
    """Wrap the backbone in the classifier of ``config.method`` with its trainable parameters set.

    ``zeroshot`` trains nothing; ``fl2ora`` injects LoRA; ``layernorm``, ``bitfit`` and
    ``full`` unfreeze parts of the encoders in ``config.tuning.encoder``; ``coop``
    and ``kgcoop`` learn context vectors; ``maple`` learns coupled multi-modal prompts.
    Random initialisations depend on ``config.seed`` only.
    """
    clip, tokenizer, tau, method = backbone.model, backbone.tokenizer, config.model.tau, config.method
    for parameter in clip.parameters():
        parameter.requires_grad_(False)

    if method in ("coop", "kgcoop"):
        settings = CoOpSettings(
            n_ctx=config.coop.n_ctx,
            class_specific=config.coop.class_specific,
            init=config.coop.init,
            kgcoop_weight=config.coop.kgcoop_weight if method == "kgcoop" else 0.0,
        )
        return PromptLearnerClassifier(clip, tokenizer, classnames, settings, template=template, tau=tau, seed=config.seed)
    if method == "maple":
        return MaPLeClassifier(clip, tokenizer, classnames, config.maple, tau=tau, seed=config.seed)

    model = ZeroShotClassifier(clip, tokenizer, classnames, template, tau=tau)
    if method == "fl2ora":
        apply_lora(clip, config.lora, seed=config.seed)
    elif method in ("layernorm", "bitfit", "full"):
        select_trainable(clip, method, config.tuning.encoder)
    elif method != "zeroshot":
        raise ValueError(f"Unknown method {method!r}.")
    return model


def classifier_for_classnames(
    config: RunConfig, model: nn.Module, backbone: Backbone, classnames: list[str], template: str
) -> nn.Module:
    """Build a sibling of ``model`` that scores other class names with the same trained parameters.

    The sibling shares the backbone (and so any LoRA or unfrozen weights) and has
    trainable tensors of the same names, so the global state loads into it; the
    base-to-new setting uses it to score new classes against their own names.

    Raises:
        ConfigError: for class-specific CoOp contexts, which do not exist for new classes.
    """
    method = config.method
    if method in ("coop", "kgcoop"):
        if config.coop.class_specific:
            raise ConfigError(
                "Class-specific CoOp contexts (coop.class_specific=true) have no vectors for new classes; "
                "use shared contexts in the base_to_new setting."
            )
        settings = CoOpSettings(
            n_ctx=config.coop.n_ctx, class_specific=False, init=config.coop.init,
            kgcoop_weight=config.coop.kgcoop_weight if method == "kgcoop" else 0.0,
        )
        sibling = PromptLearnerClassifier(
            backbone.model, backbone.tokenizer, classnames, settings, template=template, tau=config.model.tau, seed=config.seed
        )
    elif method == "maple":
        sibling = MaPLeClassifier(backbone.model, backbone.tokenizer, classnames, config.maple, tau=config.model.tau, seed=config.seed)
    else:
        sibling = ZeroShotClassifier(backbone.model, backbone.tokenizer, classnames, template, tau=config.model.tau)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    sibling_names = {name for name, p in sibling.named_parameters() if p.requires_grad}
    if names != sibling_names:
        raise ConfigError(
            f"Method {method} cannot score other class names: its trainable tensors differ "
            f"({sorted(names ^ sibling_names)[:3]})."
        )
    return sibling
