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

`run_batch` edits B requests of one task as one batch: their latents and conditionings are stacked, so each step is
one call of batch B ([B uncond rows, B cond rows] where guided) and the whole batch costs what one item does.
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
        """z_0 [B, C, h, w] -> z_T with the encoder's guidance; ``text`` has B rows (``uncond`` 1, shared)."""
        predict = self._prediction_fn(text, uncond, self.inversion_guidance_scale, self.inversion_tau)
        return self._solve(z0, self.inversion_pairs, predict, at=noisier_end, skip_identity=True)

    @torch.no_grad()
    def denoise(self, z_T: torch.Tensor, text: Conditioning, uncond: Conditioning) -> torch.Tensor:
        """z_T [B, C, h, w] -> z_0 with the decoder's guidance; ``text`` has B rows (``uncond`` 1, shared)."""
        return self._solve(z_T, self.pairs, self._prediction_fn(text, uncond, self.guidance_scale, self.tau))

    def run_batch(self, task: str, requests: list[EditRequest]) -> list[EditResult]:
        """``task`` on all ``requests`` as one batch (one denoiser call per step), the cost shared equally; images
        of different sizes do not stack, so those requests go one at a time."""
        self.check_task(task)
        if len({request.image.size for request in requests if request.image is not None}) > 1:
            return super().run_batch(task, requests)
        method = {"edit": self._edit_batch, "inversion": self._reconstruct_batch,
                  "generation": self._generate_batch}[task]
        return self._measured(lambda: method(requests))

    def _conditioning(self, prompts: list[str]) -> Conditioning:
        """One row per prompt, each distinct prompt encoded once (alone, a reconstruction encodes one prompt)."""
        distinct = list(dict.fromkeys(prompts))
        return self.components.conditioning(distinct)[[distinct.index(prompt) for prompt in prompts]]

    def _invert_denoise(self, requests: list[EditRequest], targets: list[str]) -> list[EditResult]:
        """Each request's image inverted with its source prompt and denoised with its target, all B as one batch."""
        c, n = self.components, len(requests)
        text = self._conditioning([request.source_prompt for request in requests] + targets)  # [sources, targets]
        uncond = c.unconditional()  # 1 row: guidance repeats it for the batch's rows
        z0 = torch.cat([c.encode_image(request.image) for request in requests])
        z_T = self.invert(z0, text[:n], uncond)
        images = c.decode_latents(self.denoise(z_T, text[n:], uncond))
        return [EditResult(edited=image, extras={"backward_passes": 0}) for image in images]

    def _edit_batch(self, requests: list[EditRequest]) -> list[EditResult]:
        return self._invert_denoise(requests, [request.target_prompt for request in requests])

    def _reconstruct_batch(self, requests: list[EditRequest]) -> list[EditResult]:
        results = self._invert_denoise(requests, [request.source_prompt for request in requests])
        for result in results:
            result.reconstruction = result.edited
        return results

    def _generate_batch(self, requests: list[EditRequest]) -> list[EditResult]:
        c = self.components
        text = self._conditioning([request.source_prompt for request in requests])
        shape = (1, c.latent_channels, c.latent_size, c.latent_size)
        z_T = torch.cat([torch.randn(shape, generator=request.generator()) for request in requests])  # own noise
        images = c.decode_latents(self.denoise(z_T.to(c.device, torch.float32), text, c.unconditional()))
        return [EditResult(edited=image, extras={"backward_passes": 0}) for image in images]

    def _edit(self, request: EditRequest) -> EditResult:
        return self._edit_batch([request])[0]

    def _reconstruct(self, request: EditRequest) -> EditResult:
        return self._reconstruct_batch([request])[0]

    def _generate(self, request: EditRequest) -> EditResult:
        return self._generate_batch([request])[0]
