"""CLIP's encoders run block by block, so prompt learners can feed and replace tokens.

Hugging Face's ``CLIPTextModel`` only accepts token ids, and ``CLIPVisionModel`` has no
slot for extra tokens. Prompt learning (CoOp, KgCoOp, MaPLe) needs both: the text
encoder must start from learned embeddings, and MaPLe replaces prompt tokens inside
the first J blocks of each encoder. The functions here reuse the models' own
embedding, mask, block and layer-norm modules, so without prompts they compute what
the models' ``forward`` computes (the tests check this against ``pooler_output``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel
from transformers.masking_utils import create_causal_mask

logger = logging.getLogger(__name__)


def _check_prompt_list(
    prompts: list[torch.Tensor], num_layers: int, width: int, n_ctx: int, side: str
) -> None:
    if len(prompts) > num_layers - 1:
        raise ValueError(
            f"Got {len(prompts)} deep {side} prompts, but a {num_layers}-block encoder takes at most "
            f"{num_layers - 1} (blocks 1 to {num_layers - 1}). Use a smaller prompt depth."
        )
    for index, prompt in enumerate(prompts):
        if prompt.shape != (n_ctx, width):
            raise ValueError(
                f"Deep {side} prompt {index} has shape {tuple(prompt.shape)}, expected ({n_ctx}, {width}) "
                f"(n_ctx tokens of the encoder's width)."
            )


def encode_text_from_embeddings(
    text_model: CLIPTextModel,
    inputs_embeds: torch.Tensor,
    eos_positions: torch.Tensor,
    deep_prompts: list[torch.Tensor] | None = None,
    prompt_start: int = 1,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run CLIP's text encoder on token embeddings and pool the end-of-text features.

    The steps are those of ``CLIPTextModel.forward``: add position embeddings, build
    the causal mask with ``create_causal_mask``, run the blocks, apply
    ``final_layer_norm`` and take the features at each end-of-text token. The blocks
    run one at a time so that, before block ``i`` (1 <= i <= len(deep_prompts)), the
    n_ctx tokens from ``prompt_start`` on are replaced by ``deep_prompts[i - 1]``
    (MaPLe's deep text prompts). Block 0 receives ``inputs_embeds`` unchanged.

    Args:
        text_model: the CLIP text encoder (``clip.text_model``).
        inputs_embeds: (B, L, W) float token embeddings, L <= max_position_embeddings.
        eos_positions: (B,) int64 index of each sequence's end-of-text token.
        deep_prompts: optional list of (n_ctx, W) prompts for blocks 1, 2, ...
        prompt_start: position of the first prompt token; 1 is right after the
            start-of-text token.
        attention_mask: optional (B, L) padding mask, as for ``CLIPTextModel``. The
            causal mask already hides every token after the end-of-text token, so
            the pooled features do not depend on it.

    Returns:
        (B, W) pooled features, before ``text_projection``.

    Raises:
        ValueError: on inconsistent shapes, positions outside the sequence, or more
            deep prompts than the encoder has blocks after block 0.
    """
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be (B, L, W), got shape {tuple(inputs_embeds.shape)}.")
    batch, length, width = inputs_embeds.shape
    if eos_positions.shape != (batch,):
        raise ValueError(f"eos_positions must have shape ({batch},), got {tuple(eos_positions.shape)}.")
    if batch and not (0 <= int(eos_positions.min()) and int(eos_positions.max()) < length):
        raise ValueError(f"eos_positions must lie in [0, {length}), got {eos_positions.tolist()}.")
    layers = text_model.encoder.layers
    deep_prompts = list(deep_prompts or [])
    if deep_prompts:
        n_ctx = deep_prompts[0].shape[0]
        _check_prompt_list(deep_prompts, len(layers), width, n_ctx, "text")
        if not (0 <= prompt_start and prompt_start + n_ctx <= length):
            raise ValueError(
                f"Prompt tokens [{prompt_start}, {prompt_start + n_ctx}) do not fit in sequences of length {length}."
            )

    hidden = text_model.embeddings(inputs_embeds=inputs_embeds)  # (B, L, W), position embeddings added
    mask = create_causal_mask(config=text_model.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None)

    for index, layer in enumerate(layers):
        if 1 <= index <= len(deep_prompts):
            prompt = deep_prompts[index - 1].to(hidden.dtype).expand(batch, -1, -1)
            n_ctx = prompt.shape[1]
            hidden = torch.cat(
                [hidden[:, :prompt_start], prompt, hidden[:, prompt_start + n_ctx :]], dim=1
            )  # (B, L, W)
        # is_causal=True as CLIPTextModel passes it: SDPA then applies the causal mask itself
        # when create_causal_mask returned None.
        hidden = layer(hidden, mask, is_causal=True)

    hidden = text_model.final_layer_norm(hidden)
    return hidden[torch.arange(batch, device=hidden.device), eos_positions.to(hidden.device)]  # (B, W)


def encode_image_with_prompts(
    vision_model: CLIPVisionModel,
    pixel_values: torch.Tensor,
    shallow_prompt: torch.Tensor | None = None,
    deep_prompts: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run CLIP's vision encoder with learnable tokens after the patch tokens.

    As in MaPLe's vision transformer, ``shallow_prompt`` is appended after the patch
    tokens once the position embeddings are added (so it has none) and before
    ``pre_layrnorm``. Before block ``i`` (1 <= i <= len(deep_prompts)) those last
    n_ctx tokens are replaced by ``deep_prompts[i - 1]``; later blocks keep the
    tokens the previous block produced. Without prompts this equals
    ``vision_model(pixel_values).pooler_output``.

    Args:
        vision_model: the CLIP vision encoder (``clip.vision_model``).
        pixel_values: (N, 3, H, W) float images at the model's image size.
        shallow_prompt: optional (n_ctx, Wv) tokens appended before block 0.
        deep_prompts: optional list of (n_ctx, Wv) tokens for blocks 1, 2, ...;
            needs ``shallow_prompt``.

    Returns:
        (N, Wv) ``post_layernorm`` of the class token, before ``visual_projection``.

    Raises:
        ValueError: on deep prompts without a shallow prompt, wrong prompt shapes,
            or more deep prompts than the encoder has blocks after block 0.
    """
    deep_prompts = list(deep_prompts or [])
    layers = vision_model.encoder.layers
    width = vision_model.config.hidden_size
    if deep_prompts and shallow_prompt is None:
        raise ValueError(
            "Deep vision prompts replace the tokens appended at block 0, so they need a shallow_prompt as well."
        )
    if shallow_prompt is not None:
        if shallow_prompt.dim() != 2 or shallow_prompt.shape[1] != width:
            raise ValueError(
                f"shallow_prompt must be (n_ctx, {width}) for this vision encoder, got {tuple(shallow_prompt.shape)}."
            )
        _check_prompt_list(deep_prompts, len(layers), width, shallow_prompt.shape[0], "vision")

    hidden = vision_model.embeddings(pixel_values)  # (N, 1 + P, Wv)
    batch = hidden.shape[0]
    n_ctx = 0
    if shallow_prompt is not None:
        n_ctx = shallow_prompt.shape[0]
        prompt = shallow_prompt.to(hidden.dtype).expand(batch, -1, -1)
        hidden = torch.cat([hidden, prompt], dim=1)  # (N, 1 + P + n_ctx, Wv)
    hidden = vision_model.pre_layrnorm(hidden)

    for index, layer in enumerate(layers):
        if 1 <= index <= len(deep_prompts):
            prompt = deep_prompts[index - 1].to(hidden.dtype).expand(batch, -1, -1)
            hidden = torch.cat([hidden[:, : hidden.shape[1] - n_ctx], prompt], dim=1)
        hidden = layer(hidden, None)

    return vision_model.post_layernorm(hidden[:, 0])  # (N, Wv)


@dataclass
class ClassPromptTokens:
    """The fixed parts of the class prompts ``[SOS] ctx_1 .. ctx_M {class name}. [EOS]``.

    The M context positions are left out: a prompt learner puts its learned vectors
    between ``prefix`` and ``suffix``.
    """

    prefix: torch.Tensor
    """(C, 1, W) embedding of the start-of-text token."""
    suffix: torch.Tensor
    """(C, L - 1 - M, W) embeddings after the context: class name, '.', end-of-text, padding."""
    eos_positions: torch.Tensor
    """(C,) int64 position of each prompt's end-of-text token."""
    input_ids: torch.Tensor
    """(C, L) int64 token ids of the tokenized prompts."""


def embed_phrase(text_model: CLIPTextModel, tokenizer: CLIPTokenizer, phrase: str) -> torch.Tensor:
    """Return the token embeddings (T, W) of ``phrase`` without start and end tokens."""
    ids = tokenizer(phrase, add_special_tokens=False, return_tensors="pt")["input_ids"][0]  # (T,)
    embedding = text_model.embeddings.token_embedding
    with torch.no_grad():
        return embedding(ids.to(embedding.weight.device)).detach()


def embed_class_prompts(
    text_model: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    classnames: list[str],
    context_text: str,
    n_ctx: int,
) -> ClassPromptTokens:
    """Tokenize ``"{context_text} {classname}."`` per class and split off the context positions.

    This is how CoOp and MaPLe build their prompts: ``context_text`` is ``"X X .. X"``
    for random context vectors or the initial phrase, and the ``n_ctx`` tokens after
    the start-of-text token are the ones a learner replaces. Underscores in class
    names become spaces, as in :func:`fl2ora.model.zero_shot.format_prompts`.

    Raises:
        ValueError: when a prompt is too long for the context length, so its class
            name or end-of-text token would be cut off.
    """
    context_length = text_model.config.max_position_embeddings
    prompts = [f"{context_text} {name.replace('_', ' ')}." for name in classnames]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]  # with start and end tokens
    too_long = [(prompt, n) for prompt, n in zip(prompts, lengths) if n > context_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompt(s) do not fit in {context_length} tokens, e.g. {too_long[0][0][:80]!r} "
            f"({too_long[0][1]} tokens). Use fewer context tokens or shorter class names."
        )
    tokens = tokenizer(prompts, padding="max_length", max_length=context_length, return_tensors="pt")
    input_ids = tokens["input_ids"]  # (C, L)

    # The tokenizer pads with the end-of-text token, so the first occurrence is the real one
    # (CLIPTextModel pools the same way).
    eos_positions = (input_ids == tokenizer.eos_token_id).int().argmax(dim=-1)  # (C,)
    if bool((eos_positions <= n_ctx).any()):
        raise ValueError(f"The context {context_text!r} tokenizes to fewer than n_ctx={n_ctx} tokens.")

    embedding = text_model.embeddings.token_embedding
    with torch.no_grad():
        embedded = embedding(input_ids.to(embedding.weight.device)).detach()  # (C, L, W)
    return ClassPromptTokens(
        prefix=embedded[:, :1],
        suffix=embedded[:, 1 + n_ctx :],
        eos_positions=eos_positions,
        input_ids=input_ids,
    )


class TextFeatureCache:
    """Class text features reused across evaluation batches while the parameters stay unchanged.

    Features are recomputed on every call in training mode or with gradients
    enabled. Otherwise they are cached and recomputed when any parameter's version
    counter (``Tensor._version``, increased by every in-place update such as an
    optimizer step or ``load_state_dict``) has changed since.
    """

    def __init__(self) -> None:
        self._features: torch.Tensor | None = None
        self._key: tuple[tuple[int, int], ...] | None = None

    def clear(self) -> None:
        """Forget the cached features."""
        self._features = None
        self._key = None

    def get(
        self, compute: Callable[[], torch.Tensor], parameters: Iterable[nn.Parameter], training: bool
    ) -> torch.Tensor:
        """Return ``compute()``, or the cached result when it is still valid."""
        if training or torch.is_grad_enabled():
            self.clear()
            return compute()
        key = tuple((id(p), p._version) for p in parameters)
        if self._features is None or key != self._key:
            self._features = compute()
            self._key = key
        return self._features
