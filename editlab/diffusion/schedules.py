"""Noise schedules: where a sampler is at a time ``t`` as the signal and noise scales of x_t = alpha x0 + sigma eps.

Two families of schedule, one face (``scales(t) -> (alpha, sigma)`` and ``pairs(num_steps) -> [(t, s)]``), so the
solver and the step rules never ask which kind of model they run:

- `VPSchedule` (variance preserving, the UNet families): integer train timesteps, alpha = sqrt(abar_t),
  sigma = sqrt(1 - abar_t). A time below 0 (one DDIM stride before step 0, the end of the last denoising pair and
  the start of the first inversion pair) is abar_0: the reference DDIM's ``set_alpha_to_one=False``, which every
  P2P-family method and iCD's teacher use, so the first inversion step is exactly the identity.
- `FlowSchedule` (rectified flow, the flow-matching transformers): the time is sigma itself, alpha = 1 - sigma, and
  the grid is diffusers' ``FlowMatchEulerDiscreteScheduler``'s (a linear grid, shifted, then 0 appended).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from editlab.diffusion.ddim import ddim_timesteps

Pairs = list[tuple[int, int]] | list[tuple[float, float]]  # (t -> s) per step, in the schedule's time


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """``alphas_cumprod`` [T], fp32 on the device the latents live on."""

    alphas_cumprod: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def abar(self, t: int) -> torch.Tensor:
        """abar_t; t < 0 is abar_0 (the module docstring says why)."""
        return self.alphas_cumprod[max(t, 0)]

    def scales(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.abar(t)
        return abar.sqrt(), (1 - abar).sqrt()

    def pairs(self, num_steps: int, inverse: bool = False) -> list[tuple[int, int]]:
        """The (t -> s) pairs of ``num_steps`` DDIM steps on the `ddim_timesteps` grid: denoising 980 -> 960, ...,
        0 -> -20; ``inverse`` walks them backwards, -20 -> 0 first."""
        stride = self.num_train_timesteps // num_steps
        pairs = [(t, t - stride) for t in ddim_timesteps(num_steps, self.num_train_timesteps)]
        return [(s, t) for t, s in reversed(pairs)] if inverse else pairs

    def noisier_than(self, t: int, fraction: float) -> bool:
        """Whether ``t`` lies above ``fraction`` of the way from data to noise (dynamic CFG's tau)."""
        return t > fraction * self.num_train_timesteps

    def flow_time(self, t: int) -> torch.Tensor:
        """The rectified-flow time of ``t``: x_t / (alpha + sigma) = (1 - r) x0 + r eps with r = sigma / (alpha +
        sigma), the coordinates in which a DDIM step is an Euler step."""
        alpha, sigma = self.scales(t)
        return sigma / (alpha + sigma)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow, x_sigma = (1 - sigma) x0 + sigma eps, on diffusers' flow-matching grid.

    ``shift`` bends the grid towards noise (sigma -> shift sigma / (1 + (shift - 1) sigma)); with ``dynamic`` the
    shift is exp(mu), mu linear in the image's token count between (``base_seq_len``, ``base_shift``) and
    (``max_seq_len``, ``max_shift``) (FLUX). ``seq_len`` is that count for the model's own resolution (a family's
    schedule sets it; a call may pass another). ``grid`` is the unshifted grid: ``train``, the scheduler's own
    (SD3's pipeline passes none), or ``uniform``, linspace(1, 1/N, N), which FLUX's pipelines pass whatever the
    shift (schnell's is static); None: uniform when dynamic, else train. ``shift_terminal`` is left out: no
    supported family sets it.
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    seq_len: int | None = None
    grid: str | None = None

    def __post_init__(self):
        if self.grid not in (None, "train", "uniform"):
            raise ValueError(f"unknown flow grid {self.grid!r}; expected train or uniform")

    def shift_for(self, seq_len: int | None = None) -> float:
        """The shift in effect for an image of ``seq_len`` latent tokens (default: the schedule's own ``seq_len``;
        needed when ``dynamic``)."""
        if not self.dynamic:
            return self.shift
        seq_len = self.seq_len if seq_len is None else seq_len
        if seq_len is None:
            raise ValueError("this flow schedule shifts by resolution: pass the image's token count (seq_len)")
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return math.exp(self.base_shift + slope * (seq_len - self.base_seq_len))

    def _shifted(self, sigmas: torch.Tensor, shift: float) -> torch.Tensor:
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def sigmas(self, num_steps: int, seq_len: int | None = None) -> list[float]:
        """``num_steps`` + 1 descending sigmas ending at 0, as ``FlowMatchEulerDiscreteScheduler.set_timesteps``
        makes them: the train grid spans the scheduler's train sigmas, which a static shift has shifted already, and
        is shifted again (SD3's double shift); the uniform grid is shifted once."""
        if (self.grid or ("uniform" if self.dynamic else "train")) == "uniform":
            grid = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        else:
            steps = self.num_train_timesteps
            train = torch.linspace(1.0, steps, steps, dtype=torch.float64).flip(0) / steps
            train = train if self.dynamic else self._shifted(train, self.shift)  # the scheduler shifts these if static
            grid = torch.linspace(float(train[0]), float(train[-1]), num_steps, dtype=torch.float64)
        shifted = self._shifted(grid.float(), self.shift_for(seq_len))
        return [*map(float, shifted), 0.0]

    def noisier_than(self, sigma: float, fraction: float) -> bool:
        return sigma > fraction

    def flow_time(self, sigma: float) -> torch.Tensor:
        """Its own time: a flow model's coordinates already are the rectified-flow ones."""
        return torch.as_tensor(sigma, dtype=torch.float64)

    def scales(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)  # cast to the latents' dtype where used
        return 1 - sigma, sigma

    def pairs(self, num_steps: int, inverse: bool = False, seq_len: int | None = None) -> list[tuple[float, float]]:
        sigmas = self.sigmas(num_steps, seq_len)
        pairs = list(zip(sigmas[:-1], sigmas[1:]))
        return [(s, t) for t, s in reversed(pairs)] if inverse else pairs
