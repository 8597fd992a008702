"""The one sampling loop, for inversion, denoising, consistency jumps and flow ODEs alike (k-diffusion's seam).

``solve(x, pairs, model_fn, schedule, step=...)`` walks the (t -> s) pairs of a schedule. It never sees a network:
``model_fn(i, x, t) -> prediction`` hides the model family, the conditioning and the guidance, and ``predicts``
names what it returns (`diffusion.predictions`), which the loop turns into (x0-hat, eps-hat) for the step rule.
Step rules are free functions with one signature, ``step(x, pred, t, s, schedule, evaluate) -> x``, where
``evaluate(y, u) -> Prediction`` runs the model once more within the step (second-order rules):

- `ddim_step`: the DDIM (eta = 0) jump, x_s = alpha_s x0 + sigma_s eps, either direction;
- `consistency_step`: iCD's jump, the same with a hard boundary (a jump to s = 0 returns x0);
- `euler_step`: x_s = x + (s - t) v on a `FlowSchedule` (DDIM is this step in rectified-flow coordinates);
- `midpoint_step`: the explicit midpoint rule in rectified-flow time, two calls per step. RF-Solver's
  second-order step, x + h v + h^2/2 (v_mid - v) / (h / 2), simplifies to exactly this (Wang et al. 2024).
  `reusing_midpoints` wraps a ``model_fn`` so that each step after the first starts from the previous step's
  midpoint velocity instead of a new call: FireFlow (Deng et al. 2025), N + 1 calls for N steps.

Where the model is evaluated is the ``at`` rule: `start` (explicit Euler, consistency jumps) or `noisier_end`
(DDIM inversion in the P2P family evaluates at the destination). Hooks run at every step:

- ``before(i, x) -> x``: changes the latent the step starts from (Pix2Pix-Zero's cross-attention guidance);
- ``after(i, x) -> x``: changes the latent the step produced (LocalBlend, Direct Inversion's offsets);
- where a method keeps per-step state (P2P's step counter, NTI's optimised null embedding) ``model_fn`` sets or
  reads it; hooks that collect something keep it in their own closure.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from editlab.diffusion.predictions import Prediction, to_prediction

ModelFn = Callable[[int, torch.Tensor, Any], torch.Tensor]  # (step, x [B, C, ...], t) -> prediction like x
StepHook = Callable[[int, torch.Tensor], torch.Tensor]  # (step, x) -> x
Evaluate = Callable[[torch.Tensor, Any], Prediction]  # (x, t) -> the model's prediction there, within a step
StepRule = Callable[[torch.Tensor, Prediction, Any, Any, Any, Evaluate], torch.Tensor]  # (x, pred, t, s, ...) -> x


def start(t, s):
    return t


def noisier_end(t, s):
    return max(t, s)


def ddim_step(x: torch.Tensor, pred: Prediction, t, s, schedule, evaluate: Evaluate | None = None
              ) -> torch.Tensor:
    alpha, sigma = schedule.scales(s)
    return alpha.to(x) * pred.x0 + sigma.to(x) * pred.eps


def consistency_step(x: torch.Tensor, pred: Prediction, t, s, schedule, evaluate: Evaluate | None = None
                     ) -> torch.Tensor:
    return pred.x0 if s == 0 else ddim_step(x, pred, t, s, schedule)


def euler_step(x: torch.Tensor, pred: Prediction, t, s, schedule, evaluate: Evaluate | None = None
               ) -> torch.Tensor:
    return x + (s - t) * pred.velocity


def midpoint_step(x: torch.Tensor, pred: Prediction, t, s, schedule, evaluate: Evaluate) -> torch.Tensor:
    """x_s = x + h v(x + h/2 v(x, t), t + h/2), h = s - t: second order, in rectified-flow time (t is sigma)."""
    h = s - t
    return x + h * evaluate(x + h / 2 * pred.velocity, t + h / 2).velocity


def reusing_midpoints(model_fn: ModelFn) -> ModelFn:
    """``model_fn`` for `midpoint_step` as FireFlow runs it: a step's first call (at its start) returns the previous
    step's second call (at its midpoint) instead of running the model. One wrapper per solve."""
    last: dict = {"step": None, "calls": 0, "midpoint": None}

    def reused(i: int, x: torch.Tensor, t) -> torch.Tensor:
        last["calls"] = last["calls"] + 1 if last["step"] == i else 1
        last["step"] = i
        if last["calls"] == 1 and last["midpoint"] is not None:
            return last["midpoint"]
        out = model_fn(i, x, t)
        if last["calls"] == 2:
            last["midpoint"] = out
        return out

    return reused


def solve(x: torch.Tensor, pairs: Sequence[tuple], model_fn: ModelFn, schedule, *, step: StepRule = ddim_step,
          predicts: str = "epsilon", at: Callable = start, before: StepHook | None = None,
          after: StepHook | None = None, skip_identity: bool = False) -> list[torch.Tensor]:
    """Run x through the steps of ``pairs``: the trajectory [x, x_1, ..., x_n].

    ``skip_identity``: a pair whose two noise levels are equal (the first inversion step, abar_-20 = abar_0) is
    exactly the identity; it is skipped with no model call and no hook, and x repeats in the trajectory.
    """
    trajectory = [x]
    for i, (t, s) in enumerate(pairs):
        if skip_identity and all(map(torch.equal, schedule.scales(t), schedule.scales(s))):
            trajectory.append(x)
            continue
        if before is not None:
            x = before(i, x)

        def evaluate(y: torch.Tensor, u) -> Prediction:
            alpha, sigma = (v.to(y) for v in schedule.scales(u))
            return to_prediction(model_fn(i, y, u), predicts, y, alpha, sigma)

        alpha, sigma = (v.to(x) for v in schedule.scales(t))
        x = step(x, to_prediction(model_fn(i, x, at(t, s)), predicts, x, alpha, sigma), t, s, schedule, evaluate)
        if after is not None:
            x = after(i, x)
        trajectory.append(x)
    return trajectory
