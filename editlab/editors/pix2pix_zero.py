"""Pix2Pix-Zero (Parmar et al. 2023) as the PIE-Bench reference runs it, on the shared attention processors.

1. Caption: the PIE-Bench source prompt (``caption: source_prompt``). The reference captions the image with BLIP;
   that is not implemented, and the source prompt is the caption PIE-Bench provides.
2. Edit direction: PIE-Bench has no sentence banks, so Δ = E(target prompt) − E(source prompt) on the full [77, D]
   text-encoder sequences, added token-position-wise: c_edit = E(caption) + Δ.
3. Inversion: caption-conditional DDIM inversion without guidance, each ε regularised towards white noise before it is
   used (``num_reg_steps`` rounds of ``num_ac_rolls`` auto-correlation steps ε ← ε − (λ_ac/num_ac_rolls)·∇L_ac and
   one KL step ε ← ε − λ_kl·∇L_kl; `regularize_noise`).
4. Reference pass: from x_T = z*_N, plain DDIM with CFG whose negative prompt is the caption itself, which is exactly
   ε(caption), so one batch-1 call per step. A `CrossAttentionGuidance` controller stores every cross-attention map.
5. Edit pass, from the same x_T, per step i:
   a. x_in = [x, x] (negative / edit copies) with text [caption, c_edit]; the loss
      L = Σ_layers mean_{batch·heads} Σ_{q,k} (A − A_ref)² against the stored maps of step i;
   b. one gradient step x_in ← x_in − ``xa_guidance``·∇L (the reference's SGD step, lr 0.1);
   c. recompute ε at the updated x_in (stock attention, no gradient);
   d. x ← DDIM step from the negative copy x_in[0] with CFG ``guidance_scale`` on the two predictions.
6. Decode: the reference pass is the reconstruction, the edit pass the edit.

Differences from the reference harness, all kept so the editor matches the rest of the framework: the VAE posterior
mean (not a sample) is the latent, the inversion uses the framework's DDIM grid (t = 0, 20, ..., 980, first step the
identity) instead of the reference's off-by-one inverse scheduler, and the forward passes use the same grid (not
diffusers' ``steps_offset=1``). diffusers' own pipeline is in its ``deprecated`` package; this file depends only on
`editors.attention.controlled_attention`.

Cost, in UNet forward calls (one call = one network evaluation, whatever its batch): inversion N-1 (batch 1) +
reference pass N (batch 1) + edit pass 2N (a guided forward + backward at batch 2, then the recomputation at batch 2)
= 4N - 1, with N backward passes (``extras["backward_passes"]``). With ``xa_guidance=0`` step 5a-b is skipped:
3N - 1 calls, no backward pass. The regulariser costs no UNet call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from editlab.diffusion.solver import noisier_end, solve
from editlab.editors.attention import controlled_attention
from editlab.editors.base import Editor, EditRequest, EditResult, register
from editlab.models.guidance import combine

# -- 3. noise regularisation ------------------------------------------------------------------------------------------


def auto_corr_loss(eps: torch.Tensor, generator: torch.Generator | None = None, min_size: int = 8) -> torch.Tensor:
    """Σ over channels and pyramid levels of squared auto-correlations at a random roll, along each spatial axis.

    eps [B, C, h, w]; each (sample, channel) map gets its own random shift in [0, size/2) per level and axis; the
    pyramid halves the map by average pooling until it is ``min_size`` or smaller.
    """
    x = eps.flatten(0, 1)[:, None]  # [B*C, 1, h, w]
    loss = eps.new_zeros(())
    while True:
        for axis in (2, 3):
            size = x.shape[axis]
            shifts = torch.randint(size // 2, (x.shape[0],), generator=generator).to(x.device)  # [B*C]
            index = (torch.arange(size, device=x.device)[None] - shifts[:, None]) % size  # [B*C, size]
            view = [x.shape[0], 1, 1, 1]
            view[axis] = size
            rolled = x.gather(axis, index.view(view).expand_as(x))  # torch.roll by a per-map shift
            loss = loss + (x * rolled).mean(dim=(1, 2, 3)).pow(2).sum()
        if x.shape[2] <= min_size:
            return loss
        x = F.avg_pool2d(x, kernel_size=2)


def kl_loss(eps: torch.Tensor) -> torch.Tensor:
    """KL divergence of N(mean, var) of all entries from N(0, 1), up to a factor 2: var + mean² − 1 − log var."""
    mean, var = eps.mean(), eps.var()
    return var + mean**2 - 1 - torch.log(var + 1e-7)


def regularize_noise(eps: torch.Tensor, lambda_ac: float, lambda_kl: float, num_reg_steps: int, num_ac_rolls: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Gradient steps pulling a predicted ε [B, C, h, w] towards i.i.d. N(0, 1) noise (pix2pix-zero's inversion)."""
    eps = eps.detach()
    with torch.enable_grad():
        for _ in range(num_reg_steps):
            for _ in range(num_ac_rolls if lambda_ac > 0 else 0):
                var = eps.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(auto_corr_loss(var, generator), var)
                eps = eps - lambda_ac / num_ac_rolls * grad
            if lambda_kl > 0:
                var = eps.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl_loss(var), var)
                eps = eps - lambda_kl * grad
    return eps


# -- 4./5. the attention controller -----------------------------------------------------------------------------------


class CrossAttentionGuidance:
    """Controller for `controlled_attention`: stores cross-attention maps (``mode="store"``) or accumulates the
    pix2pix-zero loss against them (``mode="guide"``); ``mode="off"`` leaves every layer on the fused kernel.

    It never edits probabilities (they are returned as they came), so the guided forward is differentiable.
    """

    def __init__(self, offload_maps: bool):
        self.step = 0
        self.mode = "off"
        self.offload_maps = offload_maps  # keep stored maps on the CPU (SD1.x 512²: ~65 MB per step in fp32)
        self.maps: list[dict[str, torch.Tensor]] = []  # per step: layer -> [heads, Q, K]
        self.loss: torch.Tensor | None = None

    def needs_probs(self, is_cross: bool, queries: int) -> bool:
        return is_cross and self.mode != "off"

    def __call__(self, probs: torch.Tensor, is_cross: bool, layer: str) -> torch.Tensor:
        """probs [B * heads, Q, K]; B = 1 when storing, 2 ([negative, edit]) when guiding."""
        if self.mode == "store":
            while len(self.maps) <= self.step:
                self.maps.append({})
            stored = probs.detach()
            self.maps[self.step][layer] = stored.cpu() if self.offload_maps else stored
        else:
            reference = self.maps[self.step][layer].to(probs.device, probs.dtype)  # [heads, Q, K]
            diff = probs.unflatten(0, (-1, reference.shape[0])) - reference  # [B, heads, Q, K]
            term = diff.float().pow(2).sum(dim=(2, 3)).mean()
            self.loss = term if self.loss is None else self.loss + term
        return probs


@register("pix2pix_zero")
class Pix2PixZeroEditor(Editor):
    families = ("sd",)
    def __init__(
        self,
        components,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        xa_guidance: float = 0.1,
        lambda_ac: float = 20.0,
        lambda_kl: float = 20.0,
        num_reg_steps: int = 5,
        num_ac_rolls: int = 5,
        caption: str = "source_prompt",
        offload_maps: bool = True,
    ):
        super().__init__(components)
        if caption != "source_prompt":
            raise ValueError(f"pix2pix_zero: caption={caption!r} is not implemented; only source_prompt "
                             "(the PIE-Bench source prompt stands in for the reference's BLIP caption)")
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.xa_guidance = xa_guidance
        self.regularizer = dict(lambda_ac=lambda_ac, lambda_kl=lambda_kl, num_reg_steps=num_reg_steps,
                                num_ac_rolls=num_ac_rolls)
        self.offload_maps = offload_maps
        self.pairs = components.schedule.pairs(num_steps)
        self.inversion_pairs = components.schedule.pairs(num_steps, inverse=True)

    # -- 3. regularised inversion -------------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, z0: torch.Tensor, caption: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Caption-conditional DDIM inversion with regularised ε: [z*_0, ..., z*_N], each [1, 4, h, w] fp32."""
        c = self.components

        def eps(i: int, z: torch.Tensor, t: int) -> torch.Tensor:
            return regularize_noise(c.predict(z, t, caption), generator=generator, **self.regularizer)

        return solve(z0, self.inversion_pairs, eps, c.schedule, at=noisier_end, skip_identity=True)

    # -- 4. reference pass --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reference(self, x_t: torch.Tensor, caption: torch.Tensor, controller: CrossAttentionGuidance) -> torch.Tensor:
        """Plain DDIM from x_t [1, 4, h, w] with ε(caption) (CFG with caption as negative), storing the maps."""
        c = self.components

        def eps(i: int, latents: torch.Tensor, t: int) -> torch.Tensor:
            controller.step = i
            return c.predict(latents, t, caption)

        controller.mode = "store"
        with controlled_attention(c.unet, controller):
            return solve(x_t, self.pairs, eps, c.schedule)[-1]

    # -- 5. guided edit pass ------------------------------------------------------------------------------------------
    def guide(self, x_in: torch.Tensor, t: int, context: torch.Tensor,
              controller: CrossAttentionGuidance) -> torch.Tensor:
        """5a-b: one gradient step on x_in [2, 4, h, w] against the stored maps of ``controller.step``."""
        controller.mode, controller.loss = "guide", None
        with torch.enable_grad():
            x_in = x_in.detach().requires_grad_(True)
            self.components.predict(x_in, t, context)  # only the attention loss is needed
            (grad,) = torch.autograd.grad(controller.loss, x_in)
        controller.mode, controller.loss = "off", None
        return (x_in - self.xa_guidance * grad).detach()

    def edit_pass(self, x_t: torch.Tensor, context: torch.Tensor, controller: CrossAttentionGuidance) -> torch.Tensor:
        """x_t [1, 4, h, w], context [caption, c_edit] [2, 77, D] -> edited latent [1, 4, h, w]."""
        c = self.components

        def copies(i: int, latents: torch.Tensor) -> torch.Tensor:  # 5a-b: the [negative, edit] copies, guided
            controller.step = i
            x_in = torch.cat([latents] * 2)
            return self.guide(x_in, self.pairs[i][0], context, controller) if self.xa_guidance > 0 else x_in

        @torch.no_grad()
        def eps(i: int, x_in: torch.Tensor, t: int) -> torch.Tensor:  # 5c
            eps_uncond, eps_cond = c.predict(x_in, t, context).chunk(2)  # each branch from its own copy
            return combine(eps_uncond, eps_cond, self.guidance_scale)

        def negative_copy(i: int, x_in: torch.Tensor) -> torch.Tensor:  # 5d: the step from x_in[0]
            return x_in[:1]

        with controlled_attention(c.unet, controller):
            return solve(x_t, self.pairs, eps, c.schedule, before=copies, after=negative_copy)[-1]

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        generator = request.generator()  # the auto-correlation loss's random rolls

        # 1-2. caption and edit direction
        source, target = c.encode_prompts([request.source_prompt, request.target_prompt])  # [77, D] each
        caption = source[None]  # [1, 77, D]
        context = torch.cat([caption, caption + (target - source)])  # [negative = caption, c_edit]

        # 3. regularised inversion
        z0 = c.encode_image(request.image)  # [1, 4, h, w]
        x_t = self.invert(z0, caption, generator)[-1]

        # 4-5. reference pass, then the cross-attention-guided edit from the same x_T
        controller = CrossAttentionGuidance(self.offload_maps and c.device.type != "cpu")
        reconstructed = self.reference(x_t, caption, controller)
        edited = self.edit_pass(x_t, context, controller)

        # 6. decode
        reconstruction, edited_image = c.decode_latents(torch.cat([reconstructed, edited]))
        backward_passes = self.num_steps if self.xa_guidance > 0 else 0
        return EditResult(edited=edited_image, reconstruction=reconstruction,
                          extras={"backward_passes": backward_passes})
