"""FLUX.1 Kontext [dev], a trained instruction editor on a FLUX.1-dev-shaped transformer [Black Forest Labs, "FLUX.1
Kontext: Flow Matching for In-Context Image Generation and Editing in Latent Space", arXiv 2506.15742], sampled with
diffusers' `FluxKontextPipeline` (diffusers >= 0.35.0) over the loaded FLUX-family modules (no second copy).

1. Reference: the source image resized to the reference size, VAE-encoded (posterior mode, (z - shift) x scale) by
   the components' VAE in ``precision.vae_dtype``. With ``auto_resize`` (the pipeline's ``_auto_resize``) the
   reference size is the entry of the pipeline's ``PREFERRED_KONTEXT_RESOLUTIONS`` nearest the image's aspect, the
   resolutions Kontext was trained on (1024² for a square image); without, the image's own size. Both are floored
   to multiples of twice the VAE factor and resized the pipeline's way (its image processor). The editor encodes
   the reference itself, where the pipeline would encode it in the compute dtype, so a bf16 transformer runs with
   the fp32 VAE; in fp32 the result is the pipeline's own encoding.
2. Output size: the image's aspect at ``max_area`` pixels (default: the model's resolution², i.e. the pipeline's
   1024² for flux_kontext_dev), each side floored to that multiple, as the pipeline computes it.
3. Sample: the pipeline's ``num_steps`` Euler steps on linspace(1, 1/N, N) with the dynamic shift of the output's
   token count, the instruction as the prompt (CLIP-L pooled + T5), the reference tokens appended after the noisy
   ones (position ids [1, row, col]) and the prediction cut back to the noisy tokens. Kontext is guidance-distilled:
   ``guidance_scale`` is the transformer's embedded guidance input, one transformer call per step (NFE = N). With
   ``true_cfg_scale`` > 1 and a ``negative_prompt`` the pipeline adds a second, negative call per step
   (NFE = 2N).
4. Decode the final latents with the components' VAE (NaN-checked); an output whose size differs from the source's
   (a ``max_area`` other than the image's area) is resized to the source's size (bicubic), since the metrics compare
   the two pixel by pixel.
"""

from __future__ import annotations

import math

from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from editlab.editors.base import Editor, EditorConfigError, EditRequest, EditResult, register, required_instruction
from editlab.models.components import Components, vae_encode
from editlab.models.families import diffusers_class
from editlab.models.families.flux import unpack
from editlab.models.families.sd import check_tokens
from editlab.models.loading import attach_pipeline

SINCE = "0.35.0"  # the first diffusers with FluxKontextPipeline


def kontext_size(width: int, height: int, max_area: int, multiple: int) -> tuple[int, int]:
    """The output (width, height) `FluxKontextPipeline` makes for a ``width`` x ``height`` request: the aspect at
    ``max_area`` pixels, each side floored to ``multiple``."""
    aspect = width / height
    return (round(math.sqrt(max_area * aspect)) // multiple * multiple,
            round(math.sqrt(max_area / aspect)) // multiple * multiple)


def reference_size(width: int, height: int, auto_resize: bool, multiple: int) -> tuple[int, int]:
    """The reference's (width, height): the preferred Kontext resolution nearest the aspect, or the image's own;
    floored to ``multiple``."""
    if auto_resize:
        # imported here: an older diffusers lacks the module, and every editor module is imported on start
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return width // multiple * multiple, height // multiple * multiple


@register("flux_kontext")
class FluxKontextEditor(Editor):
    families = ("flux",)
    needs = frozenset({"instruction"})  # the item's editing instruction; no captions
    native_size = True  # takes the source at its own size and returns the edit at it (GEdit's portrait images)

    def __init__(self, components: Components, num_steps: int = 28, guidance_scale: float = 2.5,
                 auto_resize: bool = True, max_area: int | None = None, true_cfg_scale: float = 1.0,
                 negative_prompt: str | None = None):
        super().__init__(components)
        c = components
        if not c.options.get("kontext"):
            raise EditorConfigError(
                f"editor flux_kontext needs a FLUX.1 Kontext model (model=flux_kontext_dev; tiny_flux_kontext for "
                f"tests, flux_kontext_arch for GPU cost); model={c.name} is not one (its config does not set "
                "kontext: true), and a FLUX.1 text-to-image transformer was not trained on reference tokens"
            )
        if true_cfg_scale > 1 and negative_prompt is None:
            raise EditorConfigError(f"editor.true_cfg_scale={true_cfg_scale} needs editor.negative_prompt (e.g. ' '): "
                                    "without one FluxKontextPipeline silently samples without it")
        pipeline_class = diffusers_class("FluxKontextPipeline", SINCE)
        self.multiple = 2 * c.vae_scale_factor  # a 2x2 patch of latents per token
        self.max_area = c.resolution ** 2 if max_area is None else max_area
        if self.max_area < self.multiple ** 2:
            raise EditorConfigError(f"editor.max_area={max_area} is below one token ({self.multiple}² pixels)")
        self.num_steps, self.guidance_scale, self.auto_resize = num_steps, guidance_scale, auto_resize
        self.true_cfg_scale, self.negative_prompt = true_cfg_scale, negative_prompt
        # its own scheduler (the checkpoint's config): the pipeline's stepping state stays out of the shared model
        self.pipe = pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler.config), vae=c.vae,
            text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
            tokenizer_2=c.tokenizer_2, transformer=c.transformer,
        )
        attach_pipeline(c, self.pipe)

    def _edit(self, request: EditRequest) -> EditResult:
        c, pipe = self.components, self.pipe
        instruction = required_instruction(request, self.name)
        # T5 carries the instruction and must take all of it; CLIP gives only its pooled vector, from the first 77
        # tokens, as the pipeline (and BFL's reference code) cut it for every Kontext instruction
        check_tokens(instruction, c.tokenizer_2, c.options["max_sequence_length"], "T5 (model.max_sequence_length)")
        image = request.image.convert("RGB")  # the VAE takes three channels (a grey or RGBA source given directly)
        width, height = image.size
        # 1. The reference, resized the pipeline's way and encoded by the components' VAE: [1, 16, h_r, w_r].
        ref_w, ref_h = reference_size(width, height, self.auto_resize, self.multiple)
        out_w, out_h = kontext_size(width, height, self.max_area, self.multiple)
        if min(ref_w, ref_h, out_w, out_h) < self.multiple:
            raise ValueError(f"a {width}x{height} source gives a {ref_w}x{ref_h} reference and a {out_w}x{out_h} "
                             f"output, below one {self.multiple}-pixel token: crop it to a less extreme aspect or "
                             "set editor.auto_resize=true / a larger editor.max_area")
        resized = pipe.image_processor.resize(image, ref_h, ref_w)
        pixels = pipe.image_processor.preprocess(resized, ref_h, ref_w)  # [1, 3, H_r, W_r] in [-1, 1]
        reference = vae_encode(c.vae, pixels.to(c.device))
        # 2.-3. Sample at the output size; tokens [1, (h/2)(w/2), 64] in the compute dtype.
        tokens = pipe(
            image=reference.to(c.dtype), prompt=instruction, height=height, width=width, max_area=self.max_area,
            num_inference_steps=self.num_steps, guidance_scale=self.guidance_scale, true_cfg_scale=self.true_cfg_scale,
            negative_prompt=self.negative_prompt, max_sequence_length=c.options["max_sequence_length"],
            generator=request.generator(), output_type="latent",
        ).images
        # 4. Decode; back to the source's size where max_area made another.
        edited = c.decode_latents(unpack(tokens.float(), out_h // c.vae_scale_factor, out_w // c.vae_scale_factor))[0]
        if edited.size != (width, height):
            edited = edited.resize((width, height), Image.BICUBIC)
        return EditResult(edited=edited)
