"""Guidance: how a guided prediction is made, one object for every editor, trainer and the toy build.

Three kinds, the distinction between model families as much as between methods:

- ``cfg``: two-pass classifier-free guidance, the rows [uncond x B, cond x B] in one network call. A call whose
  rows are all unguided costs one pass over the conditional rows (SD, SDXL; SD3 later).
- ``embedded``: the scale is an input of the network (a guidance-distilled UNet's w-embedding; FLUX-dev's
  ``guidance`` later), one pass for any mix of scales per row.
- ``none``: the conditional prediction (step-distilled models, unguided passes).

Two units of the scale are in use, and each is computed in its own form because the two round differently:
``classic`` u + s (c - u), where s = 1 is unguided (SD's ``guidance_scale``), and ``code`` c + w (c - u), where
w = 0 is unguided (the LCM / iCD offset, w = s - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from editlab.models.conditioning import Conditioning

KINDS = ("cfg", "embedded", "none")
UNGUIDED = {"classic": 1.0, "code": 0.0}  # the scale that means "no guidance", per unit

# (x [B, C, h, w], t, cond, **network inputs) -> the native prediction, fp32 [B, C, h, w]
Predict = Callable[..., torch.Tensor]


def combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor,
            units: str = "classic") -> torch.Tensor:
    """The guided prediction from its two branches (scale a float or broadcastable against them)."""
    if units == "classic":
        return uncond + scale * (cond - uncond)
    return cond + scale * (cond - uncond)


def guidance_embedding(w: torch.Tensor, dim: int = 512, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A guidance-distilled UNet's w input: the sinusoidal embedding of 1000 w, frequencies exp(-j ln(1e4) /
    (dim/2 - 1)), sin half first: [B] -> [B, dim]. At w = 0 it is [0]*256 + [1]*256, not the zero vector."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=w.device) / (half - 1))
    angles = 1000.0 * w.to(torch.float64)[:, None] * freqs[None]  # [B, half]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)


def _as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


def _expand_rows(uncond: Conditioning, rows: int, like: Conditioning) -> Conditioning:
    """The unconditional branch (1 or ``rows`` rows) as ``rows`` rows in the dtypes of ``like``."""
    text = uncond.text.to(like.text.dtype).expand(rows, *uncond.text.shape[1:])
    added = None if like.added is None else {
        k: uncond.added[k].expand(rows, *v.shape[1:]).to(v) for k, v in like.added.items()}
    return Conditioning(text, added)


@dataclass(frozen=True)
class Guidance:
    """A guided prediction ``guidance(x, t, cond, scale)`` of a ``predict`` function (a model's native prediction).

    ``uncond``: the unconditional branch of ``cfg`` (a call may pass its own, e.g. Null-Text Inversion's
    per-step embedding). ``embed``: for ``embedded``, the scale per row [B] -> the network's extra inputs.
    """

    predict: Predict
    kind: str = "cfg"
    units: str = "classic"
    uncond: Conditioning | None = None
    embed: Callable[[torch.Tensor], dict[str, Any]] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown guidance kind {self.kind!r}; expected one of {KINDS}")
        if self.units not in UNGUIDED:
            raise ValueError(f"unknown guidance units {self.units!r}; expected one of {tuple(UNGUIDED)}")
        if self.kind == "embedded" and self.embed is None:
            raise ValueError("embedded guidance needs the network's scale input (embed)")

    @property
    def unguided(self) -> float:
        return UNGUIDED[self.units]

    def needs_uncond(self, scale: float | torch.Tensor) -> bool:
        """Whether a call at ``scale`` runs the unconditional rows too (``cfg``, some row guided)."""
        return self.kind == "cfg" and bool((torch.as_tensor(scale) != self.unguided).any())

    def __call__(self, x: torch.Tensor, t: Any, cond: Conditioning | torch.Tensor, scale: float | torch.Tensor,
                 uncond: Conditioning | torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, h, w], t (int or [B]), cond B rows, scale a float or one per row [B] -> prediction [B, C, h, w]."""
        cond, rows = _as_conditioning(cond), x.shape[0]
        if self.kind == "embedded":
            scales = torch.as_tensor(scale, dtype=torch.float32, device=x.device).expand(rows)
            return self.predict(x, t, cond, **self.embed(scales))
        if not self.needs_uncond(scale):
            return self.predict(x, t, cond)
        uncond = self.uncond if uncond is None else _as_conditioning(uncond)
        if uncond is None:
            raise ValueError("classifier-free guidance needs the unconditional branch (uncond)")
        both = Conditioning.cat([_expand_rows(uncond, rows, cond), cond])  # [uncond x B, cond x B]
        t_both = t.repeat(2) if isinstance(t, torch.Tensor) and t.ndim else t
        pred_uncond, pred_cond = self.predict(torch.cat([x, x]), t_both, both).chunk(2)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(pred_cond.device, pred_cond.dtype).view(-1, *([1] * (x.ndim - 1)))
        return combine(pred_uncond, pred_cond, scale, self.units)


def unet_predict(unet, dtype: torch.dtype | None = None) -> Predict:
    """A diffusers UNet's noise prediction in fp32; inputs cast to ``dtype`` (None: as given, e.g. under
    autocast)."""

    def predict(x: torch.Tensor, t: Any, cond: Conditioning, **inputs: Any) -> torch.Tensor:
        text = cond.text
        if dtype is not None:
            x, text = x.to(dtype), text.to(dtype)
        if cond.added is not None:
            inputs = {"added_cond_kwargs": cond.added, **inputs}
        return unet(x, torch.as_tensor(t, device=x.device), encoder_hidden_states=text, **inputs).sample.float()

    return predict


def embedded_kind(unet) -> str:
    """``embedded`` when the UNet has a w input (``time_cond_proj_dim``: a guidance-distilled UNet), else ``cfg``."""
    return "embedded" if unet.config.get("time_cond_proj_dim") else "cfg"


def unet_guidance(unet, kind: str | None = None, uncond: Conditioning | torch.Tensor | None = None,
                  dtype: torch.dtype | None = None, units: str = "code") -> Guidance:
    """Guidance of a raw UNet (the trainers', iCD's and the toy guidance chain's), code units by default; ``kind``
    None picks ``embedded`` for a UNet with a w input, else ``cfg``."""
    kind = kind or embedded_kind(unet)
    embed = None
    if kind == "embedded":
        if not unet.config.get("time_cond_proj_dim"):
            raise ValueError("embedded guidance needs a UNet with time_cond_proj_dim (a guidance-distilled UNet)")
        proj = unet.time_embedding.cond_proj

        def embed(w: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"timestep_cond": guidance_embedding(w, proj.in_features, dtype or proj.weight.dtype)}
    if kind == "cfg" and uncond is None:
        raise ValueError("cfg guidance of a UNet needs the empty-prompt conditioning (uncond)")
    uncond = None if uncond is None else _as_conditioning(uncond)
    return Guidance(unet_predict(unet, dtype), kind, units, uncond, embed)
