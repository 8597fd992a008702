"""Model loading: the one place that turns ``model`` / ``precision`` / ``offload`` configs into diffusers components.

Three kinds of model config:
- ``pretrained``: a hub id or a local directory in the diffusers layout (``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``). ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself.
- ``tiny``: a tiny random SD-shaped model built locally (no network), for tests and the offline default run.
- ``random_arch``: a full-size architecture (``sd15``) with random weights, for speed and memory benchmarks.

The VAE stays in ``precision.vae_dtype`` (fp32 by default): encoding images in half precision is a known NaN source,
and inversion starts from that latent. Latent trajectories are kept in fp32 by the editors; only the networks run in
the compute dtype.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from editors.tokenizers import CLIP_MAX_LENGTH, char_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """Weights could not be found or loaded; the message says which config key to set."""


class PromptTooLongError(ValueError):
    pass


def sd_scheduler(**overrides: Any) -> DDIMScheduler:
    """Stable Diffusion 1.x noise schedule as the P2P / PIE-Bench reference runs it (steps_offset 0, abar_final = abar_0)."""
    config = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=0,
    )
    return DDIMScheduler(**{**config, **overrides})


@dataclass
class Components:
    """The networks of a latent text-to-image model plus the helpers every editor needs around them."""

    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    resolution: int
    pipeline: StableDiffusionPipeline | None = None  # only set when offload hooks are installed

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float32)

    def check_prompt(self, prompt: str) -> None:
        n = len(self.tokenizer(prompt).input_ids)
        limit = self.tokenizer.model_max_length
        if n > limit:
            raise PromptTooLongError(
                f"prompt has {n} tokens (with start/end tokens); the text encoder takes at most {limit}: {prompt!r}"
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, 77, D] in the compute dtype; over-long prompts raise instead of being cut silently."""
        for prompt in prompts:
            self.check_prompt(prompt)
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0].to(self.dtype)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """RGB image at model resolution -> fp32 latent [1, 4, h, w] (posterior mean x scaling factor)."""
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        x = x.permute(2, 0, 1)[None].to(self.device, self.vae_dtype)  # [1, 3, H, W] in [-1, 1]
        latent = self.vae.encode(x).latent_dist.mean
        return latent.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """fp32 latents [B, 4, h, w] -> list of RGB images (clamped, rounded down to uint8 like the reference)."""
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                f"NaN/inf in the latents before decoding (UNet dtype {self.dtype}); half precision overflowed: "
                "try precision=fp32 or bf16"
            )
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae_dtype)).sample
        x = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((img * 255).astype(np.uint8)) for img in x]

    def unet_eps(self, latents: torch.Tensor, t: int, text: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Noise prediction for fp32 latents; the UNet runs in the compute dtype and the result comes back in fp32."""
        timestep = torch.tensor(t, device=self.device)
        out = self.unet(latents.to(self.dtype), timestep, encoder_hidden_states=text, **kwargs).sample
        return out.float()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------------------------------
# Architectures built locally


def _tiny_text_config(vocab_size: int, hidden: int, layers: int, heads: int, mlp: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, hidden_act="quick_gelu",
    )


def build_tiny(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """Tiny random SD-shaped model: 64² images, VAE factor 4, 16² latents, cross-attention at 16², 8², 4²."""
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(len(tokenizer), hidden=32, layers=2, heads=4, mlp=37))
    return unet, vae, text_encoder, tokenizer


def build_sd15_arch(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """Stable Diffusion 1.5's architecture with random weights (the real compute and memory cost)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )
    text_encoder = CLIPTextModel(_tiny_text_config(49408, hidden=768, layers=12, heads=12, mlp=3072))
    # The real CLIP BPE vocabulary lives on the hub; token ids are all the cost model needs.
    return unet, vae, text_encoder, char_tokenizer()


RANDOM_ARCHS = {"sd15": build_sd15_arch}


def _load_pretrained(path: str, variant: str | None, dtype: torch.dtype):
    local = Path(path).expanduser()
    if local.is_absolute() or path.startswith("."):
        if not local.is_dir():
            raise ModelLoadError(f"model.path={path!r} is not a directory; point model.path at a diffusers model folder")
        path = str(local)
    try:
        kwargs = dict(variant=variant) if variant else {}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = sd_scheduler(**_beta_overrides(DDIMScheduler.load_config(path, subfolder="scheduler")))
    except (OSError, ValueError) as err:  # hub/file errors surface as OSError (EnvironmentError) subclasses
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if offline else ""
        raise ModelLoadError(
            f"could not load model weights from model.path={path!r}{hint}: {err}\n"
            "Set model.path to a hub id you can download or to a local diffusers-format directory."
        ) from err
    return unet, vae, text_encoder, tokenizer, scheduler


def _beta_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the checkpoint's beta schedule but the reference DDIM conventions (offset 0, no clipping)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return {k: config[k] for k in keys if k in config}


def load_components(model: Mapping[str, Any], precision: Mapping[str, Any], offload: Mapping[str, Any],
                    device: str = "auto") -> Components:
    """Build the model described by the ``model`` config in the ``precision`` dtypes, with ``offload`` applied."""
    device_ = resolve_device(device)
    dtype, vae_dtype = DTYPES[precision["dtype"]], DTYPES[precision["vae_dtype"]]
    kind = model["kind"]
    if kind == "pretrained":
        unet, vae, text_encoder, tokenizer, scheduler = _load_pretrained(model["path"], model.get("variant"), dtype)
    elif kind == "tiny":
        unet, vae, text_encoder, tokenizer = build_tiny(model.get("seed", 0))
        scheduler = sd_scheduler()
    elif kind == "random_arch":
        if model["arch"] not in RANDOM_ARCHS:
            raise ModelLoadError(f"unknown model.arch={model['arch']!r}; known: {sorted(RANDOM_ARCHS)}")
        unet, vae, text_encoder, tokenizer = RANDOM_ARCHS[model["arch"]](model.get("seed", 0))
        scheduler = sd_scheduler()
    else:
        raise ModelLoadError(f"unknown model.kind={kind!r}; expected pretrained, tiny or random_arch")
    if unet.config.get("prediction_type", "epsilon") not in (None, "epsilon") or \
            scheduler.config.prediction_type != "epsilon":
        raise ModelLoadError(f"{model['name']}: only epsilon-prediction models are supported")

    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    unet.to(dtype=dtype)
    text_encoder.to(dtype=dtype)
    vae.to(dtype=vae_dtype)
    unet.set_attn_processor(AttnProcessor2_0())  # fused SDPA everywhere; editors install their own where needed

    components = Components(
        name=model["name"], unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        device=device_, dtype=dtype, vae_dtype=vae_dtype, resolution=int(model["resolution"]),
    )
    _place(components, offload.get("mode", "none"))
    return components


def _place(components: Components, mode: str) -> None:
    """Move to the device, or install diffusers' offload hooks (they also fire when components are called directly)."""
    if mode == "none" or components.device.type == "cpu":
        if mode != "none":
            log.warning("offload=%s has no effect on CPU; running without offload", mode)
        for module in (components.unet, components.vae, components.text_encoder):
            module.to(components.device)
        return
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if mode == "model":
        pipe.enable_model_cpu_offload(device=components.device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=components.device)
    else:
        raise ValueError(f"unknown offload.mode={mode!r}; expected none, model or sequential")
    components.pipeline = pipe


@contextlib.contextmanager
def count_unet_calls(unet: torch.nn.Module):
    """Count UNet forward calls (one call = one network evaluation, whatever its batch size)."""
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    handle = unet.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
