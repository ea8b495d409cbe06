"""Block-by-block CLIP encoders: equality with Hugging Face's forward, prompt placement, the feature cache."""

from __future__ import annotations

import pytest
import torch

from fl2ora.config import ModelConfig
from fl2ora.model.backbone import load_backbone
from fl2ora.model.text_encoder import (
    TextFeatureCache,
    embed_class_prompts,
    embed_phrase,
    encode_image_with_prompts,
    encode_text_from_embeddings,
)

PROMPTS = ["a photo of a airplane.", "a photo of a sea turtle.", "itap of a dog.", "x"]
EOS_ID = 49407


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(ModelConfig(name="tiny", random_init=True, init_seed=0))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (N, 3, H, W)


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def first_eos(input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first end-of-text token per row, by a Python scan."""
    return torch.tensor([row.tolist().index(EOS_ID) for row in input_ids])


def capture_block_inputs(layers) -> tuple[list[torch.Tensor], list]:
    """Record the hidden states entering each block."""
    inputs: list[torch.Tensor] = [None] * len(layers)
    handles = []
    for index, layer in enumerate(layers):
        def hook(module, args, index=index):
            inputs[index] = args[0].detach().clone()
        handles.append(layer.register_forward_pre_hook(hook))
    return inputs, handles


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_text_matches_pooler_output(attention, with_mask):
    clip = load_backbone(ModelConfig(name="tiny", random_init=True, init_seed=3))
    clip.model.set_attn_implementation(attention)
    text_model = clip.model.text_model
    input_ids, attention_mask = tokenize(clip.tokenizer, PROMPTS)

    with torch.no_grad():
        expected = text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (B, W)
        embeds = text_model.embeddings.token_embedding(input_ids)  # (B, L, W)
        actual = encode_text_from_embeddings(
            text_model, embeds, first_eos(input_ids), attention_mask=attention_mask if with_mask else None
        )

    assert actual.shape == (len(PROMPTS), 64)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_text_shorter_sequences_match(backbone):
    """A sequence shorter than 77 gets the first L position embeddings, as in CLIPTextModel."""
    text_model = backbone.model.text_model
    tokens = backbone.tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = text_model(input_ids=tokens["input_ids"]).pooler_output
        embeds = text_model.embeddings.token_embedding(tokens["input_ids"])
        actual = encode_text_from_embeddings(text_model, embeds, first_eos(tokens["input_ids"]))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_deep_text_prompts_replace_tokens(backbone):
    text_model = backbone.model.text_model
    input_ids, _ = tokenize(backbone.tokenizer, PROMPTS)
    generator = torch.Generator().manual_seed(1)
    deep = [torch.randn(2, 64, generator=generator) for _ in range(2)]  # blocks 1 and 2
    embeds = text_model.embeddings.token_embedding(input_ids).detach()
    inputs, handles = capture_block_inputs(text_model.encoder.layers)
    try:
        with torch.no_grad():
            prompted = encode_text_from_embeddings(text_model, embeds, first_eos(input_ids), deep_prompts=deep)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        plain = encode_text_from_embeddings(text_model, embeds, first_eos(input_ids))

    # Block 0 receives token plus position embeddings. Blocks 1 and 2 receive the prompts at positions 1 and 2.
    positions = text_model.embeddings.position_embedding.weight[:77].detach()
    torch.testing.assert_close(inputs[0], embeds + positions)
    for block in (1, 2):
        for row in range(len(PROMPTS)):
            assert torch.equal(inputs[block][row, 1:3], deep[block - 1])
    # Block 3 keeps what block 2 computed at those positions.
    assert not torch.allclose(inputs[3][0, 1:3], deep[1])
    assert not torch.allclose(prompted, plain)


def test_image_matches_pooler_output(backbone, pixels):
    vision_model = backbone.model.vision_model
    with torch.no_grad():
        expected = vision_model(pixel_values=pixels).pooler_output
        actual = encode_image_with_prompts(vision_model, pixels)
    assert actual.shape == (3, 64)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_shallow_vision_prompt_matches_appended_tokens(backbone, pixels):
    """Appending tokens before pre_layrnorm and running Hugging Face's encoder gives the same CLS features."""
    vision_model = backbone.model.vision_model
    prompt = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embedded = vision_model.embeddings(pixels)  # (N, 1 + P, W)
        sequence = torch.cat([embedded, prompt.expand(3, -1, -1)], dim=1)
        hidden = vision_model.encoder(inputs_embeds=vision_model.pre_layrnorm(sequence)).last_hidden_state
        expected = vision_model.post_layernorm(hidden[:, 0])
        actual = encode_image_with_prompts(vision_model, pixels, shallow_prompt=prompt)
        plain = encode_image_with_prompts(vision_model, pixels)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(actual, plain, atol=1e-4)


def test_deep_vision_prompts_replace_last_tokens(backbone, pixels):
    vision_model = backbone.model.vision_model
    generator = torch.Generator().manual_seed(4)
    shallow = torch.randn(2, 64, generator=generator)
    deep = [torch.randn(2, 64, generator=generator) for _ in range(2)]
    num_patches = (32 // 8) ** 2
    inputs, handles = capture_block_inputs(vision_model.encoder.layers)
    try:
        with torch.no_grad():
            encode_image_with_prompts(vision_model, pixels, shallow_prompt=shallow, deep_prompts=deep)
    finally:
        for handle in handles:
            handle.remove()

    for block_input in inputs:
        assert block_input.shape == (3, 1 + num_patches + 2, 64)
    with torch.no_grad():
        normalised_shallow = vision_model.pre_layrnorm(shallow)  # LayerNorm acts on each token alone
    for row in range(3):
        torch.testing.assert_close(inputs[0][row, -2:], normalised_shallow)
        assert torch.equal(inputs[1][row, -2:], deep[0])
        assert torch.equal(inputs[2][row, -2:], deep[1])
    assert not torch.allclose(inputs[3][0, -2:], deep[1])


def test_embed_class_prompts_layout(backbone):
    tokens = embed_class_prompts(backbone.model.text_model, backbone.tokenizer, ["sea_turtle", "dog"], "X X X", 3)
    reference_ids, _ = tokenize(backbone.tokenizer, ["X X X sea turtle.", "X X X dog."])
    reference = backbone.model.text_model.embeddings.token_embedding(reference_ids).detach()
    assert torch.equal(tokens.input_ids, reference_ids)
    assert torch.equal(tokens.prefix, reference[:, :1])
    assert torch.equal(tokens.suffix, reference[:, 4:])
    # [SOS] X X X sea turtle . [EOS] and [SOS] X X X dog . [EOS]
    assert tokens.eos_positions.tolist() == [7, 6]


def test_embed_phrase_tokens(backbone):
    vectors = embed_phrase(backbone.model.text_model, backbone.tokenizer, "a photo of a")
    ids = torch.tensor([320, 1125, 539, 320])  # CLIP's BPE ids of "a", "photo", "of", "a"
    assert torch.equal(vectors, backbone.model.text_model.embeddings.token_embedding.weight[ids].detach())


def test_text_feature_cache_reuse():
    parameter = torch.nn.Parameter(torch.ones(2))
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return parameter.detach() * 2

    cache = TextFeatureCache()
    with torch.no_grad():
        cache.get(compute, [parameter], training=False)
        cache.get(compute, [parameter], training=False)
        assert len(calls) == 1
        parameter.add_(1.0)  # an in-place update, like an optimizer step
        result = cache.get(compute, [parameter], training=False)
        assert len(calls) == 2
        assert result.tolist() == [4.0, 4.0]
        cache.get(compute, [parameter], training=True)
        cache.get(compute, [parameter], training=True)
        assert len(calls) == 4
        cache.clear()
        cache.get(compute, [parameter], training=False)
        assert len(calls) == 5
    cache.get(compute, [parameter], training=False)  # gradients enabled: never cached
    assert len(calls) == 6


INVALID_TEXT_CALLS = [
    # (description, kwargs builder, message)
    ("2-D embeddings", lambda e, p: {"inputs_embeds": e[0], "eos_positions": p}, r"must be \(B, L, W\)"),
    ("eos shape", lambda e, p: {"inputs_embeds": e, "eos_positions": p[:1]}, "eos_positions must have shape"),
    ("eos outside", lambda e, p: {"inputs_embeds": e, "eos_positions": p + 77}, r"must lie in \[0, 77\)"),
    (
        "too many deep prompts",
        lambda e, p: {"inputs_embeds": e, "eos_positions": p, "deep_prompts": [torch.zeros(2, 64)] * 4},
        "takes at most 3",
    ),
    (
        "deep prompt width",
        lambda e, p: {"inputs_embeds": e, "eos_positions": p, "deep_prompts": [torch.zeros(2, 32)]},
        r"expected \(2, 64\)",
    ),
    (
        "deep prompt past the end",
        lambda e, p: {"inputs_embeds": e, "eos_positions": p, "deep_prompts": [torch.zeros(2, 64)], "prompt_start": 76},
        "do not fit",
    ),
]


@pytest.mark.parametrize("description,build,message", INVALID_TEXT_CALLS, ids=[c[0] for c in INVALID_TEXT_CALLS])
def test_invalid_text_inputs_rejected(backbone, description, build, message):
    embeds = torch.zeros(2, 77, 64)
    eos = torch.tensor([5, 6])
    with pytest.raises(ValueError, match=message):
        encode_text_from_embeddings(backbone.model.text_model, **build(embeds, eos))


INVALID_IMAGE_CALLS = [
    # (description, shallow prompt, deep prompts, message)
    ("deep without shallow", None, [torch.zeros(2, 64)], "need a shallow_prompt"),
    ("shallow width", torch.zeros(2, 32), None, r"must be \(n_ctx, 64\)"),
    ("shallow 1-D", torch.zeros(64), None, r"must be \(n_ctx, 64\)"),
    ("deep count", torch.zeros(2, 64), [torch.zeros(2, 64)] * 4, "takes at most 3"),
    ("deep length", torch.zeros(2, 64), [torch.zeros(3, 64)], r"expected \(2, 64\)"),
]


@pytest.mark.parametrize(
    "description,shallow,deep,message", INVALID_IMAGE_CALLS, ids=[c[0] for c in INVALID_IMAGE_CALLS]
)
def test_invalid_image_prompts_rejected(backbone, pixels, description, shallow, deep, message):
    with pytest.raises(ValueError, match=message):
        encode_image_with_prompts(backbone.model.vision_model, pixels, shallow_prompt=shallow, deep_prompts=deep)


def test_too_long_prompt_rejected(backbone):
    with pytest.raises(ValueError, match="do not fit in 77 tokens"):
        embed_class_prompts(backbone.model.text_model, backbone.tokenizer, ["dog"], " ".join(["X"] * 80), 80)
