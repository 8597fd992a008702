"""The toy world's text side, shared by the teacher's text encoder and the CLIP's text tower: token ids of the
word-level tokenizer and a small `CLIPTextConfig`."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTokenizer

MAX_LENGTH = 24  # the longest toy caption has 20 words; SD uses 77
BOS, EOS = 0, 1  # the word tokenizer's start and end ids; the end token also pads


def token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """[N, 24] int64, padded with the end token as `Components.encode_prompts` does."""
    return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def text_config(vocab_size: int, hidden: int, layers: int, heads: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=MAX_LENGTH, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=EOS, hidden_act="quick_gelu", **extra,
    )
