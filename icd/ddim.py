"""DDIM math shared by inversion, editing, iCD training and tests.

Notation: ``abar_t`` is the cumulative product of (1 - beta) at train timestep t (diffusers' ``alphas_cumprod``).
For an epsilon-prediction model, the DDIM jump from t to s (either direction) is

    J(x; t -> s; eps) = sqrt(abar_s) * (x - sqrt(1 - abar_t) * eps) / sqrt(abar_t) + sqrt(1 - abar_s) * eps
"""

from __future__ import annotations

import torch


def ddim_jump(x: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor | float, abar_to: torch.Tensor | float):
    """Move ``x`` from noise level ``abar_from`` to ``abar_to`` along the DDIM (eta = 0) path given ``eps``.

    ``abar_to = 1`` is the hard boundary: it returns the clean prediction x0.
    """
    abar_from = torch.as_tensor(abar_from, dtype=x.dtype, device=x.device)
    abar_to = torch.as_tensor(abar_to, dtype=x.dtype, device=x.device)
    x0 = (x - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * eps


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, offset: int = 0) -> list[int]:
    """Descending DDIM grid ``[T - stride + offset, ..., offset]``; 50 steps, offset 0 gives 980, 960, ..., 0.

    Prompt-to-Prompt / Null-Text Inversion / PIE-Bench run offset 0 (not the ``steps_offset=1`` of SD's config).
    """
    stride = num_train_timesteps // num_steps
    return [t + offset for t in range(num_train_timesteps - stride, -1, -stride)][:num_steps]


def abar_at(alphas_cumprod: torch.Tensor, t: int, final: float | torch.Tensor) -> torch.Tensor:
    """``abar_t``, or ``final`` for t < 0 (DDIM's value one stride before the first train step)."""
    return alphas_cumprod[t] if t >= 0 else torch.as_tensor(final, dtype=alphas_cumprod.dtype)


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the classic scale: scale 1 is the plain conditional prediction."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
