"""Tokenizers that can be built offline.

`char_tokenizer()` is a CLIP tokenizer whose vocabulary is the 256 byte-level characters (with and without the
end-of-word marker) and no merges, so every character is one token and distinct words get distinct ids. Tiny test
models and full-size random-weight architectures use it, since the real CLIP vocabulary lives on the hub.
"""

from __future__ import annotations

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_MAX_LENGTH = 77


def char_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in chars:
        vocab[char] = len(vocab)
    for char in chars:
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
