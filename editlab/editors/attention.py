"""Attention control on a denoiser's attention sites: processors through which a controller reads and edits the
attention probabilities (Prompt-to-Prompt's `editors.p2p.P2PController`, Pix2Pix-Zero's guidance).

A controller has two methods, called by every processor `controlled_attention` installs:
- ``needs_probs(is_cross, queries) -> bool``: whether it needs this layer's probabilities at the current step; a
  layer none of whose maps are needed runs the fused scaled-dot-product kernel;
- ``__call__(probs, is_cross, layer) -> probs``: probs [B * heads, Q, K] (batch-major rows, Q image queries, K the
  text tokens when ``is_cross``, else the image tokens); returns them, possibly edited.

The processor is chosen per site kind:
- UNet self- and cross-attention (`ControlledAttnProcessor`): the layer's probabilities are the map.
- MM-DiT joint attention (SD3's `JointTransformerBlock`; `JointControlledAttnProcessor`): one softmax over the joint
  sequence [image tokens ; text tokens] (diffusers' order). The controller sees the rows of the image queries: their
  text-key columns as the cross-attention map, their image-key columns as the self-attention map. They are slices of
  the joint softmax (a cross map's row sums to less than one), and the text queries' rows are never shown to it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """[B, L, heads * d] -> [B, heads, L, d]"""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


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
        query, key, value = (_heads(attn, x) for x in (query, key, value))  # [B, h, L, d]
        if attn.norm_q is not None:  # qk-norm (SD3.5's image-only attention), as diffusers' processor
            query, key = attn.norm_q(query), attn.norm_k(key)

        if self.controller.needs_probs(self.is_cross, query.shape[2]):
            probs = attn.get_attention_scores(query.flatten(0, 1), key.flatten(0, 1), attention_mask)  # [B*h, Q, K]
            probs = self.controller(probs, self.is_cross, self.layer)
            hidden_states = torch.bmm(probs, value.flatten(0, 1)).unflatten(0, (batch_size, -1))  # [B, h, Q, d]
        else:
            if attention_mask is not None:
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)  # [B, Q, h*d]

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointControlledAttnProcessor:
    """MM-DiT joint attention over [image ; text] tokens whose image-query maps the controller may read and replace:
    the text-key slice as cross-attention, the image-key slice as self-attention; fused SDPA when it needs neither.
    Returns (image, text) outputs like diffusers' `JointAttnProcessor2_0`."""

    def __init__(self, controller, layer: str):
        self.controller = controller
        self.layer = layer

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states, attention_mask=None):
        # 1. projections per head, image tokens then text tokens (diffusers' order): [B, h, N + T, d]
        batch, n = hidden_states.shape[:2]
        query, key, value = (_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        text = [_heads(attn, proj(encoder_hidden_states)) for proj in (attn.add_q_proj, attn.add_k_proj,
                                                                         attn.add_v_proj)]
        if attn.norm_q is not None:  # qk-norm of each stream (SD3.5)
            query, key = attn.norm_q(query), attn.norm_k(key)
            text[:2] = attn.norm_added_q(text[0]), attn.norm_added_k(text[1])
        query, key, value = (torch.cat([x, t], dim=2) for x, t in zip((query, key, value), text))

        # 2. attention; SD3 passes no mask (diffusers' joint processor ignores one too)
        wants_cross, wants_self = (self.controller.needs_probs(is_cross, n) for is_cross in (True, False))
        if wants_cross or wants_self:
            probs = attn.get_attention_scores(query.flatten(0, 1), key.flatten(0, 1))  # [B*h, N+T, N+T]
            image_keys, text_keys = probs[:, :n, :n], probs[:, :n, n:]  # the image queries' rows
            if wants_self:
                image_keys = self.controller(image_keys, False, self.layer)  # [B*h, N, N]
            if wants_cross:
                text_keys = self.controller(text_keys, True, self.layer)  # [B*h, N, T]
            probs = torch.cat([torch.cat([image_keys, text_keys], dim=2), probs[:, n:]], dim=1)
            hidden_states = torch.bmm(probs, value.flatten(0, 1)).unflatten(0, (batch, -1))  # [B, h, N+T, d]
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)  # [B, N+T, h*d]

        # 3. split the streams, output projections (the last block, context_pre_only, ends the text stream unprojected)
        hidden_states, encoder_hidden_states = hidden_states[:, :n], hidden_states[:, n:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](hidden_states)), encoder_hidden_states


@contextlib.contextmanager
def controlled_attention(denoiser, controller) -> Iterator[None]:
    """Install on every attention site of ``denoiser`` the controlled processor of its kind (joint: an attention with
    text projections of its own; else self- or cross-attention); restore the previous processors on exit."""
    previous = denoiser.attn_processors
    processors = {}
    for name in previous:  # processor "<layer>.processor" belongs to the Attention module "<layer>"
        layer = denoiser.get_submodule(name.removesuffix(".processor"))
        processors[name] = JointControlledAttnProcessor(controller, name) if layer.added_kv_proj_dim is not None \
            else ControlledAttnProcessor(controller, name, layer.is_cross_attention)
    if not any(isinstance(p, JointControlledAttnProcessor) or p.is_cross for p in processors.values()):
        raise RuntimeError("attention control found no attention layer with text keys in the denoiser")
    denoiser.set_attn_processor(processors)
    try:
        yield
    finally:
        denoiser.set_attn_processor(previous)
