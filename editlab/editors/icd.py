"""iCD (invertible consistency distillation) editing: 4 forward + 4 reverse UNet calls per edit.

One base UNet (the teacher: ideally the CFG-distilled SD with a w-embedding) carries two LoRA adapters, switched
per phase: ``icd_fwd`` (the forward model, image -> noise) and ``icd_rev`` (the reverse model, noise -> image).

1. Encode the source image (VAE posterior mean), x0 [1, 4, h, w], and noise it to the first forward timestep
   with a seeded noise: x_19 = sqrt(abar_19) x0 + sqrt(1 - abar_19) eps.
2. Invert with the forward model, the source prompt and no guidance over the forward pairs
   (19 -> 259), (259 -> 519), (519 -> 779), (779 -> 999): m UNet calls.
3. Decode with the reverse model over (999 -> 779), ..., (259 -> 0) with dynamic CFG (unguided for t > 1000 tau):
   - ``p2p`` (the SD1.5 recipe): the batch [source, target] under Prompt-to-Prompt (the shared controller with
     num_steps = m; cross-attention replaced on the first steps, self-attention on the first 60 %, target-only
     words re-weighted, LocalBlend after every step). The source row is never guided, so it stays a plain
     reconstruction. m UNet calls of batch 2 (4 with two-pass CFG).
   - ``prompt_switch`` (the SDXL recipe): one row that uses the source prompt unguided while t > 1000 tau and the
     target prompt with guidance below. m UNet calls.
4. Decode the latents with the VAE: with p2p, row 0 is the reconstruction and row 1 the edit.

Guidance is in code units, hence ``code_guidance_scale`` (w = 0 is the conditional prediction; the reference's 19
is classic 20). A UNet with a w-embedding takes it in one pass; a plain SD UNet gets two-pass CFG (``guidance:
cfg``), which only runs the unconditional rows on guided steps.

Without trained adapter files (``forward_lora`` / ``reverse_lora``) the students equal the teacher: the editor
runs and counts calls like the real thing, but its edits mean nothing; it says so in the log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from editlab.diffusion.ddim import add_noise
from editlab.editors.attention import controlled_attention
from editlab.editors.base import Editor, EditRequest, EditResult, register
from editlab.editors.p2p import P2PController, P2PSettings, make_controller
from editlab.icd.guidance import GuidancePolicy
from editlab.icd.lora import FORWARD, REVERSE, AdapterSwitch, FusedAdapterSwitch, attach_adapters, lora_parameters
from editlab.icd.schedule import BoundarySchedule, consistency_jumps
from editlab.icd.teacher import load_cfg_distilled, warn_outside_w_range
from editlab.models.conditioning import Conditioning
from editlab.models.copies import own_copy
from editlab.models.guidance import embedded_kind, unet_guidance
from editlab.models.hub import resolve_local

log = logging.getLogger(__name__)

# iCD-SD1.5's Prompt-to-Prompt recipe (conf/editor/p2p/icd.yaml)
ICD_P2P = P2PSettings(cross_replace_steps=0.3, mode="auto", amplify=4.0, amplify_words="new_words", blend_start=0.0)
REFERENCE_REVERSE_STEPS, REFERENCE_FORWARD_STEPS = (259, 519, 779, 999), (19, 259, 519, 779)  # iCD-SD1.5


def trained_schedule(adapter: str | Path | None) -> dict:
    """The ``schedule.json`` that ``train.py`` exports beside its adapters (reverse / forward steps), else {}."""
    path = Path(adapter).parent / "schedule.json" if adapter else None
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


@register("icd")
class ICDEditor(Editor):
    tasks = ("edit", "inversion", "generation")
    families = ("sd", "sdxl")
    parameter_choices = {"method": ("p2p", "prompt_switch"), "guidance": ("auto", "embedded", "cfg")}

    def __init__(
        self,
        components,
        reverse_steps: Sequence[int] | None = None,
        forward_steps: Sequence[int] | None = None,
        code_guidance_scale: float = 19.0,
        tau: float = 0.8,
        method: str = "p2p",
        guidance: str = "auto",
        teacher_checkpoint: str | None = None,
        forward_lora: str | None = None,
        reverse_lora: str | None = None,
        lora_rank: int = 64,
        lora_alpha: float = 8,
        p2p: P2PSettings = ICD_P2P,
        fuse_adapters: bool = False,
    ):
        super().__init__(components)
        if method not in ("p2p", "prompt_switch"):
            raise ValueError(f"unknown editor.method={method!r}; expected p2p or prompt_switch")
        c = components
        if c.offload == "sequential":  # its weights live in per-module hooks, which a copy cannot share
            raise ValueError("iCD adds LoRA adapters to a UNet of its own: use offload=none or offload=model")
        if teacher_checkpoint and c.offload != "none":
            raise ValueError("editor.teacher_checkpoint loads a UNet of its own: use offload=none with it")
        # the adapters go on a UNet of the editor's own (the teacher, or the shared weights under new modules), so
        # the shared model is never patched; under offload=model the copy lives on the device
        teacher = load_cfg_distilled(c.unet, teacher_checkpoint) if teacher_checkpoint else c.unet
        warn_outside_w_range(teacher, [code_guidance_scale], "editor.code_guidance_scale")
        unet = teacher if teacher_checkpoint else own_copy(c.unet, device=c.device)
        c = self.components = c.derive(unet=unet)
        forward_lora, reverse_lora = (resolve_local(p) if p else None for p in (forward_lora, reverse_lora))
        untrained = attach_adapters(unet, forward_lora, reverse_lora, lora_rank, lora_alpha)
        if untrained:
            log.warning("iCD runs UNTRAINED adapters %s (equal to the teacher): set editor.forward_lora / "
                        "editor.reverse_lora to trained .safetensors files for real edits", untrained)
        for name in (FORWARD, REVERSE):  # peft keeps new adapters in fp32; at inference they join the UNet's dtype
            for p in lora_parameters(unet, name):
                p.data = p.data.to(c.dtype)
        # fused: each student as merged weights, swapped per phase (faster calls, two more weight copies)
        self.switch = FusedAdapterSwitch(unet) if fuse_adapters else AdapterSwitch(unet)
        mode_ = embedded_kind(unet) if guidance == "auto" else guidance
        self.eps = unet_guidance(unet, mode_, c.unconditional() if mode_ == "cfg" else None, dtype=c.dtype)
        trained = trained_schedule(reverse_lora or forward_lora)
        reverse_steps = reverse_steps or trained.get("reverse_steps") or REFERENCE_REVERSE_STEPS
        forward_steps = forward_steps or trained.get("forward_steps") or REFERENCE_FORWARD_STEPS
        self.schedule = BoundarySchedule.from_inference_steps(reverse_steps, forward_steps)
        self.policy = GuidancePolicy(scale=code_guidance_scale, tau=tau)
        self.method = method
        self.p2p = p2p
        log.info("iCD: %s, guidance %s (w=%g code units, tau=%g), reverse %s, forward %s", method, mode_,
                 code_guidance_scale, tau, self.schedule.reverse_pairs(), self.schedule.forward_pairs())


    # -- 2. inversion (forward model) -----------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, x0: torch.Tensor, source: Conditioning, noise: torch.Tensor) -> torch.Tensor:
        """x0 [B, 4, h, w], source prompts (B rows), noise like x0 -> x_999 [B, 4, h, w]."""
        self.switch.activate(FORWARD)
        w = torch.zeros(x0.shape[0])
        x = add_noise(x0, noise, self.schedule.start, self.components.schedule.alphas_cumprod)
        return consistency_jumps(x, self.schedule.forward_pairs(), lambda i, x, t: self.eps(x, t, source, w),
                                 self.components.schedule)

    # -- 3. decoding (reverse model) ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_latents(self, x_T: torch.Tensor, prompts: Conditioning) -> torch.Tensor:
        """Plain generation / reconstruction: every row guided by the dynamic schedule. x_T [B, ...], B prompts."""
        self.switch.activate(REVERSE)
        rows = x_T.shape[0]
        return consistency_jumps(x_T, self.schedule.reverse_pairs(),
                                 lambda i, x, t: self.eps(x, t, prompts, self.policy.rows(t, rows)),
                                 self.components.schedule)

    @torch.no_grad()
    def decode_p2p(self, x_T: torch.Tensor, prompts: Conditioning, controller: P2PController) -> torch.Tensor:
        """x_T [1, 4, h, w], P prompts (source first) -> latents [P, 4, h, w]; the source row is unguided."""
        self.switch.activate(REVERSE)
        rows = prompts.text.shape[0]

        def eps(i: int, x: torch.Tensor, t: int) -> torch.Tensor:
            controller.step = i
            w = self.policy.rows(t, rows, unguided_rows=[0])
            controller.has_uncond = self.eps.needs_uncond(w)  # batch [uncond x P, cond x P] or [cond x P]
            return self.eps(x, t, prompts, w)

        latents = x_T.expand(rows, -1, -1, -1).clone()
        with controlled_attention(self.components.unet, controller):
            return consistency_jumps(latents, self.schedule.reverse_pairs(), eps, self.components.schedule,
                                     after=lambda i, x: controller.step_callback(x))

    @torch.no_grad()
    def decode_prompt_switch(self, x_T: torch.Tensor, prompts: Conditioning) -> torch.Tensor:
        """x_T [1, 4, h, w], prompts (source, target): the source prompt's token embeddings, unguided, above tau;
        the target's, guided, below. SDXL's pooled / size conditioning is the target's throughout (as the
        reference swaps encoder_hidden_states only)."""
        self.switch.activate(REVERSE)
        threshold = self.policy.tau * self.policy.num_train_timesteps
        target = prompts[1:2]
        source = Conditioning(prompts.text[:1], target.added)

        def eps(i: int, x: torch.Tensor, t: int) -> torch.Tensor:
            return self.eps(x, t, source if t > threshold else target, self.policy.rows(t, 1))

        return consistency_jumps(x_T, self.schedule.reverse_pairs(), eps, self.components.schedule)

    def controller(self, prompts: list[str], blend_words: tuple[str, str] | None) -> P2PController:
        """The shared P2P controller (`make_controller`), its schedules counted in consistency steps (m)."""
        c = self.components
        return make_controller(prompts, c.tokenizer, self.schedule.num_segments, c.latent_size, c.blend_resolution,
                               blend_words, self.p2p)

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        prompts = [request.source_prompt, request.target_prompt]
        cond = self.components.conditioning(prompts)  # text [2, 77, D]
        controller = self.controller(prompts, request.blend_words) if self.method == "p2p" else None
        x0 = c.encode_image(request.image)  # [1, 4, h, w]
        noise = torch.randn(x0.shape, generator=request.generator()).to(c.device)
        x_T = self.invert(x0, cond[0:1], noise)
        if controller is not None:
            reconstruction, edited = c.decode_latents(self.decode_p2p(x_T, cond, controller))
            return EditResult(edited=edited, reconstruction=reconstruction)
        (edited,) = c.decode_latents(self.decode_prompt_switch(x_T, cond))
        return EditResult(edited=edited)

    # -- the inversion and generation tasks ---------------------------------------------------------------------------
    def _reconstruct(self, request: EditRequest) -> EditResult:
        """Steps 1-2, then the reverse model back with the source prompt under the dynamic guidance."""
        c = self.components
        cond = c.conditioning([request.source_prompt])
        x0 = c.encode_image(request.image)  # [1, 4, h, w]
        noise = torch.randn(x0.shape, generator=request.generator()).to(c.device)
        (reconstruction,) = c.decode_latents(self.generate_latents(self.invert(x0, cond, noise), cond))
        return EditResult(edited=reconstruction, reconstruction=reconstruction)

    def _generate(self, request: EditRequest) -> EditResult:
        (image,) = self.generate_images([request.source_prompt], request.seed)
        return EditResult(edited=image)

    def generate_images(self, prompts: list[str], seed: int = 0) -> list[Image.Image]:
        """Text-to-image with the reverse model in m steps; each prompt gets its own noise."""
        c = self.components
        generator = torch.Generator().manual_seed(seed)
        shape = (len(prompts), c.unet.config.in_channels, c.latent_size, c.latent_size)
        x_T = torch.randn(shape, generator=generator).to(c.device)
        return c.decode_latents(self.generate_latents(x_T, self.components.conditioning(prompts)))
