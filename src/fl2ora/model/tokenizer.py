"""CLIP's byte-pair tokenizer built offline from the vocabulary that open_clip ships.

``transformers.CLIPTokenizer`` normally reads ``vocab.json`` and ``merges.txt`` from a
model folder. The same BPE merges ship inside the ``open-clip-torch`` package
(``bpe_simple_vocab_16e6.txt.gz``, MIT licence), and OpenAI's CLIP derives the vocabulary
from them: the 256 byte symbols, the same symbols with ``</w>``, one token per merge,
then the start and end tokens (49,408 in all).
"""

from __future__ import annotations

import functools
import gzip
import logging
from importlib import resources

from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

VOCAB_SIZE = 49408
"""Tokens in CLIP's vocabulary."""
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as GPT-2 and CLIP do."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


@functools.cache
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    bpe_file = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with bpe_file.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        lines = text.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # the first line is a version header

    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(
            f"open_clip's BPE file gave {len(vocab)} tokens, expected {VOCAB_SIZE}. "
            "Reinstall open-clip-torch."
        )
    return vocab, merges


def bundled_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Build CLIP's tokenizer without any download.

    Args:
        model_max_length: context length; CLIP uses 77.

    Returns:
        A ``transformers.CLIPTokenizer`` equal to OpenAI's CLIP tokenizer.
    """
    vocab, merges = _vocab_and_merges()
    pairs = [tuple(merge.split()) for merge in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length)
