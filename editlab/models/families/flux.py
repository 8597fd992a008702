"""FLUX.1 (dev, schnell): a rectified-flow transformer (`FluxTransformer2DModel`: double-stream blocks, then
single-stream blocks over [text ; image] tokens) on 2x2-packed latent tokens with rotary position ids, CLIP-L's
pooled output and T5-XXL's token states, a 16-channel VAE with scale and shift, and the flow-matching Euler schedule
with a resolution-dependent shift [diffusers: pipelines/flux/pipeline_flux.py, models/transformers/transformer_flux.py;
Black Forest Labs, "FLUX.1" (2024)].

- dev is guidance-distilled: the guidance scale is an input of the transformer (``guidance``, the pipeline's
  ``guidance_scale``, default 3.5), one pass per step; its default guidance is ``embedded``.
- schnell is step-distilled, without that input and unguided (``none``), on an unshifted grid; its T5 sequence is
  256 tokens (``model.max_sequence_length``), dev's 512.

FLUX.1 Kontext [dev] is a FLUX.1-dev-shaped transformer trained to edit: the reference image's tokens follow the
noisy ones (`editors.flux_kontext`). Its model configs set ``kontext: true`` (`Components.options`), so the Kontext
editor knows a Kontext model from the FLUX.1 text-to-image ones, which have the same architecture.

T5 is required: FLUX takes its whole token sequence from T5 (CLIP-L gives only the pooled vector), so unlike SD3 it
has no documented T5-less mode and a config with ``t5: false`` is refused; offload saves the memory instead.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from editlab.models.builders import clip_l_config, clip_text_config, flow_vae, t5_config
from editlab.models.conditioning import Conditioning, token_ids
from editlab.models.errors import ModelLoadError
from editlab.models.families import AttentionSite, register
from editlab.models.families.sd3 import SD3, per_row
from editlab.models.guidance import Guidance
from editlab.models.tokenizers import char_tokenizer, t5_char_tokenizer

FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # diffusers' scripts/convert_flux_to_diffusers.py


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: one token per 2x2 patch, patches in row-major order, each token's
    features channel-major (c, dy, dx), as FLUX's pipeline lays them out."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2)  # [B, C, h/2, dy, w/2, dx]
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, features = tokens.shape
    patches = tokens.reshape(b, h // 2, w // 2, features // 4, 2, 2)  # [B, h/2, w/2, C, dy, dx]
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, features // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The packed tokens' position ids [(h/2)(w/2), 3]: (0, row, column) of each 2x2 patch; the rotary embedding
    reads row and column, the first axis tells images from text (whose ids are zeros)."""
    rows, columns = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(device, dtype)


def build_tiny_flux(seed: int = 0) -> dict[str, Any]:
    """Tiny random FLUX.1-dev-shaped model: 64² images, VAE factor 4, 16 x 16² latents packed into 8² tokens of 64;
    one double- and one single-stream block, 32 wide (rotary axes 4 + 6 + 6 = the 16-wide heads), the guidance
    embedding; a 16-wide CLIP (pooled) and a 32-wide T5."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = flow_vae(**FLUX_VAE, tiny=True)
    tokenizer, t5_tokenizer = char_tokenizer(), t5_char_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip_text_config(len(tokenizer), hidden=16, layers=2, heads=2, mlp=32))
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(t5_config(len(t5_tokenizer), tiny=True))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": t5_tokenizer}


def build_flux_arch(seed: int = 0) -> dict[str, Any]:
    """FLUX.1-dev's architecture with random weights: an 11.9 B-parameter transformer (19 double- and 38
    single-stream blocks, 3072 wide, the guidance embedding), CLIP-L, T5-XXL and the 16-channel VAE; about 16.9 B
    parameters in all. Built in fp32 on the CPU like the other architectures: about 68 GB of memory before the cast
    to the compute dtype."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    return {"transformer": transformer, "vae": flow_vae(**FLUX_VAE), "text_encoder": CLIPTextModel(clip_l_config()),
            "tokenizer": char_tokenizer(), "text_encoder_2": T5EncoderModel(t5_config()),
            "tokenizer_2": t5_char_tokenizer()}


@register
class Flux(SD3):
    name = "flux"
    modules = {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel, "tokenizer_2": T5Tokenizer}
    clip_tokenizers = ("tokenizer",)
    t5 = ("text_encoder_2", "tokenizer_2")
    tiny_archs = {"flux": build_tiny_flux}
    random_archs = {"flux": build_flux_arch}
    default_scheduler = {"shift": 3.0, "use_dynamic_shifting": True}  # black-forest-labs/FLUX.1-dev's
    max_sequence_length = 512  # T5 tokens, FluxPipeline's default (schnell: 256)
    grid = "uniform"  # FluxPipeline passes linspace(1, 1/N, N) whatever the shift
    pipeline_class = FluxPipeline
    default_guidance = 3.5  # FluxPipeline's guidance_scale: dev's embedded scale when a call gives none

    def modules_of(self, model: Mapping[str, Any]) -> dict[str, type]:
        if not model.get("t5", True):
            raise ModelLoadError(
                f"{model['name']}: model.t5=false, but FLUX takes its whole prompt sequence from T5 (CLIP-L gives "
                "only the pooled vector) and cannot go without it as SD3 can; offload=model or offload=sequential "
                "saves its memory instead"
            )
        return self.modules

    def options(self, model: Mapping[str, Any]) -> dict[str, Any]:
        """SD3's, and ``kontext``: whether the model is a FLUX.1 Kontext editing model."""
        return {**super().options(model), "kontext": bool(model.get("kontext", False))}

    def patch(self, transformer) -> int:
        """2: the pipeline packs 2x2 latent patches into one token (the transformer's own patch is 1)."""
        return 2

    def guidance_kind(self, m) -> str:
        """``embedded`` for dev (a guidance input), ``none`` for schnell."""
        return "embedded" if m.transformer.config.guidance_embeds else "none"

    def guidance(self, m, uncond: Conditioning | None = None) -> Guidance:
        """dev: the scale per row is the transformer's ``guidance`` input; schnell: the conditional prediction."""
        kind = self.guidance_kind(m)
        return Guidance(m.predict, kind, "classic", embed=(lambda w: {"guidance": w}) if kind == "embedded" else None)

    @torch.no_grad()
    def encode(self, m, prompts: list[str]) -> Conditioning:
        """Text: T5's states [B, L, 4096] (L = ``max_sequence_length``); ``pooled_projections``: CLIP-L's pooled
        output [B, 768]; in the compute dtype. The text ids are zeros, made per call (`predict`)."""
        for prompt in prompts:
            self.check_prompt(m, prompt)
        clip = m.text_encoder(token_ids(m.tokenizer, prompts, m.tokenizer.model_max_length, m.device))
        return Conditioning(self._t5(m, prompts).to(m.dtype), {"pooled_projections": clip.pooler_output.to(m.dtype)})

    def predict(self, m, x: torch.Tensor, t: Any, cond: Conditioning, guidance: Any = None,
                **kwargs: Any) -> torch.Tensor:
        """The velocity in fp32 for fp32 latents x [B, C, h, w] at flow time ``t`` (sigma in [0, 1], a float or one
        per row), as FLUX's pipeline calls the transformer: x packed into [B, hw/4, 4C] with its image ids, zero
        text ids [L, 3], and sigma itself (the transformer multiplies it by 1000, and the guidance scale too).
        ``guidance``: dev's embedded scale, a float or one per row (default: the pipeline's 3.5); schnell takes
        none."""
        b, _, h, w = x.shape
        if m.transformer.config.guidance_embeds:
            scale = self.default_guidance if guidance is None else guidance
            kwargs["guidance"] = per_row(scale, b, m.device)
        elif guidance is not None:
            raise ValueError(f"{m.name} has no guidance input (a FLUX.1-schnell-shaped transformer): it takes no "
                             "embedded guidance")
        tokens = m.transformer(
            hidden_states=pack(x).to(m.dtype), timestep=per_row(t, b, m.device), encoder_hidden_states=cond.text,
            pooled_projections=cond.added["pooled_projections"], img_ids=image_ids(h, w, m.device, m.dtype),
            txt_ids=torch.zeros(cond.text.shape[1], 3, device=m.device, dtype=m.dtype), return_dict=False, **kwargs,
        )[0]
        return unpack(tokens.float(), h, w)

    def attention_sites(self, m) -> list[AttentionSite]:
        """Every attention layer attends over [text ; image] tokens (the double-stream blocks' joint attention, the
        single-stream blocks' one sequence): all cross, queries on the packed tokens' grid."""
        side = m.latent_size // self.patch(m.transformer)
        return [AttentionSite(name, True, side) for name in m.transformer.attn_processors]
