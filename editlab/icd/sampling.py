"""iCD inference loops shared by the editor, the training-time validation and the tests.

A distilled model runs a list of (t -> s) pairs, one network evaluation and one `diffusion.ddim.jump` per pair:
generation with the reverse model over `reverse_pairs`, inversion with the forward model over `forward_pairs`
starting from x_19 = sqrt(abar_19) x0 + sqrt(1 - abar_19) noise. `ddim_solve` is the teacher's multi-step DDIM
between two timesteps (the reference point the distilled jumps approximate).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from editlab.diffusion.ddim import add_noise, ddim_jump, jump

# (step index, x [B, C, h, w], t) -> eps [B, C, h, w]
StepEps = Callable[[int, torch.Tensor, int], torch.Tensor]
# (step index, x) -> x, after each jump (e.g. Prompt-to-Prompt's LocalBlend)
StepCallback = Callable[[int, torch.Tensor], torch.Tensor]


def run_pairs(x: torch.Tensor, pairs: Sequence[tuple[int, int]], eps_fn: StepEps, alphas_cumprod: torch.Tensor,
              callback: StepCallback | None = None) -> torch.Tensor:
    """x [B, C, h, w] through the consistency jumps of ``pairs``; the jump to 0 returns the clean latent."""
    for i, (t, s) in enumerate(pairs):
        x = jump(x, eps_fn(i, x, t), t, s, alphas_cumprod)
        if callback is not None:
            x = callback(i, x)
    return x


def inversion_start(x0: torch.Tensor, noise: torch.Tensor, start: int, alphas_cumprod: torch.Tensor):
    """The forward model's input: x0 noised to ``start`` (19) with a seeded noise."""
    return add_noise(x0, noise, start, alphas_cumprod)


def ddim_solve(x: torch.Tensor, eps_fn: Callable[[torch.Tensor, int], torch.Tensor], t: int, s: int,
               num_substeps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Teacher DDIM from t to s (either direction) in ``num_substeps`` near-equal integer steps, eps evaluated at
    each step's starting point (explicit Euler in DDIM coordinates, like the reference solver)."""
    times = torch.linspace(t, s, num_substeps + 1).round().long().tolist()
    for a, b in zip(times[:-1], times[1:]):
        if a != b:
            x = ddim_jump(x, eps_fn(x, a), alphas_cumprod[a], alphas_cumprod[b])
    return x
