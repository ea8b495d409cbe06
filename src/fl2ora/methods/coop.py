"""CoOp, PromptFL and KgCoOp: learned context vectors in front of each class name.

- CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022)
  replaces the hand-written words of the prompt with M learned vectors in CLIP's
  token-embedding space: ``[SOS] ctx_1 .. ctx_M {class name} . [EOS]`` (the class
  token at the end, CoOp's "end" position). CLIP stays frozen.
- PromptFL (Guo et al., "PromptFL: Let Federated Participants Cooperatively Learn
  Prompts Instead of Models", 2023) is CoOp trained with FedAvg: only the
  context vectors are trained and sent, which is what the federated core does with
  this module.
- KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context
  Optimization", CVPR 2023) is CoOp plus a loss that keeps the learned class text
  features close to those of the hand-written prompt: :meth:`regularization_loss`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from fl2ora.errors import ConfigError
from fl2ora.model.text_encoder import (
    TextFeatureCache,
    embed_class_prompts,
    embed_phrase,
    encode_text_from_embeddings,
)
from fl2ora.model.zero_shot import format_prompts, text_dropout_active

logger = logging.getLogger(__name__)

DEFAULT_N_CTX = 16
"""Context vectors of CoOp with random initialisation."""
KGCOOP_WEIGHT = 8.0
"""KgCoOp's lambda in its paper and released configuration."""
_INIT_STD = 0.02


@dataclass
class CoOpSettings:
    """Context vectors of CoOp, PromptFL and KgCoOp."""

    n_ctx: int | None = None
    """Number of context vectors M. ``None`` means 16 with random initialisation and
    the phrase's token count with a phrase. A number given together with a phrase
    must equal the phrase's token count (checked when the classifier is built)."""
    class_specific: bool = False
    """One set of context vectors per class (CoOp's CSC) instead of one shared set.
    With a phrase, every class starts from the phrase's embeddings."""
    init: str = "random"
    """``random`` (normal, std 0.02) or a phrase such as ``a photo of a`` whose token
    embeddings become the initial context vectors."""
    kgcoop_weight: float = 0.0
    """KgCoOp's lambda: weight of the squared distance between learned and
    hand-written class text features. 0 is plain CoOp. KgCoOp uses 8.0."""

    def __post_init__(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ConfigError(f"coop.n_ctx must be >= 1 or null, got {self.n_ctx!r}. CoOp uses 16.")
        if not self.init.strip():
            raise ConfigError("coop.init must be 'random' or a non-empty phrase such as 'a photo of a', got ''.")
        if not self.kgcoop_weight >= 0:
            raise ConfigError(
                f"coop.kgcoop_weight must be >= 0, got {self.kgcoop_weight!r}. Use 0 for CoOp, 8.0 for KgCoOp."
            )

    @classmethod
    def kgcoop(cls) -> CoOpSettings:
        """Return KgCoOp's released setting: 4 context vectors from "a photo of a", lambda 8."""
        return cls(init="a photo of a", kgcoop_weight=KGCOOP_WEIGHT)


def _resolve_context(
    settings: CoOpSettings, clip: CLIPModel, tokenizer: CLIPTokenizer
) -> tuple[int, str, torch.Tensor | None]:
    """Return (n_ctx, text placed at the context positions, phrase embeddings or None)."""
    if settings.init == "random":
        n_ctx = settings.n_ctx or DEFAULT_N_CTX
        return n_ctx, " ".join(["X"] * n_ctx), None
    phrase = settings.init.replace("_", " ")
    vectors = embed_phrase(clip.text_model, tokenizer, phrase)  # (T, W)
    if settings.n_ctx is not None and settings.n_ctx != vectors.shape[0]:
        raise ConfigError(
            f"coop.init={settings.init!r} has {vectors.shape[0]} tokens but coop.n_ctx={settings.n_ctx}. "
            f"Set coop.n_ctx to {vectors.shape[0]} or null, or use coop.init='random'."
        )
    return vectors.shape[0], phrase, vectors


class PromptLearnerClassifier(nn.Module):
    """CLIP with learned context vectors in every class prompt (CoOp, PromptFL, KgCoOp).

    The prompts are built as CoOp builds them: ``"X X .. X {classname}."`` (or the
    initial phrase in place of the X's) is tokenized without a template, and the
    M tokens after the start-of-text token are replaced by the context vectors
    ``ctx``. Every CLIP parameter is frozen, so ``ctx`` is the only trainable
    tensor. Logits are ``exp(logit_scale) * cos(image, text) / tau``, as in
    :class:`fl2ora.model.zero_shot.ZeroShotClassifier`, including its
    ``cache_text_features`` and ``trim_text_padding`` attributes.

    Args:
        clip: the CLIP model, frozen in place.
        tokenizer: CLIP tokenizer.
        classnames: readable class names, C of them.
        settings: context size, sharing, initialisation and KgCoOp weight.
        template: the dataset's hand-written prompt with one ``{}``; used only for
            KgCoOp's reference features (``kgcoop_weight > 0``).
        tau: softmax temperature, > 0.
        seed: seed of the random context initialisation; the caller's random state
            is left untouched.

    Raises:
        ValueError: on an invalid ``tau`` or template, a phrase whose token count
            differs from ``settings.n_ctx``, or prompts longer than the context length.
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: CLIPTokenizer,
        classnames: list[str],
        settings: CoOpSettings | None = None,
        template: str = "a photo of a {}.",
        tau: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}. The study uses 1.0.")
        settings = settings or CoOpSettings()
        self.clip = clip
        self.tau = tau
        self.settings = settings
        self.classnames = list(classnames)
        self.template = template
        hand_prompts = format_prompts(template, self.classnames)  # validates the template
        for parameter in clip.parameters():
            parameter.requires_grad_(False)

        # Context vectors are fp32 whatever CLIP's dtype. Random ones are drawn on the CPU,
        # so the seed gives the same values on every device.
        n_ctx, context_text, phrase_vectors = _resolve_context(settings, clip, tokenizer)
        width = clip.config.text_config.hidden_size
        shape = (self.num_classes, n_ctx, width) if settings.class_specific else (n_ctx, width)
        device = clip.text_model.embeddings.token_embedding.weight.device
        if phrase_vectors is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                ctx = torch.randn(shape) * _INIT_STD
        else:
            ctx = phrase_vectors.float().expand(shape).clone()
        self.ctx = nn.Parameter(ctx.to(device))
        self.n_ctx = n_ctx

        tokens = embed_class_prompts(clip.text_model, tokenizer, self.classnames, context_text, n_ctx)
        self.register_buffer("token_prefix", tokens.prefix, persistent=False)  # (C, 1, W)
        self.register_buffer("token_suffix", tokens.suffix, persistent=False)  # (C, L - 1 - M, W)
        self.register_buffer("eos_positions", tokens.eos_positions.to(device), persistent=False)  # (C,)

        # KgCoOp's reference: frozen CLIP's features of the hand-written prompts, computed once.
        self.register_buffer("hand_text_features", None, persistent=False)  # (C, D) when KgCoOp is on
        if settings.kgcoop_weight > 0:
            context_length = clip.config.text_config.max_position_embeddings
            hand = tokenizer(
                hand_prompts, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt"
            )
            with torch.no_grad():
                output = clip.text_model(
                    input_ids=hand["input_ids"].to(device), attention_mask=hand["attention_mask"].to(device)
                )
                features = F.normalize(clip.text_projection(output.pooler_output), dim=-1)  # (C, D)
            self.hand_text_features = features.float()

        self._text_cache = TextFeatureCache()
        self._last_text_features: torch.Tensor | None = None
        self.cache_text_features = True
        self.trim_text_padding = False
        self._prompt_length = int(tokens.eos_positions.max()) + 1  # longest prompt, tokens
        logger.info(
            "CoOp context: %d %s vectors of width %d, init %r, KgCoOp weight %s, %d classes",
            n_ctx, "class-specific" if settings.class_specific else "shared", width, settings.init,
            settings.kgcoop_weight, self.num_classes,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def text_is_trainable(self) -> bool:
        return True

    def clear_cache(self) -> None:
        """Forget cached text features, so the next forward recomputes them."""
        self._text_cache.clear()
        self._last_text_features = None

    def prompt_embeddings(self) -> torch.Tensor:
        """Return the class prompts in token-embedding space, (C, L, W)."""
        ctx = self.ctx.to(self.token_prefix.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.num_classes, -1, -1)  # (C, M, W)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)

    def encode_text(self) -> torch.Tensor:
        """Return the L2-normalised class text features, (C, D)."""
        embeddings = self.prompt_embeddings()  # (C, L, W)
        if self.trim_text_padding and not (self.training and text_dropout_active(self.clip)):
            embeddings = embeddings[:, : self._prompt_length]
        pooled = encode_text_from_embeddings(self.clip.text_model, embeddings, self.eos_positions)
        return F.normalize(self.clip.text_projection(pooled), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised image features (N, D) for ``pixel_values: (N, 3, H, W)``."""
        output = self.clip.vision_model(pixel_values=pixel_values)
        return F.normalize(self.clip.visual_projection(output.pooler_output), dim=-1)

    def class_text_features(self) -> torch.Tensor:
        """Return the class text features (C, D), cached during evaluation."""
        if self.cache_text_features:
            features = self._text_cache.get(self.encode_text, self.parameters(), self.training)
        else:
            features = self.encode_text()
        if torch.is_grad_enabled():
            self._last_text_features = features  # reused by regularization_loss in the same step
        return features

    def classify_features(self, image: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, C) for L2-normalised image features ``image: (N, D)``."""
        text = self.class_text_features().to(image.dtype)  # (C, D)
        scale = self.clip.logit_scale.exp() / self.tau
        return scale * image @ text.t()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, C) for images (N, 3, H, W)."""
        return self.classify_features(self.encode_image(pixel_values))

    def regularization_loss(self) -> torch.Tensor | None:
        """Return KgCoOp's term, or None when ``kgcoop_weight`` is 0.

        ``lambda * mean_c ||t_c - h_c||^2`` with t_c the learned and h_c the
        hand-written class text features, both L2-normalised, as in KgCoOp's
        paper. It reuses the text features of the last forward with gradients,
        or computes them when there was none.

        NOTE: KgCoOp's released code adds ``lambda * (1 - mean_c cos(t_c, h_c))``,
        which is half of this term for unit vectors, so its lambda of 8 matches
        ``kgcoop_weight=4`` here.
        """
        if self.settings.kgcoop_weight == 0:
            return None
        text = self._last_text_features
        self._last_text_features = None
        if text is None:
            text = self.encode_text()
        squared_distance = (text.float() - self.hand_text_features).pow(2).sum(dim=-1)  # (C,)
        return self.settings.kgcoop_weight * squared_distance.mean()
