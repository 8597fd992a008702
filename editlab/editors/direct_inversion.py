"""Direct Inversion ("PnP Inversion", Ju et al. 2024) + Prompt-to-Prompt, as the PIE-Bench reference runs it.

1. Encode the source image and DDIM-invert it with the source prompt, no guidance (`DDIMP2PEditor.invert`):
   z*_0 ... z*_N.
2. Offset pass: from x_T = z*_N, run the guided (w = 7.5, "" unconditional embedding) P2P batch [source, target]
   and, at each step i, record the source row's prediction ẑ_i and so its gap to the inversion trajectory,
   d_i = z*_{N-1-i} − ẑ_i, then snap the running latent back to z*_{N-1-i} (each step starts on the trajectory).
3. Edit pass: the DDIM + P2P edit (`DDIMP2PEditor.denoise`) with d_i added to the source row only after each
   scheduler step (the `source_correction` hook, before LocalBlend, as the reference). The source branch walks
   z*_{N-1}, ..., z*_0 and its attention maps, which P2P injects into the target, are those of the exact inversion
   path; the target branch is left free.
4. Decode: row 0 is the reconstruction (the inversion's own z*_0), row 1 the edit.

Two choices where the reference is loose, both so that the source branch reproduces the inversion trajectory
exactly rather than up to amplified rounding (on the tiny test model at w = 7.5 a one-ulp change of the input moves
the next latent by ~1e-5, and that compounds over the steps):
- the offset pass runs under a fresh controller of the same configuration (the reference's runs with stock
  attention), so the source row goes through the very kernels of the edit pass: the same layers materialise their
  probabilities at each step, and P2P never edits the source row, so its prediction in the edit pass is the offset
  pass's one, bit for bit on CPU;
- the correction x + d_i, x being the edit pass's source row after the scheduler step, is summed as
  z*_{N-1-i} + (x − ẑ_i): the same quantity, ordered so that an unchanged source prediction (x = ẑ_i) lands on z*
  exactly instead of one rounding away from it.

Cost, in UNet forward calls (one call = one network evaluation, whatever its batch): inversion N-1 (batch 1) +
offset pass N (batch 2 x 2 prompts) + edit N (batch 2 x 2 prompts) = 3N - 1, one pass more than DDIM + P2P;
``extras["backward_passes"]`` is 0.
"""

from __future__ import annotations

import torch

from editlab.diffusion.solver import StepHook
from editlab.editors.base import EditRequest, register
from editlab.editors.ddim_p2p import DDIMP2PEditor


@register("direct_inversion")
class DirectInversionEditor(DDIMP2PEditor):
    tasks = ("edit",)  # its source branch is the inversion trajectory itself: a reconstruction would be exact

    # -- 2. offset pass ---------------------------------------------------------------------------------------------
    def source_predictions(self, trajectory: list[torch.Tensor], text: torch.Tensor,
                           uncond_steps: list[torch.Tensor], controller) -> list[torch.Tensor]:
        """ẑ_i, the source row's guided DDIM step from z*_{N-i} (so d_i = z*_{N-1-i} − ẑ_i); text [P, 77, D]."""
        prompts = text.shape[0]
        targets = trajectory[-2::-1]  # z*_{N-1}, ..., z*_0
        predictions = []

        def snap(i: int, latents: torch.Tensor) -> torch.Tensor:  # record ẑ_i, start the next step on z*_{N-1-i}
            predictions.append(latents[:1])
            return targets[i].expand(prompts, -1, -1, -1)

        self.guided_loop(trajectory[-1].expand(prompts, -1, -1, -1), text, uncond_steps, controller, snap)
        return predictions

    # -- 3. the edit pass's correction --------------------------------------------------------------------------------
    def source_correction(self, trajectory: list[torch.Tensor], text: torch.Tensor,
                          uncond_steps: list[torch.Tensor], request: EditRequest) -> StepHook:
        """Source row x += d_i, summed as z*_{N-1-i} + (x − ẑ_i); target rows untouched. latents [P, 4, h, w]."""
        targets = trajectory[-2::-1]  # z*_{N-1}, ..., z*_0
        predictions = self.source_predictions(trajectory, text, uncond_steps, self.make_controller(request))

        def correct(i: int, latents: torch.Tensor) -> torch.Tensor:
            source = targets[i] + (latents[:1] - predictions[i])
            return torch.cat([source, latents[1:]])

        return correct
