"""Direct Inversion ("PnP Inversion", Ju et al. 2024) + Prompt-to-Prompt, as the PIE-Bench reference runs it.

1. Encode the source image and DDIM-invert it with the source prompt, no guidance (`DDIMP2PEditor.invert`):
   z*_0 ... z*_N.
2. Offset pass: from x_T = z*_N, run the guided (w = 7.5, "" unconditional embedding) P2P batch [source, target]
   and, at each step i, record the source row's gap to the inversion trajectory, d_i = z*_{N-1-i} − ẑ_i, then snap
   the running latent back to z*_{N-1-i} (each step starts on the trajectory).
3. Edit pass: the DDIM + P2P edit (`DDIMP2PEditor.denoise`) with d_i added to the source row only after each
   scheduler step (`correct_latents`, before LocalBlend, as the reference). The source branch therefore walks
   z*_{N-1}, ..., z*_0 (its input at every step is the one the offset pass saw) and its attention maps, which P2P
   injects into the target, are those of the exact inversion path; the target branch is left free.
4. Decode: row 0 is the reconstruction (the inversion's own z*_0, up to float rounding), row 1 the edit.

Where the reference is loose (its offset pass runs with stock attention), the offset pass here runs under a fresh
controller of the same configuration, so the source row goes through the very kernels of the edit pass (the layers
whose probabilities P2P materialises are the same at every step, and P2P never edits the source row): the source
prediction in the edit pass is then the offset pass's one, and the reconstruction reproduces z*_0 at float-rounding
level rather than at the level of the softmax-vs-fused-attention difference.

Cost, in UNet forward calls (one call = one network evaluation, whatever its batch): inversion N-1 (batch 1) +
offset pass N (batch 2 x 2 prompts) + edit N (batch 2 x 2 prompts) = 3N - 1, one pass more than DDIM + P2P;
``extras["backward_passes"]`` is 0.
"""

from __future__ import annotations

import torch

from editors.base import EditRequest, EditResult, register
from editors.ddim_p2p import DDIMP2PEditor
from editors.p2p import controlled_attention, make_controller
from icd.ddim import cfg, ddim_jump


@register("direct_inversion")
class DirectInversionEditor(DDIMP2PEditor):
    def __init__(self, components, **p2p_args):
        super().__init__(components, **p2p_args)
        self.offsets: list[torch.Tensor] = []  # d_i, each [1, 4, h, w], of the edit in progress

    # -- 2. offset pass ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def source_offsets(self, trajectory: list[torch.Tensor], text: torch.Tensor, uncond_steps: list[torch.Tensor],
                       controller) -> list[torch.Tensor]:
        """d_i = z*_{N-1-i} − ẑ_i for the source row, with each step started from z*_{N-i}; text [P, 77, D]."""
        c = self.components
        prompts = text.shape[0]
        offsets = []
        with controlled_attention(c.unet, controller):
            for i, t in enumerate(self.timesteps):
                controller.step = i
                latents = trajectory[self.num_steps - i].expand(prompts, -1, -1, -1)  # snapped: [P, 4, h, w]
                context = torch.cat([uncond_steps[i].expand(prompts, -1, -1), text])  # [uncond x P, cond x P]
                eps_uncond, eps_cond = c.unet_eps(torch.cat([latents] * 2), t, context).chunk(2)
                eps = cfg(eps_uncond, eps_cond, self.guidance_scale)
                predicted = ddim_jump(latents, eps, self.abar(t), self.abar(t - self.stride))  # ẑ_i
                offsets.append(trajectory[self.num_steps - 1 - i] - predicted[:1])
        return offsets

    # -- 3. the edit pass's correction --------------------------------------------------------------------------------
    def correct_latents(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Source row += d_i; the target rows are untouched. latents [P, 4, h, w]."""
        return torch.cat([latents[:1] + self.offsets[step], latents[1:]])

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        prompts = [request.source_prompt, request.target_prompt]
        text = c.encode_prompts(prompts)  # [2, 77, D]
        uncond = c.encode_prompts([""])  # [1, 77, D]
        controller = make_controller(prompts, c.tokenizer, self.num_steps, c.latent_size, request.blend_words,
                                     **self.controller_args)  # built first: bad blend words fail before any work
        z0 = c.encode_image(request.image)  # [1, 4, h, w]
        trajectory = self.invert(z0, text[:1])
        uncond_steps = self.null_embeddings(trajectory, text[:1], uncond)
        offset_controller = make_controller(prompts, c.tokenizer, self.num_steps, c.latent_size,
                                            request.blend_words, **self.controller_args)
        self.offsets = self.source_offsets(trajectory, text, uncond_steps, offset_controller)
        try:
            latents = self.denoise(trajectory[-1], text, uncond_steps, controller)
        finally:
            self.offsets = []
        reconstruction, edited = c.decode_latents(latents)
        return EditResult(edited=edited, reconstruction=reconstruction, extras={"backward_passes": 0})
