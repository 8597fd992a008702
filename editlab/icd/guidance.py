"""Guidance for iCD: units, the training set of scales and the dynamic-CFG step function.

Units. The paper writes CFG as eps_u + w (eps_c - eps_u), so w = 1 is unguided. The reference code (and every
``guidance_scale`` passed to the distilled models: 7, 19, ...) uses the LCM offset w_code = w_paper - 1, i.e.

    eps_guided = eps_c + w_code (eps_c - eps_u),        w_code = 0: the plain conditional prediction.

Everything in ``icd/`` and ``editors/icd.py`` is in code units; `classic_to_code` converts a classic scale.

A CFG-distilled UNet takes w through `models.guidance.guidance_embedding` (``time_cond_proj_dim = 512``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def classic_to_code(scale: float) -> float:
    """Classic CFG scale (1 = unguided) -> code units (0 = unguided)."""
    return scale - 1.0


def code_to_classic(w: float) -> float:
    return w + 1.0


def dynamic_scale(w: float, t: int, tau: float, num_train_timesteps: int = 1000) -> float:
    """Step function of dynamic CFG: unguided for t > tau * T, full w for t <= tau * T (tau = 1: constant w)."""
    return w if t <= tau * num_train_timesteps else 0.0


@dataclass(frozen=True)
class GuidancePolicy:
    """Which w each UNet row gets, in code units.

    ``scale`` / ``tau``: inference guidance and its dynamic step function. ``train_scales``: the discrete set the
    reverse consistency loss samples from (forward and preservation losses are always unguided).
    """

    scale: float = 19.0
    tau: float = 1.0
    train_scales: tuple[float, ...] = (0.0, 7.0, 11.0, 15.0, 19.0)
    num_train_timesteps: int = 1000

    def at(self, t: int) -> float:
        return dynamic_scale(self.scale, t, self.tau, self.num_train_timesteps)

    def rows(self, t: int, num_rows: int, unguided_rows: Sequence[int] = ()) -> torch.Tensor:
        """w per row at timestep t [num_rows]; rows listed in ``unguided_rows`` (an edit's source row) get 0."""
        w = torch.full((num_rows,), self.at(t))
        w[list(unguided_rows)] = 0.0
        return w

    def sample_train(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """w per sample drawn uniformly from ``train_scales`` [batch]."""
        scales = torch.tensor(self.train_scales, dtype=torch.float32)
        index = torch.randint(len(scales), (batch,), generator=generator)
        return scales[index]
