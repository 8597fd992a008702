"""RF-Inversion (Rout et al., ICLR 2025, "Semantic Image Inversion and Editing using Rectified Stochastic Differential
Equations"): invert an image with no prompt along a flow steered towards a fixed noise, then sample back with the
target prompt along a flow steered towards the image. As diffusers' community pipeline does it, which the authors'
README loads (huggingface/diffusers examples/community/pipeline_flux_rf_inversion.py @58eb52c; LituRout/RF-Inversion
README.md @7692b96).

Noise levels sigma run from 1 (noise) to 0 (clean) on the model's grid sigma_0 = 1 > ... > sigma_N = 0, and every
velocity is d/d sigma (editlab's and diffusers' convention, v = noise - x0):

1. Encode the source image: y0 [1, C, h, w], the VAE posterior mean. The community pipeline samples the posterior
   instead, so its inversions vary with the seed beyond y1; editlab encodes with the mean for every editor.
2. Draw the target noise y1 ~ N(0, I) [1, C, h, w] from the request's generator.
3. Controlled forward ODE (the paper's Algorithm 1), N steps from Y = y0 to noise: the latent climbs the grid
   mirrored, tau_i = 1 - sigma_i (step i moves it by sigma_i - sigma_{i+1}). With the model time t_i,
   u = v(Y, t_i; "", ``inversion_guidance_scale``),  u_c = (y1 - Y) / (1 - t_i)  (the straight line to y1),
   Y <- Y + (tau_{i+1} - tau_i) (u + ``gamma`` (u_c - u)).
   ``grid`` picks t_i: ``diffusers_community`` (default, as the original) tells the model i / (N + 1) while Y is at
   tau_i (N = 28 on FLUX's 1024² grid: step 14's latent is at 0.24, the model is told 0.48), and ``gamma`` = 1 does
   not end on y1;
   ``consistent`` uses t_i = tau_i, the latent's true noise level, where ``gamma`` = 1 ends on y1 exactly.
4. Controlled reverse ODE (Algorithm 2), N steps from X = Y down the grid with the target prompt:
   v = v(X, sigma_i; target, ``guidance_scale``),  v_c = (X - y0) / sigma_i  (the straight line to y0),
   X <- X + (sigma_{i+1} - sigma_i) (v + eta_i (v_c - v)),
   eta_i = ``eta`` on the steps int(``eta_start`` N) <= i < int(``eta_stop`` N), times (1 - i / N) ^
   ``eta_decay_power`` with ``decay_eta``, else 0. (The paper writes it in t = 1 - sigma with velocity -v:
   v-hat = v + eta (v_c - v), v_c = (y0 - X) / (1 - t); the same step.)
5. Decode X.

The inversion task runs 3 and 4 with the source prompt in step 4: the reconstruction.

Cost: N calls to invert and N to sample, 2N (56 at the authors' 28 steps). Guidance is the family's: FLUX-dev's
embedded scale (inversion 0.0 as the pipeline's ``invert`` passes, sampling 3.5, the README's); FLUX-schnell has none;
SD3 two-pass CFG in classic units in one call (1 = the conditional pass alone; ``editor=rf_inversion_sd3``).
Left out: the pipeline's ``strength`` < 1 (fewer steps of both passes) and the authors' SDE sampler
(LituRout/RF-Inversion pipeline_rf_inversion_sde.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from editlab.diffusion.solver import ModelFn, euler_step, solve
from editlab.editors.base import Editor, EditorConfigError, EditRequest, EditResult, register
from editlab.editors.flowedit import RECTIFIED
from editlab.models.conditioning import Conditioning

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x [B, C, h, w], sigma) -> d x / d sigma, like x
GRIDS = ("diffusers_community", "consistent")


def controlled(velocity: Velocity, anchor: torch.Tensor, end: float, strengths: Sequence[float],
               times: Sequence[float]) -> ModelFn:
    """RF-Inversion's controller as a `solve` model function: at step i the model's velocity v at time ``times[i]``
    is pulled, by ``strengths[i]``, towards v_c = (x - anchor) / (times[i] - end), the velocity of the straight line
    that reaches ``anchor`` at noise level ``end``: v + strengths[i] (v_c - v)."""

    def model_fn(i: int, x: torch.Tensor, t) -> torch.Tensor:  # t, the step's start, is not always the time told
        v = velocity(x, times[i])
        return v + strengths[i] * ((x - anchor) / (times[i] - end) - v)

    return model_fn


def invert(y0: torch.Tensor, y1: torch.Tensor, velocity: Velocity, sigmas: Sequence[float], gamma: float,
           grid: str = "diffusers_community") -> torch.Tensor:
    """Step 3: the controlled forward ODE from y0 [B, C, h, w] to noise, steered towards y1 by ``gamma``, on the
    descending grid ``sigmas`` (N + 1 values from 1 to 0) read mirrored."""
    levels = [1 - sigma for sigma in sigmas]  # tau_0 = 0 (y0 is clean) ... tau_N = 1
    steps = len(levels) - 1
    times = [i / (steps + 1) for i in range(steps)] if grid == "diffusers_community" else levels[:-1]
    model_fn = controlled(velocity, y1, 1.0, [gamma] * steps, times)
    return solve(y0, list(zip(levels[:-1], levels[1:])), model_fn, RECTIFIED, step=euler_step, predicts="flow")[-1]


def sample(x: torch.Tensor, y0: torch.Tensor, velocity: Velocity, sigmas: Sequence[float],
           etas: Sequence[float]) -> torch.Tensor:
    """Step 4: the controlled reverse ODE from x [B, C, h, w] down the grid ``sigmas`` (N + 1 values from 1 to 0),
    steered towards y0 by ``etas[i]`` at step i."""
    model_fn = controlled(velocity, y0, 0.0, etas, sigmas[:-1])
    return solve(x, list(zip(sigmas[:-1], sigmas[1:])), model_fn, RECTIFIED, step=euler_step, predicts="flow")[-1]


def eta_schedule(num_steps: int, eta: float, start: float, stop: float, decay: bool = False,
                 power: float = 1.0) -> list[float]:
    """eta_i of each sampling step: ``eta`` on steps int(start N) <= i < int(stop N) (the pipeline's rounding of its
    start / stop fractions), decayed by (1 - i / N) ^ power where ``decay``; 0 elsewhere."""
    first, last = int(start * num_steps), min(int(stop * num_steps), num_steps)
    return [eta * ((1 - i / num_steps) ** power if decay else 1.0) if first <= i < last else 0.0
            for i in range(num_steps)]


@register("rf_inversion")
class RFInversionEditor(Editor):
    tasks = ("edit", "inversion")
    families = ("sd3", "flux")
    parameter_choices = {"grid": GRIDS}

    def __init__(
        self,
        components,
        num_steps: int = 28,
        gamma: float = 0.5,
        eta: float = 0.9,
        eta_start: float = 0.0,
        eta_stop: float = 0.25,
        decay_eta: bool = False,
        eta_decay_power: float = 1.0,
        guidance_scale: float = 3.5,
        inversion_guidance_scale: float = 0.0,
        grid: str = "diffusers_community",
    ):
        super().__init__(components)
        if eta_start > eta_stop:
            raise EditorConfigError(f"editor.eta_start={eta_start!r} is after editor.eta_stop={eta_stop!r}: eta acts "
                                    "on the sampling steps from eta_start to eta_stop (fractions); lower eta_start")
        self.gamma, self.grid = gamma, grid
        self.scale, self.inversion_scale = guidance_scale, inversion_guidance_scale
        self.sigmas = components.schedule.sigmas(num_steps)  # 1 ... 0, the model's grid at its resolution
        self.etas = eta_schedule(num_steps, eta, eta_start, eta_stop, decay_eta, eta_decay_power)
        self.guidance = components.guidance()  # the family's: SD3's two-pass CFG, FLUX-dev's embedded scale

    def velocity(self, cond: Conditioning, scale: float) -> Velocity:
        """The model's guided velocity for the prompt ``cond`` (one row) at ``scale``, in the family's units."""
        return lambda x, sigma: self.guidance(x, sigma, cond, scale)

    @torch.no_grad()
    def edit_latents(self, y0: torch.Tensor, target: Conditioning, generator: torch.Generator) -> torch.Tensor:
        """y0 [1, C, h, w] and the target prompt (one row) -> the edited latent [1, C, h, w]."""
        y1 = torch.randn(y0.shape, generator=generator).to(y0)  # 2.
        empty = self.velocity(self.components.unconditional(), self.inversion_scale)
        inverted = invert(y0, y1, empty, self.sigmas, self.gamma, self.grid)  # 3.
        return sample(inverted, y0, self.velocity(target, self.scale), self.sigmas, self.etas)  # 4.

    def _invert_and_sample(self, request: EditRequest, prompt: str) -> EditResult:
        c = self.components
        y0 = c.encode_image(request.image)  # 1.
        (image,) = c.decode_latents(self.edit_latents(y0, c.conditioning([prompt]), request.generator()))  # 5.
        return EditResult(edited=image, extras={"backward_passes": 0})

    def _edit(self, request: EditRequest) -> EditResult:
        return self._invert_and_sample(request, request.target_prompt)

    def _reconstruct(self, request: EditRequest) -> EditResult:
        result = self._invert_and_sample(request, request.source_prompt)
        result.reconstruction = result.edited
        return result
