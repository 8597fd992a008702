"""Stable Diffusion 3 / 3.5 (medium, large): an MM-DiT (`SD3Transformer2DModel`) that predicts the rectified-flow
velocity, three text encoders, a 16-channel VAE with scale and shift, and the flow-matching Euler schedule with a
static shift (3.0) [diffusers: pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py; Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"].

Text: CLIP-L's and CLIP-G's penultimate hidden states, concatenated on channels and zero-padded to T5's width, then
T5-XXL's states after them on the sequence, [B, 77 + 256, 4096]; the pooled input is the two CLIP projections,
[B, 768 + 1280]. T5 is optional: ``model.t5: false`` loads without it and its part of the sequence is zeros, as
diffusers' pipeline gives with ``text_encoder_3=None`` (diffusers' SD3 docs, "Dropping the T5 Text Encoder"). That
saves T5-XXL's 4.8 B parameters (about 9.5 GB in bf16, more than the rest of SD3-medium together) at some cost in
prompt adherence, mostly on long prompts and text in images.

The FLUX family (`families.flux`) shares this file's flow machinery: scheduler and schedule, prompt checks, T5.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from editlab.diffusion.schedules import FlowSchedule
from editlab.models.builders import clip_g_config, clip_l_config, clip_text_config, flow_vae, t5_config
from editlab.models.conditioning import Conditioning, token_ids
from editlab.models.errors import ModelLoadError
from editlab.models.families import AttentionSite, Family, register
from editlab.models.families.sd import check_tokens
from editlab.models.tokenizers import char_tokenizer, t5_char_tokenizer

SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}  # diffusers' scripts/convert_sd3_to_diffusers.py
# scheduler options `diffusion.schedules.FlowSchedule` does not implement (no supported checkpoint sets them)
UNSUPPORTED_SCHEDULER_OPTIONS = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                 "invert_sigmas", "stochastic_sampling")


def build_tiny_sd3(seed: int = 0, sd35: bool = False) -> dict[str, Any]:
    """Tiny random SD3-shaped model: 64² images, VAE factor 4, 16 x 16² latents, 2x2 patches (8² image tokens); CLIP
    widths 8 and 16, their 24 channels zero-padded to the 32-wide T5 (SD3 pads 2048 to 4096). ``sd35``: SD3.5's
    extras, qk-norm and a second, image-only attention in the first block."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_attention_heads=4,
        attention_head_dim=8, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=8 + 16,
        pos_embed_max_size=16, **({"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}),
    )
    torch.manual_seed(seed + 1)
    vae = flow_vae(**SD3_VAE, tiny=True)
    tokenizer, t5_tokenizer = char_tokenizer(), t5_char_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoders = [CLIPTextModelWithProjection(clip_text_config(len(tokenizer), hidden=width, layers=2, heads=2,
                                                                  mlp=2 * width, projection_dim=width))
                     for width in (8, 16)]
    torch.manual_seed(seed + 3)
    text_encoder_3 = T5EncoderModel(t5_config(len(t5_tokenizer), tiny=True))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoders[0], "tokenizer": tokenizer,
            "text_encoder_2": text_encoders[1], "tokenizer_2": char_tokenizer(), "text_encoder_3": text_encoder_3,
            "tokenizer_3": t5_tokenizer}


def build_sd3_arch(seed: int = 0) -> dict[str, Any]:
    """SD3-medium's architecture with random weights: a 2.03 B-parameter MM-DiT (24 blocks, 1536 wide), CLIP-L,
    CLIP-G, T5-XXL and the 16-channel VAE; about 7.7 B parameters in all, 4.8 B of them T5's. Built in fp32 on the
    CPU like the other architectures (about 31 GB before the cast to the compute dtype)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, num_attention_heads=24,
        attention_head_dim=64, caption_projection_dim=1536, joint_attention_dim=4096, pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )
    # The real CLIP BPE and T5 sentencepiece vocabularies live on the hub; token ids are all the cost model needs.
    return {"transformer": transformer, "vae": flow_vae(**SD3_VAE),
            "text_encoder": CLIPTextModelWithProjection(clip_l_config(projection_dim=768)),
            "tokenizer": char_tokenizer(), "text_encoder_2": CLIPTextModelWithProjection(clip_g_config()),
            "tokenizer_2": char_tokenizer(), "text_encoder_3": T5EncoderModel(t5_config()),
            "tokenizer_3": t5_char_tokenizer()}


def per_row(value: Any, rows: int, device: torch.device) -> torch.Tensor:
    """A float, or one per row, as fp32 [rows] (a flow time sigma, a guidance scale)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).expand(rows)


@register
class SD3(Family):
    name = "sd3"
    modules = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
               "text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer,
               "text_encoder_2": CLIPTextModelWithProjection, "tokenizer_2": CLIPTokenizer,
               "text_encoder_3": T5EncoderModel, "tokenizer_3": T5Tokenizer}
    clip_tokenizers = ("tokenizer", "tokenizer_2")
    t5 = ("text_encoder_3", "tokenizer_3")  # T5's encoder and tokenizer
    clip_g = ("text_encoder_2", "tokenizer_2")  # the second CLIP's
    denoiser = "transformer"
    prediction_type = "flow"
    tiny_archs = {"sd3": build_tiny_sd3, "sd35": partial(build_tiny_sd3, sd35=True)}
    random_archs = {"sd3": build_sd3_arch}
    default_scheduler = {"shift": 3.0}  # stabilityai/stable-diffusion-3-medium-diffusers' scheduler config
    max_sequence_length = 256  # T5 tokens, StableDiffusion3Pipeline's default
    grid = "train"  # the unshifted sigma grid the pipeline steps on (`FlowSchedule.grid`): the scheduler's own
    pipeline_class = StableDiffusion3Pipeline

    def modules_of(self, model: Mapping[str, Any]) -> dict[str, type]:
        """Without T5 where ``model.t5`` is false, without the second CLIP where ``model.clip_g`` is (a one-encoder
        SD3-shaped model: the toy flow teacher)."""
        off = (*(() if model.get("t5", True) else self.t5), *(() if model.get("clip_g", True) else self.clip_g))
        return {name: cls for name, cls in self.modules.items() if name not in off}

    def options(self, model: Mapping[str, Any]) -> dict[str, Any]:
        """``max_sequence_length``: T5's tokens (``model.max_sequence_length``, else the pipeline's default; 0 with
        ``t5: false`` leaves T5's zeros out of the sequence, as a model trained without them needs)."""
        length = model.get("max_sequence_length")
        return {"max_sequence_length": int(self.max_sequence_length if length is None else length)}

    def scheduler(self, config: Mapping[str, Any] | None = None) -> FlowMatchEulerDiscreteScheduler:
        """The checkpoint's flow-matching scheduler; for local builds the family's hub checkpoint's."""
        return FlowMatchEulerDiscreteScheduler.from_config(config or self.default_scheduler)

    def patch(self, transformer) -> int:
        """The side of the latent patch one image token covers."""
        return transformer.config.patch_size

    def check(self, model: Mapping[str, Any], modules: Mapping[str, Any], scheduler: Any,
              vae_dtype: torch.dtype) -> None:
        unsupported = [key for key in UNSUPPORTED_SCHEDULER_OPTIONS if scheduler.config.get(key)]
        if scheduler.config.get("time_shift_type", "exponential") != "exponential":
            unsupported.append("time_shift_type")
        if unsupported:
            raise ModelLoadError(f"{model['name']}: the scheduler config sets {', '.join(unsupported)}, which "
                                 "editlab's flow schedule does not implement")
        side = 2 ** (len(modules["vae"].config.block_out_channels) - 1) * self.patch(modules["transformer"])
        if int(model["resolution"]) % side:
            raise ModelLoadError(f"{model['name']}: model.resolution={model['resolution']} must be a multiple of "
                                 f"{side} (the VAE factor times the transformer's patch)")

    def image_tokens(self, m) -> int:
        """The transformer's image tokens at the model's resolution."""
        return (m.latent_size // self.patch(m.transformer)) ** 2

    def schedule(self, m) -> FlowSchedule:
        """The scheduler's grid and shift at the model's resolution (a dynamic shift's token count)."""
        config = m.scheduler.config
        return FlowSchedule(
            shift=config.shift, num_train_timesteps=config.num_train_timesteps, dynamic=config.use_dynamic_shifting,
            base_shift=config.base_shift, max_shift=config.max_shift, base_seq_len=config.base_image_seq_len,
            max_seq_len=config.max_image_seq_len, seq_len=self.image_tokens(m), grid=self.grid,
        )

    def check_prompt(self, m, prompt: str) -> None:
        for tokenizer in filter(None, (getattr(m, name) for name in self.clip_tokenizers)):
            check_tokens(prompt, tokenizer, tokenizer.model_max_length)
        t5 = getattr(m, self.t5[1])
        if t5 is not None:
            check_tokens(prompt, t5, m.options["max_sequence_length"], "T5 (model.max_sequence_length)")

    def _t5(self, m, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden states [B, L, D], L = ``max_sequence_length``; without T5, zeros of the transformer's
        joint width, as diffusers' pipeline gives."""
        encoder, tokenizer = (getattr(m, name) for name in self.t5)
        length = m.options["max_sequence_length"]
        if encoder is None:
            return torch.zeros(len(prompts), length, m.transformer.config.joint_attention_dim, device=m.device,
                               dtype=m.dtype)
        return encoder(token_ids(tokenizer, prompts, length, m.device))[0]

    @torch.no_grad()
    def encode(self, m, prompts: list[str]) -> Conditioning:
        """Text [B, 77 + L, D] (both CLIPs' penultimate states, zero-padded to T5's width D, then T5's) and
        ``pooled_projections`` [B, P] (the two CLIP projections), in the compute dtype."""
        for prompt in prompts:
            self.check_prompt(m, prompt)
        states, pooled = [], []
        for tokenizer, encoder in ((m.tokenizer, m.text_encoder), (m.tokenizer_2, m.text_encoder_2)):
            if encoder is None:  # model.clip_g: false
                continue
            out = encoder(token_ids(tokenizer, prompts, tokenizer.model_max_length, m.device),
                          output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = self._t5(m, prompts)
        clip = torch.cat(states, dim=-1)  # [B, 77, 768 + 1280]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # [B, 77, D]
        return Conditioning(torch.cat([clip.to(m.dtype), t5.to(m.dtype)], dim=1),
                            {"pooled_projections": torch.cat(pooled, dim=-1).to(m.dtype)})

    def predict(self, m, x: torch.Tensor, t: Any, cond: Conditioning, **kwargs: Any) -> torch.Tensor:
        """The velocity in fp32 for fp32 latents x [B, C, h, w] at flow time ``t`` (sigma in [0, 1], a float or one
        per row); SD3's transformer takes 1000 sigma, as the pipeline passes its scheduler's timesteps."""
        timestep = 1000 * per_row(t, x.shape[0], m.device)
        return m.transformer(hidden_states=x.to(m.dtype), timestep=timestep, encoder_hidden_states=cond.text,
                             pooled_projections=cond.added["pooled_projections"], return_dict=False,
                             **kwargs)[0].float()

    def pipeline(self, m) -> StableDiffusion3Pipeline:
        """The pipeline over the loaded modules (None for those switched off); it shares the scheduler, whose
        stepping state nothing else reads (`schedule` reads its config)."""
        return self.pipeline_class(scheduler=m.scheduler, **{name: getattr(m, name) for name in self.modules})

    def attention_sites(self, m) -> list[AttentionSite]:
        """Every block's joint attention over [image ; text] tokens (cross: its keys include the text), and SD3.5's
        image-only second attention (``attn2``: not cross); their queries cover the image tokens' grid."""
        side, transformer = m.latent_size // self.patch(m.transformer), m.transformer
        joint = {name: transformer.get_submodule(name.removesuffix(".processor")).added_kv_proj_dim is not None
                 for name in transformer.attn_processors}  # joint: the layer projects text tokens of its own
        return [AttentionSite(name, cross, side) for name, cross in joint.items()]
