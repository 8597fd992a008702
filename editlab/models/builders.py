"""Architectures built locally, with random weights: tiny ones for tests and the offline default run, and the
full-size SD 1.5 / SDXL architectures for speed and memory benchmarks (random weights have the real cost); and the
parts the other families' builders share (CLIP and T5 text towers, the VAEs)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config

from editlab.models.tokenizers import CLIP_MAX_LENGTH, char_tokenizer

SD_MODULES = ("unet", "vae", "text_encoder", "tokenizer")  # the order the SD-family builders return them in


def clip_text_config(vocab_size: int, hidden: int, layers: int, heads: int, mlp: int, **extra: Any) -> CLIPTextConfig:
    """A CLIP text tower for `tokenizers.char_tokenizer` ids (start 0, end and padding 1)."""
    return CLIPTextConfig(**{
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": heads, "max_position_embeddings": CLIP_MAX_LENGTH, "bos_token_id": 0,
        "eos_token_id": 1, "pad_token_id": 1, "hidden_act": "quick_gelu", **extra,
    })


def clip_l_config(**extra: Any) -> CLIPTextConfig:
    """OpenAI CLIP ViT-L/14's text tower (SD 1.x; the first encoder of SDXL, SD3 and FLUX)."""
    return clip_text_config(49408, hidden=768, layers=12, heads=12, mlp=3072, **extra)


def clip_g_config(**extra: Any) -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14's text tower with its projection (the second encoder of SDXL and SD3)."""
    return clip_text_config(49408, hidden=1280, layers=32, heads=20, mlp=5120, projection_dim=1280, hidden_act="gelu",
                            **extra)


def t5_config(vocab_size: int = 32128, tiny: bool = False) -> T5Config:
    """T5 v1.1 XXL's encoder (SD3's third text encoder, FLUX's second: 4.76 B parameters), or a one-layer, 32-wide
    stand-in of the same kind (gated GELU, relative positions) for `tokenizers.t5_char_tokenizer` ids."""
    size = dict(d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4) if tiny else \
        dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    return T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **size)


def tiny_vae(**overrides: Any) -> AutoencoderKL:
    """64² images <-> 4 x 16² latents (VAE factor 4)."""
    return AutoencoderKL(**{
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32, 32),
        "layers_per_block": 1, "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3, "norm_num_groups": 8, "sample_size": 64, **overrides,
    })


def vae_arch(**overrides: Any) -> AutoencoderKL:
    """The full-size VAE of SD 1.x, SDXL, SD3 and FLUX (factor 8; they differ in latent channels and scaling)."""
    return AutoencoderKL(**{
        "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, **overrides,
    })


def flow_vae(scaling_factor: float, shift_factor: float, tiny: bool = False) -> AutoencoderKL:
    """SD3's and FLUX's VAE: 16 latent channels, no quant convolutions, latents (z - shift) x scale; ``tiny``: the
    tiny VAE's shape (64² images <-> 16 x 16² latents)."""
    options = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=scaling_factor, shift_factor=shift_factor)
    return tiny_vae(**options) if tiny else vae_arch(sample_size=1024, **options)


def build_tiny(seed: int = 0, in_channels: int = 4
               ) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """Tiny random SD-shaped model: 64² images, VAE factor 4, 16² latents, cross-attention at 16², 8², 4².

    ``in_channels=8`` gives the InstructPix2Pix shape (noisy latent and image latent concatenated on channels).
    """
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip_text_config(len(tokenizer), hidden=32, layers=2, heads=4, mlp=37))
    return unet, vae, text_encoder, tokenizer


def _randomize_zero_convs(controlnet: ControlNetModel, std: float = 0.05) -> None:
    """A new ControlNet's output convolutions are zero, so it has no effect until trained; random ones make the
    control image change the result, which tests need to see."""
    for conv in (controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                 controlnet.controlnet_mid_block):
        torch.nn.init.normal_(conv.weight, std=std)


def build_tiny_sdxl(seed: int = 0) -> dict[str, Any]:
    """Tiny random SDXL-shaped model: 64² images, VAE factor 4, 16² latents; two text encoders (32 + 32 wide, the
    second with a 32-d pooled projection) and ``text_time`` micro-conditioning as in SDXL; plus a ControlNet mirroring
    the UNet's encoder, with a conditioning embedding that downsamples 64² control images to the 16² latents."""
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    time_embed_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        # six micro-conditioning numbers (original size, crop, target size), each embedded, plus the pooled text
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=False)  # like the fp16-fix SDXL VAE
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip_text_config(len(tokenizer), hidden=32, layers=2, heads=4, mlp=37))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_text_config(len(tokenizer), hidden=32, layers=2, heads=4, mlp=37, projection_dim=pooled_dim)
    )
    torch.manual_seed(seed + 4)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32))
    _randomize_zero_convs(controlnet)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": char_tokenizer(), "controlnet": controlnet}


def build_sd15_arch(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """Stable Diffusion 1.5's architecture with random weights (the real compute and memory cost)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = vae_arch(latent_channels=4, sample_size=512)
    text_encoder = CLIPTextModel(clip_l_config())
    # The real CLIP BPE vocabulary lives on the hub; token ids are all the cost model needs.
    return unet, vae, text_encoder, char_tokenizer()


def build_sdxl_arch(seed: int = 0) -> dict[str, Any]:
    """SDXL 1.0's architecture with random weights, plus a ControlNet mirroring its encoder (the shape of
    ``diffusers/controlnet-canny-sdxl-1.0``, zero output convolutions as at the start of training; the cost is the
    same). Large: about 3.5 B parameters in all."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    )
    vae = vae_arch(latent_channels=4, sample_size=1024, scaling_factor=0.13025,
                   force_upcast=False)  # stands in for the fp16-fix VAE
    text_encoder = CLIPTextModel(clip_l_config())
    text_encoder_2 = CLIPTextModelWithProjection(clip_g_config())
    controlnet = ControlNetModel.from_unet(unet)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": char_tokenizer(),
            "text_encoder_2": text_encoder_2, "tokenizer_2": char_tokenizer(), "controlnet": controlnet}



def named(modules: tuple) -> dict[str, Any]:
    """An SD-family builder's tuple as the family's module dict."""
    return dict(zip(SD_MODULES, modules))
