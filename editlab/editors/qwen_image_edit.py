"""Qwen-Image-Edit (and -2509 / -2511), a trained instruction editor on the Qwen-Image family [Qwen team, "Qwen-Image
Technical Report", arXiv 2508.02324], sampled with diffusers' `QwenImageEditPipeline` or, for the -2509 / -2511
checkpoints, `QwenImageEditPlusPipeline` (``model.pipeline``), over the loaded modules (no second copy).

1. Sizes, as the pipelines fix them: the reference goes to the VAE at about 1024² pixels with the image's aspect
   (sides rounded to multiples of 32), whatever the output size; the VL encoder sees the image too, at that size
   (Edit; its processor then limits the pixels) or at about 384² (Plus). The output has the image's aspect at
   ``max_area`` pixels (default: the model's resolution², the pipelines' own 1024² on the Qwen models), sides rounded
   to multiples of 32 as the pipelines compute their default size.
2. Text: the instruction inside the pipeline's fixed system template, with the image, through Qwen2.5-VL; the
   template's first tokens are dropped from its last hidden state.
3. Sample: ``num_steps`` Euler steps on linspace(1, 1/N, N) with the dynamic shift of the output's token count (and
   the scheduler's terminal shift), the reference tokens after the noisy ones. True CFG: with ``true_cfg_scale`` > 1
   and a ``negative_prompt`` (the docs' " "), each step calls the transformer on the instruction and on the negative
   prompt, combines them as CFG and rescales each token's combined velocity to the norm of its conditional one
   (NFE = 2N); at ``true_cfg_scale`` <= 1 (a step-distilled Lightning LoRA) one call per step (NFE = N).
4. The pipeline decodes (its VAE in the compute dtype); a non-finite image is an error, never an output. The output
   is resized to the source's size (bicubic), since the metrics compare the two pixel by pixel (GEdit's scorer
   resizes an edit to its source likewise).

Plus takes one image per call, so each request is its own call (the base class's `run_batch`).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from editlab.editors.base import Editor, EditorConfigError, EditRequest, EditResult, register, required_instruction
from editlab.models.components import Components, nan_cause
from editlab.models.loading import attach_pipeline


@register("qwen_image_edit")
class QwenImageEditEditor(Editor):
    families = ("qwen_image",)
    needs = frozenset({"instruction"})  # the item's editing instruction; no captions
    native_size = True  # takes the source at its own size and returns the edit at it (GEdit's portrait images)

    def __init__(self, components: Components, num_steps: int = 50, true_cfg_scale: float = 4.0,
                 negative_prompt: str | None = " ", max_area: int | None = None):
        super().__init__(components)
        c = components
        if true_cfg_scale > 1 and negative_prompt is None:
            raise EditorConfigError(f"editor.true_cfg_scale={true_cfg_scale} needs editor.negative_prompt (the docs' "
                                    "' '): without one the pipeline samples without CFG")
        if c.vae_dtype != c.dtype:
            raise EditorConfigError(
                f"model={c.name} has its VAE in {c.vae_dtype} and the transformer in {c.dtype}, but the Qwen-Image "
                "edit pipelines encode the reference in the compute dtype: set model.vae_dtype=${precision.dtype} "
                "(the Qwen model configs do)"
            )
        if num_steps == 1 and c.scheduler.config.get("shift_terminal"):
            raise EditorConfigError(
                f"editor.num_steps=1 on model={c.name}, whose scheduler stretches its schedule to shift_terminal="
                f"{c.scheduler.config.shift_terminal}: with one step that is 0/0, a NaN schedule; use 2 or more steps"
            )
        if max_area is not None and max_area < 32 * 32:
            raise EditorConfigError(f"editor.max_area={max_area} is below one 32x32 tile; give output pixels, e.g. "
                                    "1048576 (1024²)")
        self.num_steps, self.true_cfg_scale = num_steps, true_cfg_scale
        self.max_area = max_area or c.resolution**2
        # CFG off: no negative prompt, so the pipeline neither encodes it nor warns that it is unused
        self.negative_prompt = negative_prompt if true_cfg_scale > 1 else None
        # its own scheduler (the model's config): the pipeline's stepping state stays out of the shared model
        self.pipe = c.family.pipeline(c, FlowMatchEulerDiscreteScheduler.from_config(c.scheduler.config))
        attach_pipeline(c, self.pipe)

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        instruction = required_instruction(request, self.name)
        image = request.image.convert("RGB")  # the VAE takes three channels (a grey or RGBA source given directly)
        width, height = image.size
        # the pipelines' default output size (their calculate_dimensions) at max_area: [aspect, 32-px multiples]
        out_w = max(32, round((self.max_area * width / height) ** 0.5 / 32) * 32)
        out_h = max(32, round((self.max_area * height / width) ** 0.5 / 32) * 32)
        images = self.pipe(
            image=image, prompt=instruction, negative_prompt=self.negative_prompt,
            true_cfg_scale=self.true_cfg_scale, height=out_h, width=out_w, num_inference_steps=self.num_steps,
            max_sequence_length=c.options["max_sequence_length"], generator=request.generator(), output_type="pt",
        ).images  # [1, 3, H, W] in [0, 1]
        if not torch.isfinite(images).all():
            raise FloatingPointError(f"the pipeline returned NaN/inf pixels; {nan_cause('transformer', c.dtype)}")
        edited = Image.fromarray((images[0].permute(1, 2, 0).float().cpu().numpy() * 255).astype(np.uint8))
        if edited.size != (width, height):
            edited = edited.resize((width, height), Image.BICUBIC)
        return EditResult(edited=edited)
