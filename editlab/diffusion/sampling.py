"""The one DDIM sampling loop, for inversion and denoising alike; methods change it through per-step hooks.

A sampler takes the latent, the (t -> s) timestep pairs and an ``eps_fn`` that hides the model family, the
conditioning and the guidance (k-diffusion's seam): it never sees a network. Hooks run at every step:

- ``before(i, x) -> x``: changes the latent the step starts from (Pix2Pix-Zero's cross-attention guidance);
- ``eps_fn(i, x, t) -> eps``: the prediction at the noisier end t of the pair (DDIM inversion evaluates the model at
  the destination, denoising at the source); where a method keeps per-step state (P2P's step counter, NTI's
  optimised null embedding) the function sets or reads it;
- ``after(i, x) -> x``: changes the latent the step produced (Prompt-to-Prompt's LocalBlend, Direct Inversion's
  offsets, a snap back onto a recorded trajectory).

Hooks that collect something (predictions, losses) keep it in their own closure and hand it back to their
caller; the loop returns the whole trajectory.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from editlab.diffusion.ddim import ddim_jump, ddim_timesteps

StepEps = Callable[[int, torch.Tensor, int], torch.Tensor]  # (step, x [B, C, h, w], t) -> eps [B or 1, C, h, w]
StepHook = Callable[[int, torch.Tensor], torch.Tensor]  # (step, x) -> x
Abar = Callable[[int], torch.Tensor]  # timestep -> abar_t (t < 0: the schedule's final abar)


def ddim_pairs(num_steps: int, num_train_timesteps: int = 1000, inverse: bool = False) -> list[tuple[int, int]]:
    """The (t -> s) pairs of ``num_steps`` DDIM steps on the `ddim_timesteps` grid: denoising 980 -> 960, ...,
    0 -> -20 (abar at -20 is the schedule's final value); ``inverse`` walks them backwards, -20 -> 0 first."""
    stride = num_train_timesteps // num_steps
    pairs = [(t, t - stride) for t in ddim_timesteps(num_steps, num_train_timesteps)]
    return [(s, t) for t, s in reversed(pairs)] if inverse else pairs


def ddim_loop(x: torch.Tensor, pairs: Sequence[tuple[int, int]], eps_fn: StepEps, abar: Abar, *,
              before: StepHook | None = None, after: StepHook | None = None,
              skip_identity: bool = False) -> list[torch.Tensor]:
    """Run x [B, C, h, w] through the DDIM (eta = 0) jumps of ``pairs``: [x, x_1, ..., x_n].

    ``skip_identity``: a pair whose two noise levels are equal (the first inversion step when abar_final = abar_0)
    is exactly the identity; it is skipped, with no model call and no hook, and x repeats in the trajectory.
    """
    trajectory = [x]
    for i, (t, s) in enumerate(pairs):
        abar_from, abar_to = abar(t), abar(s)
        if skip_identity and torch.equal(abar_from, abar_to):
            trajectory.append(x)
            continue
        if before is not None:
            x = before(i, x)
        x = ddim_jump(x, eps_fn(i, x, max(t, s)), abar_from, abar_to)
        if after is not None:
            x = after(i, x)
        trajectory.append(x)
    return trajectory
