"""FlowEdit (Kulikov et al., ICCV 2025): inversion-free editing by an ODE on the difference of two velocities.

Works in rectified-flow coordinates z = (1 - r) x0 + r n, r in [0, 1]. A flow-matching model is there already; an
epsilon (or v) model is too through z = x / (alpha + sigma), r = sigma / (alpha + sigma): its velocity is
eps-hat - x0-hat (`diffusion.predictions.flow_velocity`), which is the epsilon form the FlowEdit authors give
(fallenshock/FlowEdit issue #3) exactly. So one loop serves SD3 / FLUX and SD1.x, SDXL, iCD and the toy world.

1. Encode the source image: X = z_0 [1, C, h, w]; the edit Z starts at X.
2. For the last ``n_max`` of ``num_steps`` grid steps, r_i -> r_{i+1} (the model's own grid, 0 appended):
   a. FlowEdit phase (while more than ``n_min`` steps remain), for each of ``n_avg`` fresh draws n ~ N(0, I):
      z_src = (1 - r_i) X + r_i n,  z_tar = z_src + (Z - X)  (this order keeps a same-prompt edit exactly X),
      and average  D = v(z_tar; target, w_tar) - v(z_src; source, w_src)  over the draws;
      Z <- Z + (r_{i+1} - r_i) D.
   b. SDEdit tail (the last ``n_min`` steps): draw n once, z = z_src + (Z - X), then plain Euler steps of
      v(z; target, w_tar); the output is that z.
3. Decode Z.

Both velocities of a draw are one network call under the family's guidance with per-row scales
(``source_guidance_scale`` / ``target_guidance_scale``): two-pass CFG with rows [uncond x 2, source, target] ("" as
the negative prompt; the two rows alone where neither is guided), or FLUX-dev's embedded scale on the two rows
(`editor=flowedit_flux`, the authors' FLUX settings). Cost: n_avg (n_max - n_min) + n_min calls. Noise comes from
the request's seed (the original seeds once per run, so an item's result depended on its position in the run).

Defaults are the authors' SD3 settings (T = 50, n_max = 33, CFG 3.5 / 13.5, n_avg = 1). On epsilon models the
grid is the DDIM one (980 ... 0 at T = 50, r from 0.93), an editlab configuration the paper does not report.
"""

from __future__ import annotations

import torch

from editlab.diffusion.predictions import flow_velocity
from editlab.diffusion.schedules import FlowSchedule
from editlab.diffusion.solver import euler_step, solve
from editlab.editors.base import Editor, EditorConfigError, EditRequest, EditResult, register
from editlab.models.conditioning import Conditioning

RECTIFIED = FlowSchedule()  # the Euler arithmetic in rectified-flow time r (alpha = 1 - r, sigma = r)


@register("flowedit")
class FlowEditEditor(Editor):
    tasks = ("edit",)

    def __init__(
        self,
        components,
        num_steps: int = 50,
        n_max: int = 33,
        n_min: int = 0,
        n_avg: int = 1,
        source_guidance_scale: float = 3.5,
        target_guidance_scale: float = 13.5,
    ):
        super().__init__(components)
        if not 0 <= n_min <= n_max <= num_steps or n_avg < 1:
            raise EditorConfigError(f"flowedit needs 0 <= n_min <= n_max <= num_steps and n_avg >= 1; got n_min="
                                    f"{n_min}, n_max={n_max}, num_steps={num_steps}, n_avg={n_avg}")
        self.n_min, self.n_avg = n_min, n_avg
        self.scales = torch.tensor([source_guidance_scale, target_guidance_scale])
        self.guidance = components.guidance()  # the family's: two-pass CFG, FLUX-dev's embedded scale
        # the model's times t of the edited steps and their flow times r (the last step ends at r = 0)
        schedule = components.schedule
        pairs = schedule.pairs(num_steps)[num_steps - n_max:]
        self.times = [t for t, _ in pairs]
        flow = [float(schedule.flow_time(t)) for t in self.times] + [0.0]
        self.flow_pairs = list(zip(flow[:-1], flow[1:]))

    def velocity(self, i: int, z: torch.Tensor, text: Conditioning, uncond: Conditioning,
                 scales: torch.Tensor) -> torch.Tensor:
        """dz/dr at edited step i for the rows z [B, C, h, w] with their prompts and CFG scales [B]."""
        c, t = self.components, self.times[i]
        alpha, sigma = (v.to(z) for v in c.schedule.scales(t))
        x = (alpha + sigma) * z  # the model's own coordinates
        return flow_velocity(self.guidance(x, t, text, scales, uncond), c.prediction_type, x, alpha, sigma)

    @torch.no_grad()
    def edit_latents(self, x_src: torch.Tensor, text: Conditioning, uncond: Conditioning,
                     generator: torch.Generator) -> torch.Tensor:
        """X [1, C, h, w], text [source, target] -> the edited latent [1, C, h, w]."""
        edits = len(self.flow_pairs) - self.n_min

        def noised(r: float) -> torch.Tensor:  # (1 - r) X + r n, a fresh draw
            return (1 - r) * x_src + r * torch.randn(x_src.shape, generator=generator).to(x_src)

        # 2a. FlowEdit phase: the averaged velocity difference of the pair (z_src, z_tar) drives Z
        def difference(i: int, z: torch.Tensor, r: float) -> torch.Tensor:
            total = torch.zeros_like(z)
            for _ in range(self.n_avg):
                z_src = noised(r)
                v_src, v_tar = self.velocity(i, torch.cat([z_src, z_src + (z - x_src)]), text, uncond,
                                             self.scales).chunk(2)
                total += v_tar - v_src
            return total / self.n_avg

        z = solve(x_src, self.flow_pairs[:edits], difference, RECTIFIED, step=euler_step, predicts="flow")[-1]

        # 2b. SDEdit tail: from one draw around the edit, plain Euler steps of the target's velocity
        if self.n_min:
            tail = self.flow_pairs[edits:]

            def target(i: int, z: torch.Tensor, r: float) -> torch.Tensor:
                return self.velocity(edits + i, z, text[1:], uncond, self.scales[1:])

            z = solve(noised(tail[0][0]) + (z - x_src), tail, target, RECTIFIED, step=euler_step, predicts="flow")[-1]
        return z

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        text = c.conditioning([request.source_prompt, request.target_prompt])  # [source, target]
        x_src = c.encode_image(request.image)  # 1.
        z = self.edit_latents(x_src, text, c.unconditional(), request.generator())  # 2.
        (edited,) = c.decode_latents(z)  # 3.
        return EditResult(edited=edited, extras={"backward_passes": 0})
