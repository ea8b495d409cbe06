"""Image features computed once and reused while the image encoder is frozen.

Prompt learners (CoOp, PromptFL, KgCoOp) and zero-shot CLIP never change the image
encoder, yet a plain loop runs it on every batch of every round: for ViT-B it is
most of a CoOp step and all of an evaluation. :class:`ImageFeatureCache` keeps the
L2-normalised image features ``(N, D)`` of each registered dataset, computed on the
first request, and both :func:`fl2ora.federated.client.client_update` and
:func:`fl2ora.evaluation.evaluate.predict_probabilities` use them in place of the
images when the classifier provides ``classify_features``.

A dataset may only be registered when its transform is deterministic (evaluation
transforms, or training without augmentation): the cache returns the same features
for every epoch.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl2ora.federated.client import autocast_context

logger = logging.getLogger(__name__)


@dataclass
class CachedFeatures:
    """The image features of one dataset, in dataset order."""

    features: torch.Tensor
    """(N, D) float32 L2-normalised image features, on the device they were computed on."""
    labels: torch.Tensor
    """(N,) int64 labels, on the same device."""
    key: tuple
    """Image-encoder parameter versions, device and precision the features were computed with."""


def image_encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters that image features depend on: CLIP's vision model and visual projection."""
    clip = model.clip
    return [*clip.vision_model.parameters(), *clip.visual_projection.parameters()]


def image_features_frozen(model: nn.Module) -> bool:
    """Return whether ``model``'s image features depend on no trainable tensor.

    True only for classifiers whose logits are a function of ``encode_image``'s
    output (they provide ``classify_features``) and whose image-encoder parameters
    all have ``requires_grad`` false. MaPLe has no ``classify_features`` because its
    image features depend on its learned prompts.
    """
    if not callable(getattr(model, "classify_features", None)) or not hasattr(model, "clip"):
        return False
    return not any(p.requires_grad for p in image_encoder_parameters(model))


def _vision_dropout(model: nn.Module) -> float:
    config = model.clip.config.vision_config
    return float(getattr(config, "attention_dropout", 0.0) or 0.0) + float(getattr(config, "dropout", 0.0) or 0.0)


class ImageFeatureCache:
    """Image features of registered datasets, valid while the image encoder is unchanged.

    Entries are keyed by dataset object (weakly, so a dropped dataset frees its
    features) and recomputed when an image-encoder parameter changed in place
    (``Tensor._version``), or the device or precision differs.

    Args:
        batch_size: images per forward pass while computing features.
    """

    def __init__(self, batch_size: int = 128) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}. Try eval.batch_size, 128.")
        self.batch_size = batch_size
        self._registered: weakref.WeakSet[Dataset] = weakref.WeakSet()
        self._entries: weakref.WeakKeyDictionary[Dataset, CachedFeatures] = weakref.WeakKeyDictionary()
        self.computed = 0
        """Datasets whose features were computed so far (recomputations included)."""

    def register(self, dataset: Dataset) -> None:
        """Allow caching ``dataset``, whose transform must be deterministic."""
        self._registered.add(dataset)

    def is_registered(self, dataset: Dataset) -> bool:
        return dataset in self._registered

    def nbytes(self) -> int:
        """Return the memory held by cached features and labels, in bytes."""
        return sum(e.features.nbytes + e.labels.nbytes for e in self._entries.values())

    def clear(self) -> None:
        """Forget every cached feature; registrations stay."""
        self._entries.clear()

    def lookup(
        self,
        model: nn.Module,
        dataset: Dataset,
        device: torch.device,
        precision: str = "fp32",
        training: bool = False,
    ) -> CachedFeatures | None:
        """Return the features of ``dataset``, computing them on a miss, or None when they cannot be reused.

        None means the caller runs the image encoder itself: the dataset is not
        registered, the model's image features depend on trainable tensors, or
        (``training=True``) the image encoder has dropout, so its training-mode
        features are random.
        """
        if len(dataset) == 0 or not self.is_registered(dataset) or not image_features_frozen(model):
            return None
        if training and _vision_dropout(model) > 0:
            return None
        key = (tuple((id(p), p._version) for p in image_encoder_parameters(model)), str(device), precision)
        entry = self._entries.get(dataset)
        if entry is None or entry.key != key:
            entry = self._compute(model, dataset, device, precision, key)
            self._entries[dataset] = entry
        return entry

    @torch.no_grad()
    def _compute(
        self, model: nn.Module, dataset: Dataset, device: torch.device, precision: str, key: tuple
    ) -> CachedFeatures:
        was_training = model.training
        model.eval()
        features, labels = [], []
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
        # A DataLoader draws its base seed from the global generator. Forking it keeps the
        # caller's seeded sequence (LoRA dropout) as it would be without the cache.
        try:
            with torch.random.fork_rng(devices=[]):
                for images, batch_labels in loader:
                    with autocast_context(device, precision):
                        chunk = model.encode_image(images.to(device, non_blocking=True))  # (B, D)
                    features.append(chunk.float())
                    labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
        finally:
            model.train(was_training)
        self.computed += 1
        result = CachedFeatures(
            features=torch.cat(features), labels=torch.cat(labels).to(device), key=key
        )
        logger.debug("Cached image features %s of %d images", tuple(result.features.shape), len(dataset))
        return result
