"""Speed-ups of the ``perf`` configuration section, set up on a built experiment.

:func:`apply_speedups` sets them up on a built :class:`~fl2ora.experiment.Experiment`.
Both runtimes (the in-process simulation and Flower) build their experiment with
:func:`~fl2ora.experiment.build_experiment`, so both run with the same switches.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from fl2ora.config import PerfConfig
from fl2ora.perf.context_dropout import use_context_dropout
from fl2ora.perf.features import ImageFeatureCache, image_features_frozen
from fl2ora.perf.images import ImageMemoryBudget, cache_decoded_images

if TYPE_CHECKING:
    from fl2ora.experiment import Experiment

logger = logging.getLogger(__name__)


def configure_classifier(model: nn.Module, perf: PerfConfig, feature_cache: ImageFeatureCache | None) -> None:
    """Set the text switches of ``perf`` on a classifier and attach ``feature_cache`` (None detaches it).

    Classifiers without the attributes (other modules) are left unchanged.
    """
    if hasattr(model, "cache_text_features"):
        model.cache_text_features = perf.text_feature_cache
    if hasattr(model, "trim_text_padding"):
        model.trim_text_padding = perf.trim_text_padding
        clip = getattr(model, "clip", None)
        if clip is not None:
            # Trimming in training with LoRA dropout stays exact only with full-context masks (CPU).
            on_cpu = all(p.device.type == "cpu" for p in clip.text_model.parameters())
            context_length = clip.config.text_config.max_position_embeddings
            use_context_dropout(clip.text_model, context_length, enabled=perf.trim_text_padding and on_cpu)
    clear_cache = getattr(model, "clear_cache", None)
    if callable(clear_cache):
        clear_cache()  # features cached under the previous switches
    model.image_feature_cache = feature_cache


def apply_speedups(experiment: Experiment) -> None:
    """Set up the speed-ups of ``experiment.config.perf`` in place.

    Wraps every dataset in a decoded-image cache (``perf.decoded_image_cache``),
    sets the text switches on the classifiers, and attaches one
    :class:`ImageFeatureCache` to them (``perf.image_feature_cache``) holding every
    evaluation set, and the training sets when ``data.augment`` is false, since only
    then is their transform deterministic.
    """
    config = experiment.config
    perf = config.perf

    if perf.decoded_image_cache and perf.image_cache_mb > 0:
        budget = ImageMemoryBudget(perf.image_cache_mb * 2**20)
        experiment.client_train = [cache_decoded_images(dataset, budget) for dataset in experiment.client_train]
        experiment.eval_dataset = cache_decoded_images(experiment.eval_dataset, budget)
        if experiment.val_dataset is not None:
            experiment.val_dataset = cache_decoded_images(experiment.val_dataset, budget)
        experiment.heldout = {name: cache_decoded_images(d, budget) for name, d in experiment.heldout.items()}
        if experiment.new_eval_dataset is not None:
            experiment.new_eval_dataset = cache_decoded_images(experiment.new_eval_dataset, budget)
        experiment.image_memory_budget = budget

    feature_cache = ImageFeatureCache(config.eval.batch_size) if perf.image_feature_cache else None
    if feature_cache is not None:
        evaluation_sets = [experiment.eval_dataset, experiment.val_dataset, experiment.new_eval_dataset,
                           *experiment.heldout.values()]
        for dataset in evaluation_sets:
            if dataset is not None:
                feature_cache.register(dataset)
        if not config.data.augment:
            for dataset in experiment.client_train:
                feature_cache.register(dataset)
    for model in (experiment.model, experiment.new_model):
        if model is not None:
            configure_classifier(model, perf, feature_cache)

    logger.info(
        "Speed-ups: text feature cache %s, text padding trim %s, image feature cache %s (%s), decoded-image cache %s",
        _on_off(perf.text_feature_cache), _on_off(perf.trim_text_padding), _on_off(perf.image_feature_cache),
        "image encoder frozen" if image_features_frozen(experiment.model) else "not used: the image encoder trains",
        f"up to {perf.image_cache_mb} MiB" if perf.decoded_image_cache and perf.image_cache_mb > 0 else "off",
    )


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"
