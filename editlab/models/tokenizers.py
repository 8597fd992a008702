"""Tokenizers that can be built offline.

`char_tokenizer()` is a CLIP tokenizer whose vocabulary is the 256 byte-level characters (with and without the
end-of-word marker) and no merges, so every character is one token and distinct words get distinct ids. Tiny test
models and full-size random-weight architectures use it, since the real CLIP vocabulary lives on the hub.
`word_tokenizer(words)` adds merges to that vocabulary so that every given word is one token (the toy world's).
`t5_char_tokenizer()` is T5's counterpart (a unigram model over printable ASCII characters and the word-start mark),
for the T5 encoders of tiny and random-weight SD3 / FLUX models. `qwen_char_tokenizer()` is Qwen2's counterpart,
with the chat and vision markers Qwen-Image's prompt templates use, for its Qwen2.5-VL encoder.
"""

from __future__ import annotations

import math
from typing import Iterable

from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_MAX_LENGTH = 77


def _byte_vocab() -> dict[str, int]:
    """CLIP's start and end tokens, then the 256 byte-level characters, then each with the end-of-word marker."""
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    return vocab


def char_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=model_max_length)


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge loop: repeatedly join the adjacent pair of lowest rank."""
    while len(parts) > 1:
        pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def word_tokenizer(words: Iterable[str], model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A `CLIPTokenizer` in which every word of `words` is one token.

    The vocabulary keeps CLIP's byte-level characters (so an unknown word still tokenizes, letter by letter) and
    adds merges word by word: while the current merges split a word, the first two of its pieces are merged. A merge
    appended later never changes the split of a word already whole, since BPE applies lower-ranked merges first.
    """
    vocab = _byte_vocab()
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        while len(parts := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=model_max_length)


def t5_char_tokenizer() -> T5Tokenizer:
    """A `T5Tokenizer` (T5's ids: padding 0, end 1, unknown 2) whose pieces are the word-start mark and the printable
    ASCII characters, all equally likely: every character is one token, a word is its mark and its letters, any
    other character is unknown. No sentinel tokens (only T5's pre-training uses them)."""
    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *map(chr, range(ord("!"), ord("~") + 1))]
    return T5Tokenizer(vocab=[(piece, -1.0) for piece in pieces], extra_ids=0)


QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>")  # Qwen2.5-VL's chat and vision markers


def qwen_char_tokenizer() -> Qwen2Tokenizer:
    """A byte-level `Qwen2Tokenizer` without merges (every byte one token) plus ``<|endoftext|>`` (its padding and
    end) and `QWEN_SPECIAL_TOKENS`, each one token, so that the processor expands ``<|image_pad|>`` per image patch
    as with the real vocabulary."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for token in ("<|endoftext|>", *QWEN_SPECIAL_TOKENS):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tokenizer
