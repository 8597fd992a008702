"""InstructPix2Pix, as the PIE-Bench harness runs it: one guided sampling pass conditioned on the source image and
the editing instruction; no inversion, no captions.

1. Image conditioning c_I: the VAE posterior mode of the source image *without* the scaling factor (the model was
   trained that way), [1, 4, h, w]. It is concatenated to the noisy latent on channels (the UNet takes 8).
2. Sample with diffusers' `StableDiffusionInstructPix2PixPipeline`, built over the loaded components (no second copy),
   with the Euler-ancestral sampler (the reference's k-diffusion sampler; "linspace" timesteps like its
   `get_sigmas`), 50 steps, z_T ~ N(0, I) from a generator seeded with the request's seed. Each step is one UNet
   call on the batch [(c_T, c_I), (∅, c_I), (∅, ∅)] with three-way guidance

       ε̂ = ε(∅, ∅) + s_T [ε(c_T, c_I) − ε(∅, c_I)] + s_I [ε(∅, c_I) − ε(∅, ∅)],   s_T = 7.5, s_I = 1.5,

   (the pipeline's own formula). At s_I = 1 it is text-only CFG around the image-conditioned prediction,
   ε(∅, c_I) + s_T [ε(c_T, c_I) − ε(∅, c_I)]; the tests check the pipeline against a hand-written two-way loop.
   The pipeline drops all guidance unless s_T > 1 and s_I ≥ 1, which the formula only allows at s_T = s_I = 1, so
   other settings are refused.
3. Decode with the components' VAE (in ``precision.vae_dtype``, NaN-checked).

Cost: ``num_steps`` UNet calls at batch 3. The latents follow the pipeline's convention (compute dtype), where the
reference ran fp32 latents under fp16 autocast; its sampler's σ spacing also differs slightly from k-diffusion's.
"""

from __future__ import annotations

import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

from editlab.editors.base import Editor, EditRequest, EditResult, pipeline_latents, register
from editlab.models.components import Components
from editlab.models.loading import attach_pipeline


@register("instruct_pix2pix")
class InstructPix2PixEditor(Editor):
    families = ("sd",)
    needs = frozenset({"instruction"})

    def __init__(self, components: Components, num_steps: int = 50, guidance_scale: float = 7.5,
                 image_guidance_scale: float = 1.5):
        super().__init__(components)
        c = components
        channels = 2 * c.vae.config.latent_channels  # noisy latent + image latent
        if c.unet.config.in_channels != channels:
            raise ValueError(
                f"instruct_pix2pix needs an SD-family InstructPix2Pix UNet ({channels} input channels); "
                f"model={c.name} has {c.unet.config.in_channels}. Use model=ip2p (or model=tiny_ip2p for tests)"
            )
        guided = guidance_scale > 1 and image_guidance_scale >= 1
        if not guided and (guidance_scale, image_guidance_scale) != (1, 1):
            raise ValueError(
                f"guidance_scale={guidance_scale}, image_guidance_scale={image_guidance_scale}: diffusers' "
                "InstructPix2Pix pipeline only guides when guidance_scale > 1 and image_guidance_scale >= 1 (else it "
                "samples unguided, which equals the formula only when both are 1)"
            )
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.image_guidance_scale = image_guidance_scale
        # The checkpoint's beta schedule (kept by the loaded DDIM scheduler), sampled the way the reference samples.
        scheduler = EulerAncestralDiscreteScheduler.from_config(c.scheduler.config, timestep_spacing="linspace")
        self.pipe = StableDiffusionInstructPix2PixPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        attach_pipeline(c, self.pipe)

    def sample(self, image_latents: torch.Tensor, instruction: str, generator: torch.Generator) -> torch.Tensor:
        """Unscaled image latents [1, 4, h, w] + instruction -> final latents [1, 4, h, w] (compute dtype)."""
        return pipeline_latents(self.pipe, generator, self.num_steps, self.guidance_scale, prompt=instruction,
                                image=image_latents, image_guidance_scale=self.image_guidance_scale)

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        c.check_prompt(request.instruction)  # the pipeline would truncate silently
        # 1. c_I: posterior mode without the scaling factor; given as latents, the pipeline uses it as is.
        image_latents = c.encode_image(request.image) / c.vae.config.scaling_factor  # [1, 4, h, w]
        # 2. Guided Euler-ancestral sampling; a CPU generator gives the same noise on every device.
        latents = self.sample(image_latents, request.instruction, request.generator())
        # 3. Decode.
        edited = c.decode_latents(latents.float())[0]
        return EditResult(edited=edited)
