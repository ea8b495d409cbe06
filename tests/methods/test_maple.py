"""MaPLe: coupled prompts in both encoders, their placement, gradients, counts and invalid settings."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from fl2ora.config import ConfigError
from fl2ora.methods.maple import MaPLeClassifier, MaPLeSettings
from fl2ora.model.backbone import build_architecture
from fl2ora.model.tokenizer import bundled_clip_tokenizer
from fl2ora.model.trainable import trainable_state_dict

CLASSNAMES = ["airplane", "sea_turtle", "dog"]
TEXT_WIDTH, VISION_WIDTH = 64, 96  # different widths, so the coupling's output width is visible
NUM_PATCHES = (32 // 8) ** 2


def build_clip(seed: int = 0) -> CLIPModel:
    """The tiny architecture with a wider vision encoder (4 blocks each)."""
    config = build_architecture("tiny")
    config.vision_config.hidden_size = VISION_WIDTH
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config).eval()


@functools.cache
def tokenizer():
    return bundled_clip_tokenizer()


def build(settings: MaPLeSettings | None = None, **kwargs) -> MaPLeClassifier:
    return MaPLeClassifier(build_clip(), tokenizer(), CLASSNAMES, settings or MaPLeSettings(depth=3), **kwargs)


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def capture_block_inputs(layers) -> tuple[list[torch.Tensor | None], list]:
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for index, layer in enumerate(layers):
        def hook(module, args, index=index):
            inputs[index] = args[0].detach().clone()
        handles.append(layer.register_forward_pre_hook(hook))
    return inputs, handles


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b written out, independently of nn.Linear's forward."""
    return x @ layer.weight.t() + layer.bias


def test_default_settings_are_maple_vit_b16():
    settings = MaPLeSettings()
    assert (settings.n_ctx, settings.depth, settings.init) == (2, 9, "a photo of a")


def test_coupled_prompt_shapes():
    model = build(MaPLeSettings(depth=3))
    prompts = model.prompts()
    assert prompts.text.shape == (3, 77, TEXT_WIDTH)
    assert [tuple(p.shape) for p in prompts.deep_text] == [(2, TEXT_WIDTH)] * 2
    assert tuple(prompts.vision.shape) == (2, VISION_WIDTH)
    assert [tuple(p.shape) for p in prompts.deep_vision] == [(2, VISION_WIDTH)] * 2
    with torch.no_grad():
        torch.testing.assert_close(prompts.vision, linear(model.proj, model.ctx))
        for index in range(2):
            expected = linear(model.compound_prompt_projections[index], model.compound_prompts_text[index])
            torch.testing.assert_close(prompts.deep_vision[index], expected)


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_vision_prompts_enter_first_j_blocks(depth):
    model = build(MaPLeSettings(depth=depth))
    vision_layers = model.clip.vision_model.encoder.layers
    inputs, handles = capture_block_inputs(vision_layers)
    try:
        with torch.no_grad():
            model(images())
    finally:
        for handle in handles:
            handle.remove()

    with torch.no_grad():
        # Block 0: the coupled prompt after the patch tokens, through pre_layrnorm like every token.
        block0 = model.clip.vision_model.pre_layrnorm(linear(model.proj, model.ctx))
        deep = [
            linear(layer, prompt)
            for layer, prompt in zip(model.compound_prompt_projections, model.compound_prompts_text)
        ]
    injected = [block0] + deep  # what blocks 0 .. J-1 receive
    for block, block_input in enumerate(inputs):
        assert block_input.shape == (4, 1 + NUM_PATCHES + 2, VISION_WIDTH)
        last = block_input[:, -2:]  # (N, n_ctx, Wv)
        if block < depth:
            torch.testing.assert_close(last, injected[block].expand(4, -1, -1))
        else:  # past depth J the tokens are what the previous block computed
            assert not torch.allclose(last, injected[-1].expand(4, -1, -1))


def test_text_prompts_enter_first_j_blocks():
    model = build(MaPLeSettings(depth=3))
    text_model = model.clip.text_model
    inputs, handles = capture_block_inputs(text_model.encoder.layers)
    try:
        with torch.no_grad():
            model(images())
    finally:
        for handle in handles:
            handle.remove()

    positions = text_model.embeddings.position_embedding.weight[1:3].detach()
    for c in range(3):
        torch.testing.assert_close(inputs[0][c, 1:3], model.ctx.detach() + positions)
        assert torch.equal(inputs[1][c, 1:3], model.compound_prompts_text[0].detach())
        assert torch.equal(inputs[2][c, 1:3], model.compound_prompts_text[1].detach())
        assert not torch.allclose(inputs[3][c, 1:3], model.compound_prompts_text[1].detach())


def test_phrase_init_keeps_remaining_words():
    model = build(MaPLeSettings(n_ctx=2, depth=2, init="a photo of a"))
    token_embedding = model.clip.text_model.embeddings.token_embedding.weight.detach()
    # CLIP's BPE ids of "a" and "photo" are 320 and 1125: the first two tokens initialise ctx.
    assert torch.equal(model.ctx.detach(), token_embedding[[320, 1125]])
    ids = tokenizer()(["a photo of a airplane."], padding="max_length", max_length=77, return_tensors="pt")
    expected_suffix = token_embedding[ids["input_ids"][0, 3:]]  # "of a airplane ." EOS and padding
    assert torch.equal(model.token_suffix[0], expected_suffix)
    assert model.eos_positions.tolist()[0] == ids["input_ids"][0].tolist().index(49407)


def test_random_init_and_cloned_projections():
    model = build(MaPLeSettings(depth=4, init="random"))
    assert abs(model.ctx.std().item() - 0.02) < 0.01
    assert len(model.compound_prompt_projections) == 3
    first = model.compound_prompt_projections[0]
    for layer in model.compound_prompt_projections[1:]:
        assert torch.equal(layer.weight, first.weight)  # copies of one layer, as MaPLe's _get_clones
        assert layer.weight.data_ptr() != first.weight.data_ptr()  # but separate parameters
    assert not torch.equal(model.proj.weight, first.weight)
    again = build(MaPLeSettings(depth=4, init="random"))
    assert torch.equal(again.ctx, model.ctx)
    assert torch.equal(again.proj.weight, model.proj.weight)


def test_only_maple_parameters_get_gradients():
    model = build(MaPLeSettings(depth=3))
    model.train()
    labels = torch.tensor([0, 1, 2, 1])
    F.cross_entropy(model(images()), labels).backward()

    expected = {
        "ctx",
        "compound_prompts_text.0",
        "compound_prompts_text.1",
        "proj.weight",
        "proj.bias",
        "compound_prompt_projections.0.weight",
        "compound_prompt_projections.0.bias",
        "compound_prompt_projections.1.weight",
        "compound_prompt_projections.1.bias",
    }
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == expected
    assert with_grad == expected
    assert set(trainable_state_dict(model)) == expected
    assert model.text_is_trainable()


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_trainable_count_formula(depth):
    model = build(MaPLeSettings(n_ctx=3, depth=depth))
    n = 3
    expected = n * TEXT_WIDTH + (depth - 1) * n * TEXT_WIDTH + depth * (TEXT_WIDTH * VISION_WIDTH + VISION_WIDTH)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_logits_formula_and_cache():
    model = build(tau=2.0)
    model.eval()
    pixels = images()
    with torch.no_grad():
        prompts = model.prompts()
        image = model.encode_image(pixels, prompts)
        text = model.encode_text(prompts)
        logits = model(pixels)
        cached = model(pixels)
        model.ctx.add_(0.5)  # an in-place update invalidates the cached text features
        changed = model(pixels)
    torch.testing.assert_close(logits, model.clip.logit_scale.exp() * image @ text.t() / 2.0)
    assert torch.equal(cached, logits)
    assert not torch.allclose(changed, logits)
    assert torch.allclose(image.norm(dim=-1), torch.ones(4))
    assert model.num_classes == 3


INVALID_SETTINGS = [
    # (kwargs, message)
    ({"n_ctx": 0}, "maple.n_ctx must be >= 1"),
    ({"depth": 0}, "maple.depth must be >= 1"),
    ({"init": ""}, "maple.init must be 'random' or a non-empty phrase"),
]


@pytest.mark.parametrize("kwargs,message", INVALID_SETTINGS, ids=[m for _, m in INVALID_SETTINGS])
def test_invalid_settings_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MaPLeSettings(**kwargs)


INVALID_CLASSIFIERS = [
    # (settings, keyword arguments, message)
    (MaPLeSettings(), {}, r"maple.depth=9 exceeds the encoders' blocks \(text 4, vision 4\)"),
    (MaPLeSettings(depth=5), {}, "Use maple.depth <= 4"),
    (MaPLeSettings(depth=2, n_ctx=5, init="a photo of a"), {}, "has 4 tokens, fewer than maple.n_ctx=5"),
    (MaPLeSettings(depth=2, n_ctx=80, init="random"), {}, "do not fit in 77 tokens"),
    (MaPLeSettings(depth=2), {"tau": -1.0}, "tau must be > 0"),
]


@pytest.mark.parametrize("settings,kwargs,message", INVALID_CLASSIFIERS, ids=[c[2][:30] for c in INVALID_CLASSIFIERS])
def test_invalid_classifier_rejected(settings, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(settings, **kwargs)
