"""The four iCD objectives as pure functions of noise-prediction callables.

Every network enters as an ``EpsFn(x, t, text, w) -> eps`` (t and w per sample), so the same code runs with LoRA
students on a UNet, with analytic teachers in tests, and with any guidance backend. ``text`` is passed through
untouched except for row selection (``text[rows]``): a tensor [B, L, D] or a `models.conditioning.Conditioning` (SDXL).
Each builder returns ``(prediction, target)``: the prediction carries the gradient of exactly one student, the
target carries none. The loss is `pseudo_huber` of the two.

Student parameterisation (no c_skip / c_out): f(x, t; s) = J(x; t -> s; eps_student(x, t)), with J the DDIM jump
and its hard boundary at s = 0 (`diffusion.ddim.jump`). The teacher takes one DDIM grid step (stride 20) with the plain
abar table (abar_0 = 0.99915 for the step 19 -> 0), evaluated at the step's starting point in both directions.
"""

from __future__ import annotations

from typing import Callable

import torch

from editlab.diffusion.ddim import abar_rows, add_noise, ddim_jump, jump
from editlab.icd.schedule import BoundarySchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """mean(sqrt((prediction - target)^2 + c^2) - c) over all elements; exactly 0 at prediction == target."""
    diff = prediction.float() - target.float()
    return (torch.sqrt(diff**2 + c**2) - c).mean()


def teacher_step(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                 alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """One DDIM step of the teacher with the plain abar table (no hard boundary: the point 0 keeps noise sigma_0)."""
    return ddim_jump(x, eps, abar_rows(alphas_cumprod, t, x), abar_rows(alphas_cumprod, t_next, x))


@torch.no_grad()
def consistency_target(x_next: torch.Tensor, t_next: torch.Tensor, s: torch.Tensor, text: torch.Tensor,
                       w: torch.Tensor, student: EpsFn, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sg[f(teacher point)]: the teacher point itself where it already sits on the boundary (t_next == s),
    else the online student's jump from it to s. Rows at the boundary never call the student."""
    target = x_next.clone()
    jump_rows = t_next != s
    if jump_rows.any():
        x, t, b = x_next[jump_rows], t_next[jump_rows], s[jump_rows]
        target[jump_rows] = jump(x, student(x, t, text[jump_rows], w[jump_rows]), t, b, alphas_cumprod)
    return target


def _consistency_pair(x0: torch.Tensor, noise: torch.Tensor, t_start: torch.Tensor, t_next: torch.Tensor,
                      s: torch.Tensor, text: torch.Tensor, w: torch.Tensor, student: EpsFn, teacher: EpsFn,
                      target_net: EpsFn, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both CD directions: the student's jump t_start -> s against the target net's jump from the teacher's one-step
    solution at t_next to the same boundary s (no gradient through the target)."""
    x_start = add_noise(x0, noise, t_start, alphas_cumprod)
    prediction = jump(x_start, student(x_start, t_start, text, w), t_start, s, alphas_cumprod)
    with torch.no_grad():
        x_next = teacher_step(x_start, teacher(x_start, t_start, text, w), t_start, t_next, alphas_cumprod)
    return prediction, consistency_target(x_next, t_next, s, text, w, target_net, alphas_cumprod)


def reverse_consistency(x0: torch.Tensor, noise: torch.Tensor, grid_index: torch.Tensor, text: torch.Tensor,
                        w: torch.Tensor, student: EpsFn, teacher: EpsFn, schedule: BoundarySchedule,
                        alphas_cumprod: torch.Tensor,
                        target_net: EpsFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse CD (trains the reverse model): from a grid point t' towards the reverse boundary below t = t' - 20.

    x0, noise [B, C, h, w]; grid_index [B] in 0..N-1; w [B] the sampled guidance (teacher and student alike).
    ``target_net``: the network of the target jump (an EMA copy); default the online student, as the reference.
    """
    t_start = schedule.grid_at(grid_index)  # t' in {19, ..., 999}
    t_next = schedule.reverse_step(t_start)  # t = t' - 20, with 19 -> 0
    s = schedule.reverse_boundary(t_next)  # computed from t, not t'
    return _consistency_pair(x0, noise, t_start, t_next, s, text, w, student, teacher, target_net or student,
                             alphas_cumprod)


def forward_consistency(x0: torch.Tensor, noise: torch.Tensor, grid_index: torch.Tensor, text: torch.Tensor,
                        student: EpsFn, teacher: EpsFn, schedule: BoundarySchedule, alphas_cumprod: torch.Tensor,
                        target_net: EpsFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward CD (trains the forward model), unguided: from a grid point t towards the forward boundary above
    t' = t + 20. grid_index [B] in 0..N-2 (t = 999 has nowhere to go)."""
    w = torch.zeros(x0.shape[0], device=x0.device)
    t_start = schedule.grid_at(grid_index)  # t in {19, ..., 979}
    t_next = schedule.forward_step(t_start)  # t' = t + 20
    s = schedule.forward_boundary(t_next)
    return _consistency_pair(x0, noise, t_start, t_next, s, text, w, student, teacher, target_net or student,
                             alphas_cumprod)


def _segment_bounds(segment: torch.Tensor, schedule: BoundarySchedule) -> tuple[torch.Tensor, torch.Tensor]:
    bounds = torch.tensor(schedule.segments(), device=segment.device)  # [m, 2]
    return bounds[segment, 0], bounds[segment, 1]


def _round_trip(x_start: torch.Tensor, t_start: torch.Tensor, t_far: torch.Tensor, text: torch.Tensor,
                frozen: EpsFn, trained: EpsFn, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave x_start for t_far with the frozen student (no grad), come back with the trained one; unguided.
    Returns (prediction, target = x_start)."""
    w = torch.zeros(x_start.shape[0], device=x_start.device)
    with torch.no_grad():
        x_far = jump(x_start, frozen(x_start, t_start, text, w), t_start, t_far, alphas_cumprod)
    prediction = jump(x_far, trained(x_far, t_far, text, w), t_far, t_start, alphas_cumprod)
    return prediction, x_start


def forward_preservation(x0: torch.Tensor, noise: torch.Tensor, segment: torch.Tensor, text: torch.Tensor,
                         forward_student: EpsFn, reverse_student: EpsFn, schedule: BoundarySchedule,
                         alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_f (trains the forward model): x_hi -> reverse (no grad) -> x_lo -> forward -> should return to x_hi.

    segment [B] in 0..m-1 picks (lo, hi) from `BoundarySchedule.segments`; unguided throughout.
    """
    lo, hi = _segment_bounds(segment, schedule)
    x_hi = add_noise(x0, noise, hi, alphas_cumprod)
    return _round_trip(x_hi, hi, lo, text, reverse_student, forward_student, alphas_cumprod)


def reverse_preservation(x0: torch.Tensor, noise: torch.Tensor, segment: torch.Tensor, text: torch.Tensor,
                         forward_student: EpsFn, reverse_student: EpsFn, schedule: BoundarySchedule,
                         alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_r (trains the reverse model): x_lo -> forward (no grad) -> x_hi -> reverse -> should return to x_lo."""
    lo, hi = _segment_bounds(segment, schedule)
    x_lo = add_noise(x0, noise, lo, alphas_cumprod)
    return _round_trip(x_lo, lo, hi, text, forward_student, reverse_student, alphas_cumprod)
