"""CLIP zero-shot classification head: class text features from prompts, cosine logits."""

from __future__ import annotations

import logging
import string

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from fl2ora.model.text_encoder import TextFeatureCache

logger = logging.getLogger(__name__)


def format_prompts(template: str, classnames: list[str]) -> list[str]:
    """Fill the prompt template with each class name.

    >>> format_prompts("a photo of a {}.", ["airplane", "sea turtle"])
    ['a photo of a airplane.', 'a photo of a sea turtle.']

    Raises:
        ValueError: when the template does not have exactly one ``{}`` placeholder.
    """
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError:  # an unmatched brace
        fields = None
    # An escaped "{{}}" contains no placeholder and would give every class the same prompt.
    if fields != [""]:
        raise ValueError(f"Prompt template {template!r} must have exactly one '{{}}' placeholder for the class name, e.g. 'a photo of a {{}}.'")
    return [template.format(name.replace("_", " ")) for name in classnames]


def text_dropout_active(clip: CLIPModel) -> bool:
    """Return whether CLIP's text encoder draws dropout masks in training mode.

    True when it has an ``nn.Dropout`` with p > 0 (LoRA dropout injected by peft)
    or attention dropout. Cutting the padding of such an encoder changes the shape
    of the masks and so which random numbers each kept token gets.
    """
    if float(getattr(clip.config.text_config, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in clip.text_model.modules())


class ZeroShotClassifier(nn.Module):
    """CLIP with a frozen hand-written prompt per class.

    ``logits = exp(logit_scale) * cos(image, text) / tau``. When no text-encoder
    parameter is trainable, the class text features are computed once and reused
    until :meth:`clear_cache` is called (the federated core calls it whenever it
    loads new trainable weights). When text parameters train, evaluation computes
    them once per change of those parameters instead of once per batch.

    Attributes:
        cache_text_features: reuse class text features as described above; False
            recomputes them on every forward (``perf.text_feature_cache``).
        trim_text_padding: run the text encoder only up to the longest prompt's
            end-of-text token (``perf.trim_text_padding``); the causal mask hides
            the cut positions, so features change by float rounding only. Not
            applied in training mode while :func:`text_dropout_active`, because
            the dropout masks would then differ.

    Args:
        clip: the CLIP model (possibly with adapters injected).
        tokenizer: CLIP tokenizer.
        classnames: readable class names, C of them.
        template: prompt with one ``{}``, such as ``"a photo of a {}."``.
        tau: softmax temperature, > 0.
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: CLIPTokenizer,
        classnames: list[str],
        template: str,
        tau: float = 1.0,
    ) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}. The study uses 1.0.")
        self.clip = clip
        self.tau = tau
        self.classnames = list(classnames)
        self.prompts = format_prompts(template, self.classnames)
        context_length = clip.config.text_config.max_position_embeddings
        tokens = tokenizer(
            self.prompts, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt"
        )
        self.register_buffer("input_ids", tokens["input_ids"], persistent=False)  # (C, L)
        self.register_buffer("attention_mask", tokens["attention_mask"], persistent=False)  # (C, L)
        self._text_cache: torch.Tensor | None = None
        self._trainable_text_cache = TextFeatureCache()
        self.cache_text_features = True
        self.trim_text_padding = False
        self._prompt_length = int(tokens["attention_mask"].sum(dim=1).max())  # longest prompt, tokens

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def text_is_trainable(self) -> bool:
        return any(p.requires_grad for p in self.clip.text_model.parameters()) or any(
            p.requires_grad for p in self.clip.text_projection.parameters()
        )

    def clear_cache(self) -> None:
        """Forget cached text features, so the next forward recomputes them."""
        self._text_cache = None
        self._trainable_text_cache.clear()

    def encode_text(self, repeats: int = 1) -> torch.Tensor:
        """Return the L2-normalised class text features, ``(repeats * C, D)``.

        With ``repeats`` > 1 the text encoder runs on the prompts repeated that many
        times, in one pass (batched clients: one copy per client's adapter).
        """
        input_ids, attention_mask = self.input_ids, self.attention_mask
        if self.trim_text_padding and not (self.training and text_dropout_active(self.clip)):
            input_ids, attention_mask = input_ids[:, : self._prompt_length], attention_mask[:, : self._prompt_length]
        if repeats != 1:
            input_ids, attention_mask = input_ids.repeat(repeats, 1), attention_mask.repeat(repeats, 1)
        output = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        features = self.clip.text_projection(output.pooler_output)  # (repeats * C, D)
        return F.normalize(features, dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised image features ``(N, D)`` for ``pixel_values: (N, 3, H, W)``."""
        output = self.clip.vision_model(pixel_values=pixel_values)
        features = self.clip.visual_projection(output.pooler_output)  # (N, D)
        return F.normalize(features, dim=-1)

    def class_text_features(self) -> torch.Tensor:
        """Return the class text features ``(C, D)``, reused as the class docstring describes."""
        if not self.cache_text_features:
            return self.encode_text()
        if self.text_is_trainable():
            text_parameters = [*self.clip.text_model.parameters(), *self.clip.text_projection.parameters()]
            return self._trainable_text_cache.get(self.encode_text, text_parameters, self.training)
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self.encode_text()
        return self._text_cache

    def classify_features(self, image: torch.Tensor) -> torch.Tensor:
        """Return class logits ``(N, C)`` for L2-normalised image features ``image: (N, D)``."""
        return self.cosine_logits(image, self.class_text_features())

    def cosine_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Return ``exp(logit_scale) / tau * image @ text.T``, ``(N, C)``, for normalised ``(N, D)`` and ``(C, D)``."""
        text = text.to(image.dtype)
        scale = self.clip.logit_scale.exp() / self.tau
        return scale * image @ text.t()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return class logits ``(N, C)`` for images ``(N, 3, H, W)``."""
        return self.classify_features(self.encode_image(pixel_values))
