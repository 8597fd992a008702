"""Plain DDIM: the teacher's 50-step inversion, reconstruction and text-to-image, with guidance on either side.

The reference point of the iCD paper's inversion and generation tables ("fDDIM50 | DDIM50"), and the naive DDIM
editing baseline (invert with the source prompt, denoise with the target prompt, no attention control).

1. Encode the source image (VAE posterior mean), z_0 [1, 4, h, w].
2. Invert over the grid 0, 20, ..., 980 with the source prompt (the encoder): classic CFG
   ``inversion_guidance_scale`` (1 = the conditional prediction, as every DDIM inversion of the P2P family), applied
   only where t <= 1000 ``inversion_tau`` (dynamic CFG; 1 = everywhere).
3. Denoise from z_T with the target prompt (edit) or the source prompt (inversion task), or from seeded noise with
   the prompt (generation task): classic CFG ``guidance_scale`` where t <= 1000 ``tau``, conditional above.
4. Decode.

Guidance here is classic (eps_u + w (eps_c - eps_u), 1 = unguided); the iCD paper's "w = 8" is classic 8, which is
code units 7 for the iCD editor. Cost: N - 1 inversion calls (the first step is the identity) + N denoising calls; a
guided step evaluates [uncond, cond] in one call of batch 2, an unguided one the conditional row alone.
"""

from __future__ import annotations

import torch

from editlab.diffusion.solver import noisier_end, solve
from editlab.editors.base import Editor, EditRequest, EditResult, register
from editlab.models.conditioning import Conditioning
from editlab.models.guidance import Guidance


@register("ddim")
class DDIMEditor(Editor):
    tasks = ("edit", "inversion", "generation")

    def __init__(
        self,
        components,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        tau: float = 1.0,
        inversion_guidance_scale: float = 1.0,
        inversion_tau: float = 1.0,
    ):
        super().__init__(components)
        self.num_steps = num_steps
        self.guidance_scale, self.tau = guidance_scale, tau
        self.inversion_guidance_scale, self.inversion_tau = inversion_guidance_scale, inversion_tau
        self.pairs = components.schedule.pairs(num_steps)
        self.inversion_pairs = components.schedule.pairs(num_steps, inverse=True)

    def _prediction_fn(self, text: Conditioning, uncond: Conditioning, scale: float, tau: float):
        """The model's prediction (i, z, t) with classic CFG ``scale`` where t is at most tau of the way to noise,
        the conditional prediction elsewhere."""
        c = self.components
        guidance = Guidance(c.predict)

        def predict(i: int, z: torch.Tensor, t) -> torch.Tensor:
            return guidance(z, t, text, 1.0 if c.schedule.noisier_than(t, tau) else scale, uncond)

        return predict

    def _solve(self, z: torch.Tensor, pairs, predict, **options) -> torch.Tensor:
        c = self.components
        return solve(z, pairs, predict, c.schedule, predicts=c.prediction_type, **options)[-1]

    @torch.no_grad()
    def invert(self, z0: torch.Tensor, text: Conditioning, uncond: Conditioning) -> torch.Tensor:
        """z_0 [1, C, h, w] -> z_T with the encoder's guidance."""
        predict = self._prediction_fn(text, uncond, self.inversion_guidance_scale, self.inversion_tau)
        return self._solve(z0, self.inversion_pairs, predict, at=noisier_end, skip_identity=True)

    @torch.no_grad()
    def denoise(self, z_T: torch.Tensor, text: Conditioning, uncond: Conditioning) -> torch.Tensor:
        """z_T [1, C, h, w] -> z_0 with the decoder's guidance."""
        return self._solve(z_T, self.pairs, self._prediction_fn(text, uncond, self.guidance_scale, self.tau))

    def _invert_denoise(self, image, source: str, target: str) -> EditResult:
        c = self.components
        text = c.conditioning([source] if source == target else [source, target])  # 1 or 2 rows
        uncond = c.unconditional()  # 1 row
        z_T = self.invert(c.encode_image(image), text[:1], uncond)
        (image,) = c.decode_latents(self.denoise(z_T, text[-1:], uncond))
        return EditResult(edited=image, extras={"backward_passes": 0})

    def _edit(self, request: EditRequest) -> EditResult:
        return self._invert_denoise(request.image, request.source_prompt, request.target_prompt)

    def _reconstruct(self, request: EditRequest) -> EditResult:
        result = self._invert_denoise(request.image, request.source_prompt, request.source_prompt)
        result.reconstruction = result.edited
        return result

    def _generate(self, request: EditRequest) -> EditResult:
        c = self.components
        text, uncond = c.conditioning([request.source_prompt]), c.unconditional()
        shape = (1, c.latent_channels, c.latent_size, c.latent_size)
        z_T = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed)).to(c.device, torch.float32)
        (image,) = c.decode_latents(self.denoise(z_T, text, uncond))
        return EditResult(edited=image, extras={"backward_passes": 0})
