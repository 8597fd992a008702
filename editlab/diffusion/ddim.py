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
    """Descending DDIM grid ``[(N - 1) * stride + offset, ..., offset]`` (diffusers' "leading" spacing, stride T // N);
    50 steps, offset 0 gives 980, 960, ..., 0.

    Prompt-to-Prompt / Null-Text Inversion / PIE-Bench run offset 0 (not the ``steps_offset=1`` of SD's config).
    """
    stride = num_train_timesteps // num_steps
    return [i * stride + offset for i in reversed(range(num_steps))]


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the classic scale: scale 1 is the plain conditional prediction."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


# --------------------------------------------------------------------------------------------------------------------
# Per-sample timesteps (iCD training and inference)


def abar_rows(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """``abar_t`` for a scalar or per-sample timestep [B], shaped to broadcast against ``like`` [B, ...]."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    abar = alphas_cumprod[t].to(like.device, like.dtype)
    return abar.reshape(-1, *([1] * (like.ndim - 1))) if abar.ndim else abar


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM forward marginal) for a scalar or per-sample t."""
    abar = abar_rows(alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def jump(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int, s: torch.Tensor | int,
         alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The consistency-model jump J(x; t -> s; eps) of iCD, either direction, with the hard boundary at s = 0.

    A jump to s = 0 returns the clean prediction x0 (abar := 1), not a point at noise level abar_0: that is how the
    distilled models are trained and sampled. ``t`` and ``s`` are ints or per-sample tensors [B].
    """
    return ddim_jump(x, eps, abar_rows(alphas_cumprod, t, x), _boundary_abar(alphas_cumprod, s, x))


def _boundary_abar(alphas_cumprod: torch.Tensor, s: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    abar = abar_rows(alphas_cumprod, s, like)
    at_zero = torch.as_tensor(s, device=like.device).reshape(abar.shape) == 0
    return torch.where(at_zero, torch.ones_like(abar), abar)
