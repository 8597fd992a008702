"""Stable Diffusion XL and its distilled relatives (SSD-1B): the SD UNet shape with two CLIP text encoders (their
penultimate states concatenated, the second's pooled projection) and ``text_time`` size micro-conditioning; CFG's
unconditional branch is zeros where the pipeline says so."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from editlab.models.builders import build_sdxl_arch, build_tiny_sdxl
from editlab.models.errors import ModelLoadError
from editlab.models.families import register
from editlab.models.families.sd import SD
from editlab.models.hub import hub_kwargs, local_or_hub


@register
class SDXL(SD):
    name = "sdxl"
    modules = {**SD.modules, "text_encoder_2": CLIPTextModelWithProjection, "tokenizer_2": CLIPTokenizer}
    optional = ("controlnet",)  # random-weight models bring a ControlNet matching their random UNet
    tiny_archs = {"sdxl": build_tiny_sdxl}
    random_archs = {"sdxl": build_sdxl_arch}

    def check(self, model: Mapping[str, Any], modules: Mapping[str, Any], scheduler: Any,
              vae_dtype: torch.dtype) -> None:
        super().check(model, modules, scheduler, vae_dtype)
        if vae_dtype == torch.float16 and modules["vae"].config.get("force_upcast", True):
            raise ModelLoadError(
                f"{model['name']}: SDXL's VAE overflows in float16 (NaN latents, black images); set "
                "model.vae_path=madebyollin/sdxl-vae-fp16-fix, or model.vae_dtype=float32"
            )

    def force_zeros_for_empty_prompt(self, model: Mapping[str, Any]) -> bool:
        """The pipeline's setting (its model_index.json), else diffusers' default for SDXL pipelines: zeros."""
        if model["kind"] == "pretrained":
            path = local_or_hub(model["path"], "model.path")
            with contextlib.suppress(OSError):  # a folder without model_index.json keeps the default
                index = DiffusionPipeline.load_config(path, **hub_kwargs(path, "model.path"))
                return bool(index.get("force_zeros_for_empty_prompt", True))
        return True

    def _encoders(self, m) -> list[tuple]:
        return [(m.tokenizer, m.text_encoder), (m.tokenizer_2, m.text_encoder_2)]

    def pipeline(self, m) -> DiffusionPipeline:
        return StableDiffusionXLPipeline(
            vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer,
            tokenizer_2=m.tokenizer_2, unet=m.unet, scheduler=self.pipeline_scheduler(m),
            add_watermarker=False, force_zeros_for_empty_prompt=m.force_zeros_for_empty_prompt,
        )
