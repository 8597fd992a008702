"""Null-Text Inversion + Prompt-to-Prompt (Mokady et al. 2023), as the PIE-Bench reference runs it.

1. Encode the source image and DDIM-invert it with the source prompt, no guidance (`DDIMP2PEditor.invert`):
   z*_0 ... z*_N.
2. Optimise one unconditional ("null-text") embedding per denoising step i = 0 .. N-1 (timestep t_i), starting from
   z̄_0 = z*_N:
   a. ε_c = ε(z̄_i, t_i, c_src), once, without gradient;
   b. warm start ∅_i from ∅_{i-1} (∅_{-1} is the "" embedding) and take up to ``num_inner_steps`` Adam steps with
      learning rate ``learning_rate``·(1 - i/100) on
          L(∅) = MSE( DDIM(z̄_i, ε(z̄_i, t_i, ∅) + w·(ε_c - ε(z̄_i, t_i, ∅)), t_i -> t_{i+1}), z*_{N-1-i} ),
      stopping early (after the step, as the reference does) once L < ``early_stop_epsilon`` + 2e-5·i;
   c. advance z̄_{i+1} with full guidance w = 7.5 and the optimised ∅_i, without gradient.
3. Edit exactly as DDIM + P2P (`DDIMP2PEditor.denoise`) with ∅_i as the unconditional embedding of both prompts at
   step i; row 0 is the reconstruction, row 1 the edit.

The last denoising step (t = 0, ᾱ_final = ᾱ_0) is the identity: L does not depend on ∅ there, the gradient is zero
and the reference's Adam makes no update, so it is skipped and ∅_{N-1} = ∅_{N-2} exactly.

Precision: the optimisation always runs in fp32. In half precision the editor keeps an fp32 copy of the UNet of its
own for step 2 (SD1.5: 3.4 GB beside the shared 1.7 GB, for the editor's lifetime; the shared model is never cast),
which avoids the NaNs and the below-resolution early-stop threshold (1e-5 on a latent MSE) of fp16 NTI. A
non-finite loss or latent raises `FloatingPointError` instead of producing a result.

Cost, in UNet forward calls (one call = one network evaluation, whatever its batch; backward passes are not forward
calls and are reported separately in ``extras["backward_passes"]``):
    inversion N-1  +  optimisation Σ_i (k_i + 2) over the N-1 non-identity steps  +  edit N  (batch 2 x 2 prompts),
with k_i ≤ ``num_inner_steps`` the Adam steps taken at step i (each one forward + one backward pass at batch 1), the
2 being ε_c and the advance's ε(z̄_i, ∅_i) (ε_c is reused for the advance). The reference's upper bound at 50 steps:
49 + 49·12 + 50 = 687 forward and 490 backward passes. ``num_inner_steps=0`` is exactly DDIM + P2P (2N - 1 calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.optim import Adam

from editlab.diffusion.ddim import ddim_jump
from editlab.diffusion.solver import solve
from editlab.editors.base import register
from editlab.editors.ddim_p2p import DDIMP2PEditor
from editlab.models.copies import own_copy
from editlab.models.guidance import combine


def nti_learning_rate(step: int, base: float = 1e-2) -> float:
    """Adam learning rate at denoising step ``step``: base·(1 - step/100), 0.01 -> 0.0051 over 50 steps."""
    return base * (1.0 - step / 100)


def nti_early_stop(step: int, epsilon: float = 1e-5) -> float:
    """Loss below which the inner loop of step ``step`` stops: epsilon + 2e-5·step."""
    return epsilon + 2e-5 * step


@register("null_text")
class NullTextEditor(DDIMP2PEditor):
    def __init__(
        self,
        components,
        num_inner_steps: int = 10,
        learning_rate: float = 1e-2,
        early_stop_epsilon: float = 1e-5,
        **ddim_p2p_args,
    ):
        super().__init__(components, **ddim_p2p_args)
        self.num_inner_steps = num_inner_steps
        self.learning_rate = learning_rate
        self.early_stop_epsilon = early_stop_epsilon
        c = self.components
        # the optimisation's network: the shared UNet in fp32 runs, else an fp32 copy of the editor's own
        self.unet32 = c.unet if c.dtype == torch.float32 or num_inner_steps == 0 else own_copy(
            c.unet, torch.float32, c.device)

    def networks(self) -> list[torch.nn.Module]:
        return list({id(m): m for m in (*super().networks(), self.unet32)}.values())

    def _eps32(self, latents: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        """ε in fp32: latents [1, 4, h, w] fp32, text [1, 77, D] fp32."""
        return self.unet32(latents, torch.tensor(t, device=latents.device), encoder_hidden_states=text).sample

    def null_embeddings(self, trajectory: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor
                        ) -> tuple[list[torch.Tensor], dict]:
        """Step 2: the optimised ∅_i for each denoising step, each [1, 77, D] in the compute dtype, and the
        optimisation's figures (Adam steps and final loss per denoising step; NaN: not optimised)."""
        steps = self.num_steps
        inner_steps, final_losses = [0] * steps, [float("nan")] * steps
        extras = dict(backward_passes=0, nti_inner_steps=inner_steps, nti_final_losses=final_losses)
        if self.num_inner_steps == 0:
            return super().null_embeddings(trajectory, cond, uncond)[0], extras  # exactly DDIM + P2P
        c = self.components
        cond = cond.float()  # [1, 77, D]
        embeddings = []  # ∅_i, fp32 [1, 77, D]
        eps_conds = []  # ε_c of each step, reused by the advance

        def optimise(i: int, latent: torch.Tensor) -> torch.Tensor:
            """a-b, before the step from z̄_i: ε_c, then Adam on ∅ warm-started from ∅_{i-1} ("" for i = 0)."""
            t, s = self.pairs[i]
            abar_t, abar_s = c.schedule.abar(t), c.schedule.abar(s)  # once per step, not per Adam step
            with torch.no_grad():  # a. the conditional prediction does not depend on ∅
                eps_conds.append(self._eps32(latent, t, cond))
            target = trajectory[steps - 1 - i]  # z*_{N-1-i}
            null = (embeddings[-1] if embeddings else uncond.float()).clone().requires_grad_(True)  # Adam: in place
            optimizer = Adam([null], lr=nti_learning_rate(i, self.learning_rate))
            threshold = nti_early_stop(i, self.early_stop_epsilon)
            with torch.enable_grad():
                for _ in range(self.num_inner_steps):
                    eps = combine(self._eps32(latent, t, null), eps_conds[-1], self.guidance_scale)
                    loss = F.mse_loss(ddim_jump(latent, eps, abar_t, abar_s), target)
                    _check_finite(loss, i, t, "loss")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    inner_steps[i] += 1
                    final_losses[i] = loss.item()
                    if final_losses[i] < threshold:
                        break
            embeddings.append(null.detach())
            return latent

        @torch.no_grad()
        def advance(i: int, latent: torch.Tensor, t: int) -> torch.Tensor:
            """c. the guided step with the optimised ∅_i."""
            return combine(self._eps32(latent, t, embeddings[-1]), eps_conds[-1], self.guidance_scale)

        def check(i: int, latent: torch.Tensor) -> torch.Tensor:
            _check_finite(latent, i, self.pairs[i][0], "latent")
            return latent

        # the identity step (zero gradient, Adam would not move ∅) is skipped
        solve(trajectory[-1], self.pairs, advance, c.schedule, before=optimise, after=check, skip_identity=True)
        embeddings += (embeddings[-1:] or [uncond.float()]) * (steps - len(embeddings))  # identity step: ∅_{N-2}
        extras["backward_passes"] = sum(inner_steps)
        return [e.to(c.dtype) for e in embeddings], extras


def _check_finite(x: torch.Tensor, step: int, t: int, what: str) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"null-text optimisation produced a non-finite {what} at denoising step {step} (t={t}); "
            "the embedding is not written as a result. Check the input latent and the learning rate."
        )
