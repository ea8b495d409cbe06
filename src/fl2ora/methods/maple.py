"""MaPLe: multi-modal prompts coupled from the text side to the vision side.

Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023. The text encoder
gets n_ctx learned context vectors after the start-of-text token (block 0) and a
fresh set of learned deep prompts before each block 1 .. J-1. The vision encoder
gets n_ctx tokens after the patch tokens before blocks 0 .. J-1, each produced from
the text prompt of the same block by a linear coupling function
``nn.Linear(W_text, W_vision)``: ``proj`` for block 0 and
``compound_prompt_projections[i - 1]`` for block i, as in MaPLe's released code.
CLIP stays frozen; the context vectors, the deep text prompts and the coupling
layers are trained.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from fl2ora.errors import ConfigError
from fl2ora.model.text_encoder import (
    TextFeatureCache,
    embed_class_prompts,
    embed_phrase,
    encode_image_with_prompts,
    encode_text_from_embeddings,
)
from fl2ora.model.zero_shot import text_dropout_active

logger = logging.getLogger(__name__)

_INIT_STD = 0.02


@dataclass
class MaPLeSettings:
    """Prompt length, depth and initialisation of MaPLe (defaults: MaPLe's ViT-B/16 setting)."""

    n_ctx: int = 2
    """Prompt tokens per block and per encoder."""
    depth: int = 9
    """Prompt depth J: blocks 0 .. J-1 of both encoders get prompts. J must not exceed
    either encoder's number of blocks."""
    init: str = "a photo of a"
    """``random`` (normal, std 0.02) or a phrase. As in MaPLe, the first n_ctx tokens
    of the phrase initialise the context vectors and the phrase's remaining tokens
    stay in every prompt as fixed words: with n_ctx 2, the prompt is
    ``[SOS] ctx_1 ctx_2 of a {class name}. [EOS]``."""

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ConfigError(f"maple.n_ctx must be >= 1, got {self.n_ctx!r}. MaPLe uses 2.")
        if self.depth < 1:
            raise ConfigError(f"maple.depth must be >= 1, got {self.depth!r}. MaPLe uses 9, and 1 puts prompts in block 0 only.")
        if not self.init.strip():
            raise ConfigError("maple.init must be 'random' or a non-empty phrase such as 'a photo of a', got ''.")


class MaPLePrompts(NamedTuple):
    """The prompts of one forward pass."""

    text: torch.Tensor
    """(C, L, W_text) class prompts in token-embedding space, context included."""
    deep_text: list[torch.Tensor]
    """J-1 tensors (n_ctx, W_text) for text blocks 1 .. J-1."""
    vision: torch.Tensor
    """(n_ctx, W_vision) tokens appended before vision block 0."""
    deep_vision: list[torch.Tensor]
    """J-1 tensors (n_ctx, W_vision) for vision blocks 1 .. J-1."""


class MaPLeClassifier(nn.Module):
    """CLIP with MaPLe's coupled text and vision prompts.

    Logits are ``exp(logit_scale) * cos(image, text) / tau``, as in
    :class:`fl2ora.model.zero_shot.ZeroShotClassifier`, including its
    ``cache_text_features`` and ``trim_text_padding`` attributes. There is no
    ``classify_features``: the image features depend on the learned prompts, so
    they cannot be cached.

    Args:
        clip: the CLIP model, frozen in place.
        tokenizer: CLIP tokenizer.
        classnames: readable class names, C of them.
        settings: prompt length, depth and initialisation.
        tau: softmax temperature, > 0.
        seed: seed of the random initialisation of prompts and coupling layers;
            the caller's random state is left untouched.

    Raises:
        ValueError: on an invalid ``tau``, a depth larger than an encoder's number
            of blocks, a phrase shorter than n_ctx tokens, or prompts longer than
            the context length.
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: CLIPTokenizer,
        classnames: list[str],
        settings: MaPLeSettings | None = None,
        tau: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}. The study uses 1.0.")
        settings = settings or MaPLeSettings()
        text_config, vision_config = clip.config.text_config, clip.config.vision_config
        blocks = min(text_config.num_hidden_layers, vision_config.num_hidden_layers)
        if settings.depth > blocks:
            raise ConfigError(
                f"maple.depth={settings.depth} exceeds the encoders' blocks (text "
                f"{text_config.num_hidden_layers}, vision {vision_config.num_hidden_layers}). "
                f"Use maple.depth <= {blocks}."
            )
        self.clip = clip
        self.tau = tau
        self.settings = settings
        self.classnames = list(classnames)
        self.n_ctx = n_ctx = settings.n_ctx
        for parameter in clip.parameters():
            parameter.requires_grad_(False)

        text_width, vision_width = text_config.hidden_size, vision_config.hidden_size
        if settings.init == "random":
            context_text, phrase_vectors = " ".join(["X"] * n_ctx), None
        else:
            context_text = settings.init.replace("_", " ")
            phrase_vectors = embed_phrase(clip.text_model, tokenizer, context_text)  # (T, W_text)
            # NOTE: MaPLe's code silently falls back to random vectors when n_ctx > 4. Here the
            # phrase is always used and must have at least n_ctx tokens.
            if phrase_vectors.shape[0] < n_ctx:
                raise ConfigError(
                    f"maple.init={settings.init!r} has {phrase_vectors.shape[0]} tokens, fewer than "
                    f"maple.n_ctx={n_ctx}. Use a longer phrase, a smaller n_ctx or maple.init='random'."
                )

        # Random values are drawn on the CPU in fp32, so the seed gives the same values on every device.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if phrase_vectors is None:
                ctx = torch.randn(n_ctx, text_width) * _INIT_STD
            else:
                ctx = phrase_vectors[:n_ctx].float().clone()
            deep_text = [torch.randn(n_ctx, text_width) * _INIT_STD for _ in range(settings.depth - 1)]
            proj = nn.Linear(text_width, vision_width)
            # NOTE: as MaPLe's _get_clones, the deeper coupling layers are copies of one layer,
            # so they start with identical weights.
            template_layer = nn.Linear(text_width, vision_width)
            projections = [copy.deepcopy(template_layer) for _ in range(settings.depth - 1)]

        device = clip.text_model.embeddings.token_embedding.weight.device
        self.ctx = nn.Parameter(ctx.to(device))  # (n_ctx, W_text)
        self.compound_prompts_text = nn.ParameterList([nn.Parameter(p.to(device)) for p in deep_text])
        self.proj = proj.to(device)
        self.compound_prompt_projections = nn.ModuleList(projections).to(device)

        tokens = embed_class_prompts(clip.text_model, tokenizer, self.classnames, context_text, n_ctx)
        self.register_buffer("token_prefix", tokens.prefix, persistent=False)  # (C, 1, W_text)
        self.register_buffer("token_suffix", tokens.suffix, persistent=False)  # (C, L - 1 - n_ctx, W_text)
        self.register_buffer("eos_positions", tokens.eos_positions.to(device), persistent=False)  # (C,)

        self._text_cache = TextFeatureCache()
        self.cache_text_features = True
        self.trim_text_padding = False
        self._prompt_length = int(tokens.eos_positions.max()) + 1  # longest prompt, tokens
        logger.info(
            "MaPLe: %d prompt tokens in blocks 0-%d of both encoders, init %r, %d classes",
            n_ctx, settings.depth - 1, settings.init, self.num_classes,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def text_is_trainable(self) -> bool:
        return True

    def clear_cache(self) -> None:
        """Forget cached text features, so the next forward recomputes them."""
        self._text_cache.clear()

    def prompts(self) -> MaPLePrompts:
        """Build this step's text prompts and couple them to vision prompts."""
        ctx = self.ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(self.num_classes, -1, -1)  # (C, n_ctx, W)
        text = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (C, L, W_text)
        deep_text = list(self.compound_prompts_text)
        deep_vision = [layer(prompt) for layer, prompt in zip(self.compound_prompt_projections, deep_text)]
        return MaPLePrompts(text=text, deep_text=deep_text, vision=self.proj(self.ctx), deep_vision=deep_vision)

    def encode_text(self, prompts: MaPLePrompts | None = None) -> torch.Tensor:
        """Return the L2-normalised class text features, (C, D)."""
        if prompts is None:
            prompts = self.prompts()
        text = prompts.text  # (C, L, W)
        if self.trim_text_padding and not (self.training and text_dropout_active(self.clip)):
            text = text[:, : self._prompt_length]
        pooled = encode_text_from_embeddings(
            self.clip.text_model, text, self.eos_positions, deep_prompts=prompts.deep_text
        )
        return F.normalize(self.clip.text_projection(pooled), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor, prompts: MaPLePrompts | None = None) -> torch.Tensor:
        """Return L2-normalised image features (N, D) for ``pixel_values: (N, 3, H, W)``."""
        if prompts is None:
            prompts = self.prompts()
        pooled = encode_image_with_prompts(
            self.clip.vision_model, pixel_values, shallow_prompt=prompts.vision, deep_prompts=prompts.deep_vision
        )
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, C) for images (N, 3, H, W)."""
        prompts = self.prompts()
        image = self.encode_image(pixel_values, prompts)  # (N, D)
        if self.cache_text_features:
            text = self._text_cache.get(lambda: self.encode_text(prompts), self.parameters(), self.training)
        else:
            text = self.encode_text(prompts)
        scale = self.clip.logit_scale.exp() / self.tau
        return scale * image @ text.to(image.dtype).t()
