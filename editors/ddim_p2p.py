"""DDIM inversion + Prompt-to-Prompt, as the PIE-Bench reference runs it.

1. Encode the source image (VAE posterior mean x scaling factor), latent z*_0 [1, 4, h, w].
2. DDIM-invert with the source prompt only, no guidance, 50 steps on the grid 0, 20, ..., 980 (the UNet is
   evaluated at the destination timestep): z*_0 ... z*_50. The first step is the identity (abar_final = abar_0).
3. From x_T = z*_50, denoise the batch [source, target] with classifier-free guidance 7.5 under the P2P controller
   (Refine + LocalBlend + x2 re-weight of the target blend word when blend words are given), cross-attention
   replacement for 40 % of the steps, self-attention for 60 %.
4. Decode: row 0 is the reconstruction (P2P never touches the source branch), row 1 the edit.

Subclasses change one step: `null_embeddings` (Null-Text / Negative-Prompt Inversion), or `prepare_denoise` and
`correct_latents` (Direct Inversion).
"""

from __future__ import annotations

import torch

from diffusion.ddim import abar_at, cfg, ddim_jump, ddim_timesteps
from editors.base import Editor, EditRequest, EditResult, register
from editors.p2p import controlled_attention, make_controller


@register("ddim_p2p")
class DDIMP2PEditor(Editor):
    def __init__(
        self,
        components,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        cross_replace_steps: float = 0.4,
        self_replace_steps: float = 0.6,
        mode: str = "refine",
        amplify: float = 2.0,
        local_blend: bool = True,
        blend_start: float = 0.2,
        blend_threshold: float = 0.3,
    ):
        super().__init__(components)
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.controller_args = dict(
            cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps, mode=mode,
            amplify=amplify, local_blend=local_blend, blend_start=blend_start, blend_threshold=blend_threshold,
        )
        self.timesteps = ddim_timesteps(num_steps, components.scheduler.config.num_train_timesteps)
        self.stride = components.scheduler.config.num_train_timesteps // num_steps

    def abar(self, t: int) -> torch.Tensor:
        c = self.components
        return abar_at(c.alphas_cumprod, t, c.scheduler.final_alpha_cumprod).to(c.device)

    # -- 2. inversion ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, z0: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        """Conditional DDIM inversion: [z*_0, ..., z*_N], each [1, 4, h, w] in fp32."""
        trajectory = [z0]
        z = z0
        for t in reversed(self.timesteps):  # 0, 20, ..., 980
            abar_from, abar_to = self.abar(t - self.stride), self.abar(t)
            if not torch.equal(abar_from, abar_to):  # the first step is exactly the identity: skip its UNet call
                z = ddim_jump(z, self.components.predict(z, t, cond), abar_from, abar_to)
            trajectory.append(z)
        return trajectory

    def null_embeddings(self, trajectory: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor):
        """Unconditional embedding for each denoising step: the plain "" embedding (NTI optimises these)."""
        return [uncond] * self.num_steps

    def prepare_denoise(self, trajectory: list[torch.Tensor], text: torch.Tensor, uncond_steps: list[torch.Tensor],
                        request: EditRequest) -> None:
        """Hook before the edit pass (Direct Inversion runs its offset pass here)."""

    def correct_latents(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Hook after each denoising step (Direct Inversion adds its recorded offset to the source row)."""
        return latents

    # -- 3. guided P2P denoising ----------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, text: torch.Tensor, uncond_steps: list[torch.Tensor], controller):
        """x_t [1, 4, h, w], text [P, 77, D] -> final latents [P, 4, h, w]."""
        c = self.components
        prompts = text.shape[0]
        latents = x_t.expand(prompts, -1, -1, -1).clone()
        with controlled_attention(c.unet, controller):
            for i, t in enumerate(self.timesteps):
                controller.step = i
                context = torch.cat([uncond_steps[i].expand(prompts, -1, -1), text])  # [uncond x P, cond x P]
                eps_uncond, eps_cond = c.predict(torch.cat([latents] * 2), t, context).chunk(2)
                eps = cfg(eps_uncond, eps_cond, self.guidance_scale)
                latents = ddim_jump(latents, eps, self.abar(t), self.abar(t - self.stride))
                latents = self.correct_latents(i, latents)
                latents = controller.step_callback(latents)
        return latents

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        prompts = [request.source_prompt, request.target_prompt]
        text = c.encode_prompts(prompts)  # [2, 77, D]
        uncond = c.encode_prompts([""])  # [1, 77, D]
        controller = make_controller(prompts, c.tokenizer, self.num_steps, c.latent_size, c.blend_resolution,
                                     request.blend_words,
                                     **self.controller_args)  # built first: bad blend words fail before any work
        z0 = c.encode_image(request.image)  # [1, 4, h, w]
        trajectory = self.invert(z0, text[:1])
        uncond_steps = self.null_embeddings(trajectory, text[:1], uncond)
        self.prepare_denoise(trajectory, text, uncond_steps, request)
        latents = self.denoise(trajectory[-1], text, uncond_steps, controller)
        reconstruction, edited = c.decode_latents(latents)
        return EditResult(edited=edited, reconstruction=reconstruction)
