"""Prompt conditioning of the model families, one shape for all, for editing and training alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Conditioning:
    """Text conditioning of B rows: token embeddings ``text`` [B, L, D] and the family's other per-row inputs in
    ``added``, open by name (SDXL: ``text_embeds`` [B, P], ``time_ids`` [B, 6]; a T5 / pooled / ids family puts its
    own there). Indexing selects rows, as the losses do for the rows they jump."""

    text: torch.Tensor | None
    added: dict[str, torch.Tensor] | None = None

    def __getitem__(self, rows) -> "Conditioning":
        added = None if self.added is None else {k: v[rows] for k, v in self.added.items()}
        return Conditioning(self.text[rows], added)

    def __len__(self) -> int:
        return len(self.text)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """The rows of ``parts`` in order (e.g. CFG's [uncond, cond] batch)."""
        added = None if parts[0].added is None else {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.text for p in parts]), added)


def token_ids(tokenizer, prompts: list[str], length: int, device: torch.device) -> torch.Tensor:
    """The prompts' token ids [B, length], padded / truncated to ``length`` as diffusers' pipelines do (callers
    check the length first)."""
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_conditioning(prompts: list[str], encoders: Sequence[tuple], resolution: int, device: torch.device,
                        dtype: torch.dtype) -> Conditioning:
    """``encoders``: [(tokenizer, text encoder)], one pair for SD, two for SDXL. SD: the encoder's last hidden
    state. SDXL: both encoders' penultimate hidden states concatenated, the second's pooled projection and the size
    micro-conditioning (original = target = ``resolution``, no crop). Prompts are padded / truncated to each
    tokenizer's length (editors check the length first)."""
    hidden, out = [], None
    for tokenizer, encoder in encoders:
        out = encoder(token_ids(tokenizer, prompts, tokenizer.model_max_length, device),
                      output_hidden_states=len(encoders) > 1)
        hidden.append(out.hidden_states[-2] if len(encoders) > 1 else out[0])
    if len(encoders) == 1:
        return Conditioning(hidden[0].to(dtype))
    r = resolution
    time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=dtype).expand(len(prompts), -1)
    return Conditioning(torch.cat(hidden, dim=-1).to(dtype), {"text_embeds": out.text_embeds.to(dtype),
                                                               "time_ids": time_ids})


def unconditional(encode: Callable[[list[str]], Conditioning], zeros: bool) -> Conditioning:
    """CFG's unconditional branch: the encoded empty prompt, or with ``zeros`` (a pipeline's
    ``force_zeros_for_empty_prompt``: SDXL-family bases) zero token and pooled embeddings, as diffusers' SDXL
    pipelines and iCD-XL's training use; the size micro-conditioning stays."""
    empty = encode([""])
    if not zeros:
        return empty
    return Conditioning(torch.zeros_like(empty.text),
                        {**empty.added, "text_embeds": torch.zeros_like(empty.added["text_embeds"])})
