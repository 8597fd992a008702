"""The multi-boundary schedule of iCD: one object that training, validation and inference all read.

A model distilled with m segments jumps between fixed boundary timesteps on the DDIM grid
{19, 39, ..., 999} (T = 1000, N = 50, stride 20):

- reverse boundaries E = [0, e_1, ..., e_{m-1}]: the reverse model (CD^m) maps any grid point to the largest
  e in E below it; generation runs the pairs (999 -> e_{m-1}), ..., (e_1 -> 0);
- forward boundaries F = [f_1, ..., f_{m-1}, 999]: the forward model (fCD^m) maps any grid point to the smallest
  f in F above it; inversion starts at ``start`` = 19 and runs (19 -> f_1), ..., (f_{m-1} -> 999).

Default rule when no lists are given (the reference solver's): interval L = ceil(N / m), boundaries at grid
indices L-1, 2L-1, ... < N. m = 4 gives E = [0, 259, 519, 779], F = [259, 519, 779, 999].

Nothing here mutates its inputs (the reference sampler reversed the caller's list in place).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from editlab.diffusion.solver import consistency_step, solve


def ddim_grid(num_train_timesteps: int = 1000, num_ddim_steps: int = 50) -> list[int]:
    """Ascending grid t_k = k * stride - 1, k = 1..N: [19, 39, ..., 999] for T = 1000, N = 50."""
    stride = num_train_timesteps // num_ddim_steps
    return [k * stride - 1 for k in range(1, num_ddim_steps + 1)]


def default_boundaries(num_segments: int, num_train_timesteps: int = 1000,
                       num_ddim_steps: int = 50) -> tuple[list[int], list[int]]:
    """(E, F) from the reference rule: every L-th grid point, L = ceil(N / m)."""
    grid = ddim_grid(num_train_timesteps, num_ddim_steps)
    interval = -(-num_ddim_steps // num_segments)
    inner = [grid[i] for i in range(interval - 1, num_ddim_steps, interval)][: num_segments - 1]
    return [0, *inner], [*inner, num_train_timesteps - 1]


def substep_pairs(t: int, s: int, num_substeps: int) -> list[tuple[int, int]]:
    """The teacher's multi-step DDIM from t to s (either direction) in ``num_substeps`` near-equal integer steps,
    the reference point the distilled jumps approximate (solved with the model at each step's start: explicit Euler
    in DDIM coordinates, like the reference solver)."""
    times = torch.linspace(t, s, num_substeps + 1).round().long().tolist()
    return [(a, b) for a, b in zip(times[:-1], times[1:]) if a != b]


def reverse_pairs(steps: Sequence[int]) -> list[tuple[int, int]]:
    """Generation pairs from an inference list R (any order): (R_m -> R_{m-1}), ..., (R_1 -> 0).

    [259, 519, 779, 999] -> [(999, 779), (779, 519), (519, 259), (259, 0)].
    """
    descending = sorted(steps, reverse=True)
    return list(zip(descending, [*descending[1:], 0]))


def forward_pairs(steps: Sequence[int], end: int = 999) -> list[tuple[int, int]]:
    """Inversion pairs from an inference list F (any order): (F_1 -> F_2), ..., (F_m -> end).

    [19, 259, 519, 779] -> [(19, 259), (259, 519), (519, 779), (779, 999)].
    """
    ascending = sorted(steps)
    return list(zip(ascending, [*ascending[1:], end]))


class BoundarySchedule:
    """Grid, boundaries, segment lookups and inference lists of an m-segment iCD model.

    ``reverse`` / ``forward`` are the training boundary lists E (starting at 0) and F (ending at T - 1); either
    omitted falls back to the default rule. ``start`` is the first forward timestep (19): the encoder never sees
    t = 0, and preservation segments use it in place of 0.
    """

    def __init__(self, num_segments: int = 4, reverse: Sequence[int] | None = None,
                 forward: Sequence[int] | None = None, num_train_timesteps: int = 1000, num_ddim_steps: int = 50,
                 start: int = 19):
        default_e, default_f = default_boundaries(num_segments, num_train_timesteps, num_ddim_steps)
        self.num_segments = num_segments
        self.num_train_timesteps = num_train_timesteps
        self.stride = num_train_timesteps // num_ddim_steps
        self.start = start
        self.grid = tuple(ddim_grid(num_train_timesteps, num_ddim_steps))
        self.reverse = tuple(sorted(reverse)) if reverse is not None else tuple(default_e)
        self.forward = tuple(sorted(forward)) if forward is not None else tuple(default_f)
        self._check()

    @classmethod
    def from_inference_steps(cls, reverse_steps: Sequence[int], forward_steps: Sequence[int],
                             **kwargs) -> "BoundarySchedule":
        """The schedule behind the released inference lists, e.g. reverse [259, 519, 779, 999] and forward
        [19, 259, 519, 779] -> E = [0, 259, 519, 779], F = [259, 519, 779, 999]."""
        forward_steps = sorted(forward_steps)
        return cls(len(reverse_steps), reverse=[0, *forward_steps[1:]], forward=sorted(reverse_steps),
                   start=forward_steps[0], **kwargs)

    def _check(self) -> None:
        m, last = self.num_segments, self.num_train_timesteps - 1
        if len(self.reverse) != m or len(self.forward) != m:
            raise ValueError(f"need {m} reverse and {m} forward boundaries, got E={self.reverse} F={self.forward}")
        if self.reverse[0] != 0 or self.forward[-1] != last:
            raise ValueError(f"E must start at 0 and F end at {last}; got E={self.reverse} F={self.forward}")
        if len(set(self.reverse)) != m or len(set(self.forward)) != m:
            raise ValueError(f"boundaries must be distinct: E={self.reverse} F={self.forward}")

    def __repr__(self) -> str:
        return f"BoundarySchedule(m={self.num_segments}, E={list(self.reverse)}, F={list(self.forward)})"

    # -- training lookups (per-sample tensors) ----------------------------------------------------------------------
    def reverse_boundary(self, t: torch.Tensor) -> torch.Tensor:
        """Largest e in E with e <= t."""
        table = torch.tensor(self.reverse, device=t.device)
        return table[torch.searchsorted(table, t, right=True) - 1]

    def forward_boundary(self, t: torch.Tensor) -> torch.Tensor:
        """Smallest f in F with f >= t."""
        table = torch.tensor(self.forward, device=t.device)
        return table[torch.searchsorted(table, t).clamp(max=len(self.forward) - 1)]

    def grid_at(self, index: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.grid, device=index.device)[index]

    def reverse_step(self, t_start: torch.Tensor) -> torch.Tensor:
        """The teacher's reverse step from a grid point: t' - stride, with 19 -> 0."""
        return (t_start - self.stride).clamp(min=0)

    def forward_step(self, t_start: torch.Tensor) -> torch.Tensor:
        """The teacher's forward step from a grid point: t + stride, capped at T - 1."""
        return (t_start + self.stride).clamp(max=self.num_train_timesteps - 1)

    def segments(self) -> list[tuple[int, int]]:
        """Preservation-loss segments (lo, hi): (E_j with 0 -> start, F_j); SD1.5 m=4: (19,259) ... (779,999)."""
        return [(lo if lo > 0 else self.start, hi) for lo, hi in zip(self.reverse, self.forward)]

    # -- inference --------------------------------------------------------------------------------------------------
    @property
    def reverse_steps(self) -> list[int]:
        """Inference list of the reverse model: F, e.g. [259, 519, 779, 999]."""
        return list(self.forward)

    @property
    def forward_steps(self) -> list[int]:
        """Inference list of the forward model: E with 0 -> start, e.g. [19, 259, 519, 779]."""
        return [self.start, *self.reverse[1:]]

    def reverse_pairs(self) -> list[tuple[int, int]]:
        return reverse_pairs(self.reverse_steps)

    def forward_pairs(self) -> list[tuple[int, int]]:
        return forward_pairs(self.forward_steps, self.num_train_timesteps - 1)


def consistency_jumps(x: torch.Tensor, pairs: Sequence[tuple[int, int]], eps_fn: Callable, schedule,
                      after: Callable | None = None) -> torch.Tensor:
    """``x`` after one consistency jump per (t, s) pair (the jump to 0 lands on the clean latent): how iCD's students
    invert (`BoundarySchedule.forward_pairs`) and decode (`reverse_pairs`), in the editor and in training's
    validation. ``eps_fn(i, x, t)``, ``schedule``: the noise schedule, ``after``: `diffusion.solver.solve`'s hook."""
    return solve(x, pairs, eps_fn, schedule, step=consistency_step, after=after)[-1]
