"""SDXL / SSD-1B + LCM + ControlNet-Canny: the fast structure-preserving baseline.

No inversion: the edit is a new 4-step LCM sample of the *target* prompt, held to the source image's layout by a
Canny-edge ControlNet. This is the text-to-image ControlNet pipeline of the diffusers LCM-LoRA + ControlNet recipe;
the source image enters only through its edges (colours and textures are not kept).

1. Control image: Canny edges of the source (thresholds 100 / 200, OpenCV), replicated to 3 channels.
2. Sample with diffusers' `StableDiffusionXLControlNetPipeline` over the loaded components plus the ControlNet, with
   `LCMScheduler` on the checkpoint's beta schedule: 4 steps (timesteps 999, 759, 499, 259), guidance 1.5, ControlNet
   conditioning scale 0.5, z_T from a generator seeded with 42 (``seed: null`` uses the run's per-item seed).
3. Decode with the components' VAE (``model.vae_dtype``; the fp16-fix VAE is safe in half precision).

The LCM part comes with the model: ``model=sdxl`` fuses the LCM-LoRA into SDXL 1.0, ``model=ssd1b`` swaps in the
LCM-distilled SSD-1B UNet. Guidance: the pipeline uses the UNet's w-embedding when it has one (``time_cond_proj_dim``,
the full LCM UNets) and plain CFG on a doubled batch otherwise (LCM-LoRA). Either way one UNet call and one ControlNet
call per step: cost 4 UNet + 4 ControlNet evaluations (``extras["controlnet_calls"]``).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from diffusers import ControlNetModel, LCMScheduler, StableDiffusionXLControlNetPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor
from PIL import Image

from editlab.editors.base import Editor, EditRequest, EditResult, pipeline_latents, register
from editlab.models.components import Components, ModelLoadError, count_forward_calls
from editlab.models.copies import own_copy
from editlab.models.loading import attach_pipeline

log = logging.getLogger(__name__)


def canny_edges(image: Image.Image, low: int, high: int) -> Image.Image:
    """RGB image -> its Canny edge map (0 / 255) as a 3-channel image of the same size."""
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # [H, W] uint8; gradients over all 3 channels
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def load_controlnet(path: str, dtype: torch.dtype) -> ControlNetModel:
    """A pretrained ControlNet from a hub id or a local diffusers directory, in the compute dtype."""
    try:
        controlnet = ControlNetModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load the ControlNet from editor.controlnet={path!r}: {err}\n"
            "Set editor.controlnet to a hub id you can download (e.g. diffusers/controlnet-canny-sdxl-1.0 or "
            "diffusers/controlnet-canny-sdxl-1.0-small) or to a local diffusers-format directory."
        ) from err
    return controlnet.eval().requires_grad_(False)


@register("lcm_controlnet")
class LCMControlNetEditor(Editor):
    families = ("sdxl",)
    def __init__(
        self,
        components: Components,
        controlnet: str = "diffusers/controlnet-canny-sdxl-1.0",
        num_steps: int = 4,
        guidance_scale: float = 1.5,
        controlnet_conditioning_scale: float = 0.5,
        canny_low: int = 100,
        canny_high: int = 200,
        seed: int | None = 42,
        attention_slicing: bool = False,
    ):
        super().__init__(components)
        c = components
        if c.unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"lcm_controlnet needs an SDXL-family model (two text encoders, text_time conditioning); "
                f"model={c.name} is not one. Use model=sdxl, ssd1b, sdxl_arch or tiny_sdxl"
            )
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.controlnet_conditioning_scale = controlnet_conditioning_scale
        self.canny_thresholds = (canny_low, canny_high)
        self.seed = seed
        if c.controlnet is not None:  # random-weight models: pretrained ControlNet weights would not fit their UNet
            log.info("model=%s brings its own random ControlNet; editor.controlnet=%s is unused", c.name, controlnet)
            self.controlnet = c.controlnet
        else:
            self.controlnet = load_controlnet(controlnet, c.dtype)
        if attention_slicing:  # slicing replaces every attention processor: on networks of the editor's own
            self._check_stock_processors()
            c = self.components = c.derive(unet=own_copy(c.unet))
            if self.controlnet is components.controlnet:
                self.controlnet = own_copy(self.controlnet)
        # The checkpoint's beta schedule (kept by the loaded DDIM scheduler) with LCM's few-step sampler.
        scheduler = LCMScheduler.from_config(c.scheduler.config)
        self.pipe = StableDiffusionXLControlNetPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2, unet=c.unet, controlnet=self.controlnet, scheduler=scheduler,
            add_watermarker=False,
        )
        if attention_slicing:
            self.pipe.enable_attention_slicing()
        attach_pipeline(c, self.pipe)

    def _check_stock_processors(self) -> None:
        """Sliced attention replaces *every* attention processor (UNet and ControlNet): refuse when any is not a stock
        one, since that would silently drop someone's attention control."""
        stock = (AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor)  # exact types: subclasses may do more
        custom = sorted({type(p).__name__ for net in (self.components.unet, self.controlnet)
                         for p in net.attn_processors.values() if type(p) not in stock})
        if custom:
            raise ValueError(f"attention_slicing=true would replace the custom attention processors {custom}")

    def sample(self, prompt: str, control: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """Target prompt + control image -> final latents [1, 4, h, w] (compute dtype)."""
        size = self.components.resolution
        return pipeline_latents(self.pipe, generator, self.num_steps, self.guidance_scale, prompt=prompt,
                                image=control, height=size, width=size,
                                controlnet_conditioning_scale=self.controlnet_conditioning_scale)

    def _edit(self, request: EditRequest) -> EditResult:
        c = self.components
        c.check_prompt(request.target_prompt)  # the pipeline would truncate silently
        # 1. Control image: the source's edges.
        control = canny_edges(request.image, *self.canny_thresholds)  # RGB, resolution²
        # 2. LCM sampling under the ControlNet; a CPU generator gives the same noise on every device.
        generator = request.generator() if self.seed is None else torch.Generator("cpu").manual_seed(self.seed)
        with count_forward_calls(self.controlnet) as controlnet_calls:
            latents = self.sample(request.target_prompt, control, generator)
        # 3. Decode.
        edited = c.decode_latents(latents.float())[0]
        return EditResult(edited=edited, extras={"controlnet_calls": controlnet_calls["n"]})
