"""Qwen-Image (the Qwen-Image-Edit models' family): a 20 B MM-DiT (`QwenImageTransformer2DModel`, 60 dual-stream
blocks) on 2x2-packed latent tokens with 3-axis rotary positions, Qwen2.5-VL-7B as its text (and, for editing,
image) encoder with its processor, a causal 3-D VAE with per-channel latent mean and std (`AutoencoderKLQwenImage`,
16 channels, factor 8), and the flow-matching Euler schedule with a dynamic shift and ``shift_terminal`` [Qwen team,
"Qwen-Image Technical Report", arXiv 2508.02324; diffusers: pipelines/qwenimage/, models/transformers/
transformer_qwenimage.py, models/autoencoders/autoencoder_kl_qwenimage.py].

Its models run through diffusers' pipelines (`pipeline`): ``model.pipeline`` picks `QwenImageEditPipeline`
(Qwen-Image-Edit, diffusers >= 0.35.0) or `QwenImageEditPlusPipeline` (the -2509 / -2511 checkpoints, >= 0.36.0),
looked up when a model loads, so an older diffusers is refused there by name. The editors written for any family
(their own samplers on editlab's schedules) do not run here (``generic_editors``): the schedule's terminal shift and
the VAE's video layout are the pipeline's. `encode` and `predict` give the text-to-image conditioning and the
denoiser call of `QwenImagePipeline` for code that needs them directly.

The pipelines encode the reference image in the compute dtype, so the VAE runs in it (the model configs set
``vae_dtype`` to ``precision.dtype``, as diffusers' examples load the whole pipeline in bf16).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from editlab.models.conditioning import Conditioning
from editlab.models.errors import ModelLoadError
from editlab.models.families import Family, diffusers_class, register
from editlab.models.families.flux import pack, unpack
from editlab.models.families.sd3 import per_row
from editlab.models.tokenizers import QWEN_SPECIAL_TOKENS, qwen_char_tokenizer

# Qwen/Qwen-Image's scheduler/scheduler_config.json (the Edit checkpoints ship the same)
DEFAULT_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                     "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                     "time_shift_type": "exponential", "use_dynamic_shifting": True}
PIPELINES = {"edit": ("QwenImageEditPipeline", "0.35.0"), "edit_plus": ("QwenImageEditPlusPipeline", "0.36.0")}
SINCE = "0.35.0"  # the first diffusers with the transformer, the VAE and QwenImagePipeline


def qwen_vl_config(tokenizer: Qwen2Tokenizer, tiny: bool) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's shape (28 layers 3584 wide, grouped-query attention with 4 KV heads, a 32-block ViT
    1280 wide), or a 2-layer, 16-wide stand-in, with ``tokenizer``'s ids for the vision markers."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", *QWEN_SPECIAL_TOKENS)}
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(tokenizer), mrope=[1, 1, 2]) if tiny else \
        dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, vocab_size=152064, mrope=[16, 24, 24])
    vision = dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2) if tiny else \
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16)
    mrope = text.pop("mrope")  # the rotary sections (time, rows, columns) of a head's half-width
    return Qwen2_5_VLConfig(
        text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": False},
        vision_config={**vision, "out_hidden_size": text["hidden_size"]}, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def qwen_processor(tokenizer: Qwen2Tokenizer, max_pixels: int) -> Qwen2VLProcessor:
    """The VL encoder's processor: its image processor (14² patches merged 2x2; images resized to at most
    ``max_pixels``) and ``tokenizer``."""
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(max_pixels=max_pixels), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())


def build_tiny_qwen_image(seed: int = 0) -> dict[str, Any]:
    """Tiny random Qwen-Image-shaped model: a 2-block transformer 32 wide (rotary axes 8 + 4 + 4 = the 16-wide heads),
    a 4-channel causal VAE of factor 16 (five levels: 64² images <-> 4² latents <-> 2² tokens), a 2-layer Qwen2.5-VL
    16 wide whose processor sees at most 56² pixels (4 image tokens), with `qwen_char_tokenizer`. The pipelines
    resize the reference to about 1024² whatever the model, so the VAE encodes 1024² images and the transformer
    attends over 32² reference tokens: about a second per step on a CPU."""
    z = 4
    torch.manual_seed(seed)
    transformer = diffusers_class("QwenImageTransformer2DModel", SINCE)(
        patch_size=2, in_channels=4 * z, out_channels=z, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed + 1)
    vae = diffusers_class("AutoencoderKLQwenImage", SINCE)(
        base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True, True],
        latents_mean=[0.0] * z, latents_std=[1.0] * z,
    )
    tokenizer = qwen_char_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(tokenizer, tiny=True))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "processor": qwen_processor(qwen_char_tokenizer(), max_pixels=56 * 56)}


def build_qwen_image_arch(seed: int = 0) -> dict[str, Any]:
    """Qwen-Image-Edit's architecture with random weights: the 20.4 B-parameter transformer, the 127 M VAE and
    Qwen2.5-VL-7B (8.3 B) with the real processor's pixel limits; about 28.8 B parameters. Built in bf16 (in fp32 the
    CPU would need about 115 GB); only when a model config asks for it."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        tokenizer = qwen_char_tokenizer()
        modules = {"transformer": diffusers_class("QwenImageTransformer2DModel", SINCE)(),
                   "vae": diffusers_class("AutoencoderKLQwenImage", SINCE)(),
                   "text_encoder": Qwen2_5_VLForConditionalGeneration(qwen_vl_config(tokenizer, tiny=False))}
    finally:
        torch.set_default_dtype(previous)
    # The real BPE vocabulary lives on the hub; token ids are all the cost model needs.
    return {**modules, "tokenizer": tokenizer, "processor": qwen_processor(qwen_char_tokenizer(), 12845056)}


@register
class QwenImage(Family):
    name = "qwen_image"
    standalone: dict[str, str] = {}  # every module from model.path
    denoiser = "transformer"
    prediction_type = "flow"
    generic_editors = False
    tiny_archs = {"qwen_image": build_tiny_qwen_image}
    random_archs = {"qwen_image": build_qwen_image_arch}
    max_sequence_length = 512  # the pipelines' default

    @property
    def modules(self) -> dict[str, type]:
        return {"transformer": diffusers_class("QwenImageTransformer2DModel", SINCE),
                "vae": diffusers_class("AutoencoderKLQwenImage", SINCE),
                "text_encoder": Qwen2_5_VLForConditionalGeneration, "tokenizer": Qwen2Tokenizer,
                "processor": Qwen2VLProcessor}

    def scheduler(self, config: Mapping[str, Any] | None = None) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler.from_config(config or DEFAULT_SCHEDULER)

    def options(self, model: Mapping[str, Any]) -> dict[str, Any]:
        """``pipeline``: edit (Qwen-Image-Edit) or edit_plus (-2509, -2511); ``max_sequence_length``."""
        return {"pipeline": model.get("pipeline") or "edit",
                "max_sequence_length": int(model.get("max_sequence_length") or self.max_sequence_length)}

    def check(self, model: Mapping[str, Any], modules: Mapping[str, Any], scheduler: Any,
              vae_dtype: torch.dtype) -> None:
        kind = model.get("pipeline") or "edit"
        if kind not in PIPELINES:
            raise ModelLoadError(f"{model['name']}: model.pipeline={kind!r}; expected {' or '.join(PIPELINES)}")
        diffusers_class(*PIPELINES[kind])  # refuse an older diffusers now, not at the first edit
        side = self.vae_scale_factor(modules["vae"]) * modules["transformer"].config.patch_size
        if int(model["resolution"]) % side:
            raise ModelLoadError(f"{model['name']}: model.resolution={model['resolution']} must be a multiple of "
                                 f"{side} (the VAE factor times the transformer's patch)")

    def vae_scale_factor(self, vae: Any) -> int:
        return 2 ** len(vae.config.temperal_downsample)

    def latent_channels(self, m) -> int:
        return m.vae.config.z_dim

    def check_prompt(self, m, prompt: str) -> None:
        """Nothing to check: the edit pipelines keep the whole instruction (no truncation)."""

    def pipeline(self, m, scheduler: Any = None):
        """``model.pipeline``'s diffusers pipeline over the loaded modules, with ``scheduler`` (default: the
        model's)."""
        cls = diffusers_class(*PIPELINES[m.options["pipeline"]])
        return cls(scheduler=m.scheduler if scheduler is None else scheduler, vae=m.vae, text_encoder=m.text_encoder,
                   tokenizer=m.tokenizer, processor=m.processor, transformer=m.transformer)

    @torch.no_grad()
    def encode(self, m, prompts: list[str]) -> Conditioning:
        """`QwenImagePipeline`'s text-to-image conditioning: the VL encoder's last hidden states after its system
        prompt, [B, L, D] in the compute dtype (L <= ``max_sequence_length``), and their mask
        (``encoder_hidden_states_mask`` [B, L], 1 on tokens)."""
        pipe = diffusers_class("QwenImagePipeline", SINCE)(
            scheduler=m.scheduler, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
            transformer=m.transformer)
        text, mask = pipe.encode_prompt(prompts, device=m.device, max_sequence_length=m.options["max_sequence_length"])
        mask = torch.ones(text.shape[:2], dtype=torch.long, device=m.device) if mask is None else mask
        return Conditioning(text.to(m.dtype), {"encoder_hidden_states_mask": mask})

    def predict(self, m, x: torch.Tensor, t: Any, cond: Conditioning, **kwargs: Any) -> torch.Tensor:
        """The velocity in fp32 for fp32 latents x [B, C, h, w] at flow time ``t`` (sigma, a float or one per row), as
        `QwenImagePipeline` calls the transformer: x packed into [B, hw/4, 4C], the latent grid as ``img_shapes``,
        sigma itself as the timestep."""
        b, _, h, w = x.shape
        tokens = m.transformer(
            hidden_states=pack(x).to(m.dtype), timestep=per_row(t, b, m.device).to(m.dtype),
            encoder_hidden_states=cond.text, encoder_hidden_states_mask=cond.added["encoder_hidden_states_mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False, **kwargs,
        )[0]
        return unpack(tokens.float(), h, w)
