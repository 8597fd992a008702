"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, an epsilon-prediction UNet with cross-attention, a 4-channel
VAE, the scaled-linear VP schedule."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from editlab.models.builders import build_sd15_arch, build_tiny, named
from editlab.models.conditioning import Conditioning, encode_conditioning
from editlab.models.errors import ModelLoadError, PromptTooLongError
from editlab.models.families import AttentionSite, Family, register


def sd_scheduler(**overrides: Any) -> DDIMScheduler:
    """SD 1.x noise schedule as the P2P / PIE-Bench reference runs it (steps_offset 0, abar_final = abar_0)."""
    config = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=0,
    )
    return DDIMScheduler(**{**config, **overrides})


def check_tokens(prompt: str, tokenizer, limit: int, encoder: str = "the text encoder") -> None:
    """Raise `PromptTooLongError` for a prompt of more than ``limit`` tokens of ``tokenizer`` (which ``encoder``
    would have to cut)."""
    n = len(tokenizer(prompt).input_ids)
    if n > limit:
        raise PromptTooLongError(f"prompt has {n} tokens (with start/end tokens); {encoder} takes at most {limit}: "
                                 f"{prompt!r}")


@register
class SD(Family):
    name = "sd"
    modules = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer}
    tiny_archs = {"sd": lambda seed: named(build_tiny(seed)),
                  "ip2p": lambda seed: named(build_tiny(seed, in_channels=8))}  # InstructPix2Pix-shaped
    random_archs = {"sd15": lambda seed: named(build_sd15_arch(seed))}

    def scheduler(self, config: Mapping[str, Any] | None = None) -> DDIMScheduler:
        """The checkpoint's beta schedule with the reference DDIM conventions (offset 0, no clipping)."""
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        return sd_scheduler(**{k: config[k] for k in keys if k in config} if config else {})

    def check(self, model: Mapping[str, Any], modules: Mapping[str, Any], scheduler: Any,
              vae_dtype: torch.dtype) -> None:
        if modules["unet"].config.get("prediction_type", "epsilon") not in (None, "epsilon") or \
                scheduler.config.prediction_type != "epsilon":
            raise ModelLoadError(f"{model['name']}: only epsilon-prediction models are supported")

    def prepare(self, modules: Mapping[str, Any]) -> None:
        modules["unet"].set_attn_processor(AttnProcessor2_0())  # fused SDPA; editors install their own where needed

    def _encoders(self, m) -> list[tuple]:
        return [(m.tokenizer, m.text_encoder)]

    def check_prompt(self, m, prompt: str) -> None:
        for tokenizer, _ in self._encoders(m):
            check_tokens(prompt, tokenizer, tokenizer.model_max_length)

    @torch.no_grad()
    def encode(self, m, prompts: list[str]) -> Conditioning:
        """Text [B, 77, D] (SDXL: both encoders, pooled and size embeddings) in the compute dtype."""
        for prompt in prompts:
            self.check_prompt(m, prompt)
        return encode_conditioning(prompts, self._encoders(m), m.resolution, m.device, m.dtype)

    def predict(self, m, x: torch.Tensor, t: int, cond: torch.Tensor | Conditioning, **kwargs: Any) -> torch.Tensor:
        """The UNet's noise prediction in fp32 for fp32 latents; it runs in the compute dtype."""
        if isinstance(cond, Conditioning):
            kwargs = {"added_cond_kwargs": cond.added, **kwargs} if cond.added is not None else kwargs
            cond = cond.text
        timestep = torch.tensor(t, device=m.device)
        return m.unet(x.to(m.dtype), timestep, encoder_hidden_states=cond, **kwargs).sample.float()

    def pipeline_scheduler(self, m) -> DDIMScheduler:
        """The pipeline never samples. Its own scheduler copy keeps it from rewriting the shared scheduler's
        reference steps_offset 0 to 1 (and warning about it)."""
        return DDIMScheduler.from_config(m.scheduler.config, steps_offset=1)

    def pipeline(self, m) -> DiffusionPipeline:
        return StableDiffusionPipeline(
            vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
            scheduler=self.pipeline_scheduler(m), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    def attention_sites(self, m) -> list[AttentionSite]:
        """The UNet's attention layers, with the latent side of their down / mid / up block."""
        unet, size = m.unet, m.latent_size
        levels = len(unet.config.down_block_types)
        sites = []
        for name, module in unet.attn_processors.items():
            block, _, rest = name.partition(".")
            index = int(rest.split(".")[0]) if block in ("down_blocks", "up_blocks") else levels - 1
            level = index if block == "down_blocks" else levels - 1 - index if block == "up_blocks" else levels - 1
            layer = unet.get_submodule(name.removesuffix(".processor"))
            sites.append(AttentionSite(name, layer.is_cross_attention, size // 2**level))
        return sites
