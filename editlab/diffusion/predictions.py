"""What a denoiser predicts, turned into the pair every step rule reads: (x0-hat, eps-hat).

With x_t = alpha x0 + sigma eps:
- ``epsilon``: the noise; x0 = (x - sigma eps) / alpha (undefined at alpha = 0, where no epsilon model runs);
- ``v_prediction``: v = alpha eps - sigma x0 (alpha^2 + sigma^2 = 1); x0 = alpha x - sigma v, eps = sigma x + alpha v;
- ``flow``: the rectified-flow velocity v = eps - x0 (alpha = 1 - sigma); x0 = x - sigma v, eps = x + alpha v.

Guidance is affine in the prediction and so is every conversion, so CFG gives the same result before or after one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


class Prediction(NamedTuple):
    x0: torch.Tensor
    eps: torch.Tensor

    @property
    def velocity(self) -> torch.Tensor:
        """d x / d sigma in rectified-flow coordinates."""
        return self.eps - self.x0


def to_prediction(out: torch.Tensor, kind: str, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
                  ) -> Prediction:
    """A network's ``out`` of type ``kind`` at the point ``x`` with scales (``alpha``, ``sigma``)."""
    if kind == "epsilon":
        return Prediction((x - sigma * out) / alpha, out)
    if kind == "v_prediction":
        return Prediction(alpha * x - sigma * out, sigma * x + alpha * out)
    if kind == "flow":
        return Prediction(x - sigma * out, x + alpha * out)
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def from_prediction(pred: Prediction, kind: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_prediction`: what a network of type ``kind`` outputs for ``pred``."""
    if kind == "epsilon":
        return pred.eps
    if kind == "v_prediction":
        return alpha * pred.eps - sigma * pred.x0
    if kind == "flow":
        return pred.velocity
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def flow_velocity(out: torch.Tensor, kind: str, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
                  ) -> torch.Tensor:
    """The rectified-flow velocity dz/dr of any model: with z = x / (alpha + sigma) and r = sigma / (alpha + sigma),
    z = (1 - r) x0 + r eps for every schedule, so dz/dr = eps-hat - x0-hat of its prediction ``out`` at x. For a flow
    model (alpha + sigma = 1) that is its output; for an epsilon model it is (eps-hat - z) / (1 - r)."""
    return to_prediction(out, kind, x, alpha, sigma).velocity
