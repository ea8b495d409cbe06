"""Tests for fl2ora.model.tokenizer against open_clip's own CLIP tokenizer."""

from __future__ import annotations

import gzip
from importlib import resources

import open_clip
import pytest
import torch

from fl2ora.model.tokenizer import VOCAB_SIZE, bundled_clip_tokenizer

BOS, EOS = 49406, 49407

PROMPTS = [
    "a photo of a airplane.",
    "a photo of a sea turtle.",
    "Hello, World!! (really?)",
    "UPPER Case MiXeD",
    "multiple    spaces\tand\ttabs   here",
    "naïve café résumé",
    "日本語 テキスト",
    "emoji 🐢 turtle",
    "it's a dog's life; 3.14 - ok?",
    "a photo of a " + "very " * 100 + "long prompt.",  # truncated to 77 tokens
]


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_clip_tokenizer()


def test_vocabulary_size(tokenizer):
    assert VOCAB_SIZE == 49408
    assert len(tokenizer) == 49408
    assert len(tokenizer.get_vocab()) == 49408


def test_special_token_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|startoftext|>") == BOS
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == EOS
    assert tokenizer.bos_token_id == BOS
    assert tokenizer.eos_token_id == EOS
    assert tokenizer.model_max_length == 77


def test_vocabulary_matches_open_clip(tokenizer):
    reference = open_clip.tokenizer.SimpleTokenizer().encoder
    vocab = tokenizer.get_vocab()
    # open_clip 3 spells the special tokens <start_of_text> and <end_of_text>, with the same ids.
    assert reference.pop("<start_of_text>") == vocab.pop("<|startoftext|>") == BOS
    assert reference.pop("<end_of_text>") == vocab.pop("<|endoftext|>") == EOS
    assert vocab == reference


def test_merge_count_from_bpe_file():
    # OpenAI's CLIP uses the first 49,152 - 256 - 2 merges of the file, after its header line.
    bpe_file = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with bpe_file.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        merges = text.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    assert 256 * 2 + len(merges) + 2 == VOCAB_SIZE


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_open_clip(tokenizer, prompt):
    encoded = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    reference = open_clip.tokenize([prompt], context_length=77)[0]  # (77,), padded with 0
    ids = encoded["input_ids"][0]
    mask = encoded["attention_mask"][0].bool()
    length = int(mask.sum())

    assert ids.shape == (77,)
    # HF pads with <|endoftext|> and open_clip with 0, so only the unpadded part is compared.
    assert length == int((reference != 0).sum())
    assert torch.equal(ids[:length], reference[:length])
    assert mask[:length].all()
    assert ids[0] == BOS
    assert ids[length - 1] == EOS


def test_batch_padding_positions(tokenizer):
    encoded = tokenizer(PROMPTS[:3], padding="max_length", max_length=77, return_tensors="pt")
    reference = open_clip.tokenize(PROMPTS[:3])
    expected_mask = (reference != 0).long()
    assert torch.equal(encoded["attention_mask"], expected_mask)


def test_case_and_spaces_normalised(tokenizer):
    plain = tokenizer("a photo of a cat")["input_ids"]
    assert tokenizer("A PHOTO of a Cat")["input_ids"] == plain
    assert tokenizer("a   photo  of a\tcat")["input_ids"] == plain


def test_custom_context_length():
    short = bundled_clip_tokenizer(model_max_length=16)
    assert short.model_max_length == 16
    ids = short(PROMPTS[-1], truncation=True)["input_ids"]
    reference = open_clip.tokenize([PROMPTS[-1]], context_length=16)[0]
    assert ids == reference.tolist()
