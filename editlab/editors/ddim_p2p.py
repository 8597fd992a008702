"""DDIM inversion + Prompt-to-Prompt, as the PIE-Bench reference runs it.

1. Encode the source image (VAE posterior mean x scaling factor), latent z*_0 [1, 4, h, w].
2. DDIM-invert with the source prompt only, no guidance, 50 steps on the grid 0, 20, ..., 980 (the UNet is
   evaluated at the destination timestep): z*_0 ... z*_50. The first step is the identity (abar_final = abar_0).
3. From x_T = z*_50, denoise the batch [source, target] with classifier-free guidance 7.5 under the P2P controller
   (Refine + LocalBlend + x2 re-weight of the target blend word when blend words are given), cross-attention
   replacement for 40 % of the steps, self-attention for 60 %.
4. Decode: row 0 is the reconstruction (P2P never touches the source branch), row 1 the edit.

The inversion task (`_reconstruct`) runs steps 1-3 with the source prompt alone and no controller: the
reconstruction at the editor's guidance, which is what the method's edits start from.

Subclasses change one step: `null_embeddings` (Null-Text / Negative-Prompt Inversion) or `source_correction`
(Direct Inversion). Every pass runs the shared `diffusion.solver.solve`.
"""

from __future__ import annotations

import contextlib

import torch

from editlab.diffusion.solver import StepHook, noisier_end, solve
from editlab.editors.attention import controlled_attention
from editlab.editors.base import Editor, EditRequest, EditResult, register
from editlab.editors.p2p import P2PSettings, make_controller
from editlab.models.guidance import Guidance


@register("ddim_p2p")
class DDIMP2PEditor(Editor):
    tasks = ("edit", "inversion")
    families = ("sd",)

    def __init__(
        self,
        components,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        p2p: P2PSettings = P2PSettings(),
    ):
        super().__init__(components)
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.p2p = p2p
        self.pairs = components.schedule.pairs(num_steps)  # 980 -> 960, ..., 0 -> -20
        self.inversion_pairs = components.schedule.pairs(num_steps, inverse=True)

    # -- 2. inversion ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, z0: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        """Conditional DDIM inversion: [z*_0, ..., z*_N], each [1, 4, h, w] in fp32."""
        c = self.components
        return solve(z0, self.inversion_pairs, lambda i, z, t: c.predict(z, t, cond), c.schedule, at=noisier_end,
                     skip_identity=True)

    def null_embeddings(self, trajectory: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor
                        ) -> tuple[list[torch.Tensor], dict]:
        """Unconditional embedding for each denoising step, plus figures for the result's extras: the plain ""
        embedding (NTI optimises these, NPI uses the source prompt's)."""
        return [uncond] * self.num_steps, {}

    def source_correction(self, trajectory: list[torch.Tensor], text: torch.Tensor,
                          uncond_steps: list[torch.Tensor], request: EditRequest) -> StepHook | None:
        """A hook applied to the latents after each denoising step, before LocalBlend (Direct Inversion's)."""
        return None

    # -- 3. guided P2P denoising ----------------------------------------------------------------------------------
    @torch.no_grad()
    def guided_loop(self, x_t: torch.Tensor, text: torch.Tensor, uncond_steps: list[torch.Tensor], controller,
                    after: StepHook | None) -> torch.Tensor:
        """CFG DDIM of the batch x_t [P, 4, h, w] with text [P, 77, D] under ``controller`` (None: plain attention)
        -> [P, 4, h, w]."""
        c = self.components
        guidance = Guidance(c.predict)  # the batch [uncond x P, cond x P] when guided, else [cond x P]
        if controller is not None:
            controller.has_uncond = guidance.needs_uncond(self.guidance_scale)

        def eps(i: int, latents: torch.Tensor, t: int) -> torch.Tensor:
            if controller is not None:
                controller.step = i
            return guidance(latents, t, text, self.guidance_scale, uncond_steps[i])

        with controlled_attention(c.unet, controller) if controller is not None else contextlib.nullcontext():
            return solve(x_t, self.pairs, eps, c.schedule, after=after)[-1]

    def denoise(self, x_t: torch.Tensor, text: torch.Tensor, uncond_steps: list[torch.Tensor], controller,
                correction: StepHook | None = None) -> torch.Tensor:
        """x_t [1, 4, h, w], text [P, 77, D] -> final latents [P, 4, h, w]."""

        def after(i: int, latents: torch.Tensor) -> torch.Tensor:
            return controller.step_callback(latents if correction is None else correction(i, latents))

        x_t = x_t.expand(text.shape[0], -1, -1, -1).clone()
        return self.guided_loop(x_t, text, uncond_steps, controller, after)

    def make_controller(self, request: EditRequest):
        c = self.components
        prompts = [request.source_prompt, request.target_prompt]
        return make_controller(prompts, c.tokenizer, self.num_steps, c.latent_size, c.blend_resolution,
                               request.blend_words, self.p2p)

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        text = c.encode_prompts([request.source_prompt, request.target_prompt])  # [2, 77, D]
        uncond = c.encode_prompts([""])  # [1, 77, D]
        controller = self.make_controller(request)  # built first: bad blend words fail before any work
        z0 = c.encode_image(request.image)  # [1, 4, h, w]
        trajectory = self.invert(z0, text[:1])
        uncond_steps, extras = self.null_embeddings(trajectory, text[:1], uncond)
        correction = self.source_correction(trajectory, text, uncond_steps, request)
        latents = self.denoise(trajectory[-1], text, uncond_steps, controller, correction)
        reconstruction, edited = c.decode_latents(latents)
        return EditResult(edited=edited, reconstruction=reconstruction, extras={"backward_passes": 0, **extras})

    def _reconstruct(self, request: EditRequest) -> EditResult:
        c = self.components
        text = c.encode_prompts([request.source_prompt])  # [1, 77, D]
        trajectory = self.invert(c.encode_image(request.image), text)
        uncond_steps, extras = self.null_embeddings(trajectory, text, c.encode_prompts([""]))
        (reconstruction,) = c.decode_latents(self.guided_loop(trajectory[-1], text, uncond_steps, None, None))
        return EditResult(edited=reconstruction, reconstruction=reconstruction,
                          extras={"backward_passes": 0, **extras})
