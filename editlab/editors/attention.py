"""Attention control on a denoiser's attention layers: processors through which a controller reads and edits the
attention probabilities (Prompt-to-Prompt's `editors.p2p.P2PController`, Pix2Pix-Zero's guidance).

A controller has two methods, called by every processor `controlled_attention` installs:
- ``needs_probs(is_cross, queries) -> bool``: whether it needs this layer's probabilities at the current step; a
  layer whose maps are not needed runs the fused scaled-dot-product kernel;
- ``__call__(probs, is_cross, layer) -> probs``: probs [B * heads, Q, K] (batch-major rows, Q image queries, K the
  text tokens when ``is_cross``, else the image tokens); returns them, possibly edited.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class ControlledAttnProcessor:
    """Stock attention whose probabilities the controller may read and replace; fused SDPA when it needs none."""

    def __init__(self, controller, layer: str, is_cross: bool):
        self.controller = controller
        self.layer = layer
        self.is_cross = is_cross

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, kv_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # [B, Q, h*d]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        if self.controller.needs_probs(self.is_cross, query.shape[1]):
            query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))  # [B*h, L, d]
            probs = attn.get_attention_scores(query, key, attention_mask)  # [B*h, Q, K]
            probs = self.controller(probs, self.is_cross, self.layer)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        else:
            heads = attn.heads
            query, key, value = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (query, key, value))
            if attention_mask is not None:
                attention_mask = attention_mask.view(batch_size, heads, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=attn.scale)
            hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def controlled_attention(unet, controller) -> Iterator[None]:
    """Install `ControlledAttnProcessor` on every attention layer of ``unet``; restore the previous ones on exit."""
    previous = unet.attn_processors
    modules = dict(unet.named_modules())  # processor "<layer>.processor" belongs to the Attention module "<layer>"
    processors = {name: ControlledAttnProcessor(controller, name,
                                                modules[name.removesuffix(".processor")].is_cross_attention)
                  for name in previous}
    if not processors or not any(p.is_cross for p in processors.values()):
        raise RuntimeError("Prompt-to-Prompt found no cross-attention layers in the UNet")
    unet.set_attn_processor(processors)
    try:
        yield
    finally:
        unet.set_attn_processor(previous)
