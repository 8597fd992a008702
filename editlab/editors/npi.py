"""Negative-Prompt Inversion + Prompt-to-Prompt (Miyake et al. 2023), as the PIE-Bench reference runs it.

1. Encode the source image and DDIM-invert it with the source prompt, no guidance (`DDIMP2PEditor.invert`).
2. Use the source prompt's conditional embedding as the "unconditional" embedding at every denoising step, for both
   prompts: the closed-form stand-in for Null-Text Inversion's optimised ∅ (no optimisation, no backward pass).
   For the source row ε_u = ε_c, so guidance vanishes and that row denoises with the conditional prediction alone,
   i.e. it retraces the inversion up to the usual DDIM approximation.
3. Edit exactly as DDIM + P2P (`DDIMP2PEditor.denoise`): row 0 is the reconstruction, row 1 the edit, whose guidance
   is ε_src + w·(ε_tgt − ε_src) (the target prompt pushed away from the source prompt).

The reference's proximal-guidance options are off for this row (``proximal=None``); they are not implemented.

Cost, in UNet forward calls (one call = one network evaluation, whatever its batch): inversion N-1 (batch 1) + edit
N (batch 2 x 2 prompts) = 2N - 1, the same as DDIM + P2P; ``extras["backward_passes"]`` is 0.
"""

from __future__ import annotations

import torch

from editlab.editors.base import register
from editlab.editors.ddim_p2p import DDIMP2PEditor


@register("npi")
class NegativePromptInversionEditor(DDIMP2PEditor):
    def null_embeddings(self, trajectory: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor
                        ) -> tuple[list[torch.Tensor], dict]:
        """Step 2: the source prompt's embedding cond [1, 77, D] replaces ∅ at every step."""
        return [cond] * self.num_steps, {}
