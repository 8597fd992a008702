"""Model loading: the one place that turns ``model`` / ``precision`` / ``offload`` configs into diffusers components.

Three kinds of model config:
- ``pretrained``: a hub id or a local directory in the diffusers layout (``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``; SDXL adds ``text_encoder_2/``, ``tokenizer_2/``). ``family: sd | sdxl`` (default
  sd). Optional ``unet_path`` / ``vae_path`` replace the UNet / VAE with a standalone model (e.g. an LCM-distilled
  UNet, the fp16-fix SDXL VAE). ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub itself.
- ``tiny``: a tiny random model built locally (no network), for tests and the offline default run. ``arch: sd``
  (default), ``ip2p`` (8 input channels, InstructPix2Pix-shaped) or ``sdxl`` (two text encoders, ``text_time``
  conditioning, plus a matching random ControlNet).
- ``random_arch``: a full-size architecture (``sd15`` or ``sdxl``, the latter with a random ControlNet mirroring its
  encoder) with random weights, for speed and memory benchmarks.

Any kind takes an optional ``lora`` (hub id, directory or file in the diffusers LoRA format; ``lora_weight_name``
names the file inside a repo), loaded through the pipeline's LoRA loader and, with ``lora_fuse`` (default true),
fused into the weights. It is loaded before offload hooks are installed: loading LoRAs into an offloaded pipeline
misreads the hooks (diffusers #10914).

The VAE stays in ``precision.vae_dtype`` (fp32 by default; a model config may set its own ``vae_dtype``): encoding
images in half precision is a known NaN source, and inversion starts from that latent. Latent trajectories are kept
in fp32 by the editors; only the networks run in the compute dtype.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from editors.paths import hub_kwargs, is_local, resolve_local
from editors.tokenizers import CLIP_MAX_LENGTH, char_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LORA_ADAPTER = "lora"  # adapter name of ``model.lora``


class ModelLoadError(RuntimeError):
    """Weights could not be found or loaded; the message says which config key to set."""


class PromptTooLongError(ValueError):
    pass


def sd_scheduler(**overrides: Any) -> DDIMScheduler:
    """SD 1.x noise schedule as the P2P / PIE-Bench reference runs it (steps_offset 0, abar_final = abar_0)."""
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
    pipeline: DiffusionPipeline | None = None  # only set when offload hooks are installed: the pipeline owning them
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL family only
    tokenizer_2: CLIPTokenizer | None = None  # SDXL family only
    controlnet: ControlNetModel | None = None  # random-weight SDXL models only (tiny / random_arch)
    offload: str = "none"  # the offload mode in effect ("none" on CPU)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def blend_resolution(self) -> int:
        """Side of the cross-attention maps P2P's LocalBlend reads: latent/4 (SD's five 16² layers on 64² latents),
        or, when the UNet has no cross-attention there, its cross-attention size nearest to that (ties: the finer;
        the toy UNet's 4² on 8² latents)."""
        target = max(self.latent_size // 4, 1)
        sizes = [self.latent_size // 2**i for i, kind in enumerate(self.unet.config.down_block_types)
                 if "CrossAttn" in kind]
        return min(sizes, key=lambda s: (abs(s - target), -s)) if sizes else target

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
        if self.text_encoder_2 is not None:
            raise NotImplementedError(
                f"{self.name} is an SDXL-family model: its UNet takes both text encoders plus pooled embeddings; "
                "encode prompts with the SDXL pipeline's encode_prompt"
            )
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
            raise FloatingPointError(f"NaN/inf in the latents before decoding; {_nan_cause('UNet', self.dtype)}")
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae_dtype)).sample
        if not torch.isfinite(x).all():  # clamped, a NaN image would pass as all black and an inf one as all white
            raise FloatingPointError(f"the VAE decoder returned NaN/inf pixels; {_nan_cause('VAE', self.vae_dtype)}")
        x = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((img * 255).astype(np.uint8)) for img in x]

    def unet_eps(self, latents: torch.Tensor, t: int, text: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Noise prediction for fp32 latents; the UNet runs in the compute dtype and the result comes back in fp32."""
        timestep = torch.tensor(t, device=self.device)
        out = self.unet(latents.to(self.dtype), timestep, encoder_hidden_states=text, **kwargs).sample
        return out.float()


def _nan_cause(network: str, dtype: torch.dtype) -> str:
    """What a non-finite output of ``network`` running in ``dtype`` most likely means, and what to try."""
    if dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        return f"the {network} runs in {name}, whose range overflowed: try precision=fp32 or bf16"
    return (f"the {network} runs in float32, so this is no precision overflow: a diverging computation, usually an "
            "extreme editor parameter (guidance scale, steps) or a broken input; check the editor's settings")


def resolve_device(device: str) -> torch.device:
    """``auto`` = the GPU when torch sees one, else the CPU; an explicit GPU that is not there is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device} but torch sees no CUDA GPU here; use device=auto or device=cpu")
        if (resolved.index or 0) >= count:
            raise ValueError(f"device={device} but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return resolved


# --------------------------------------------------------------------------------------------------------------------
# Architectures built locally

SD_MODULES = ("unet", "vae", "text_encoder", "tokenizer")  # the order the SD-family builders return them in


def _tiny_text_config(vocab_size: int, hidden: int, layers: int, heads: int, mlp: int, **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(**{
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": heads, "max_position_embeddings": CLIP_MAX_LENGTH, "bos_token_id": 0,
        "eos_token_id": 1, "pad_token_id": 1, "hidden_act": "quick_gelu", **extra,
    })


def _tiny_vae(**overrides: Any) -> AutoencoderKL:
    """64² images <-> 4 x 16² latents (VAE factor 4)."""
    return AutoencoderKL(**{
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32, 32),
        "layers_per_block": 1, "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3, "norm_num_groups": 8, "sample_size": 64, **overrides,
    })


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
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(len(tokenizer), hidden=32, layers=2, heads=4, mlp=37))
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
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=False)  # like the fp16-fix SDXL VAE
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config(len(tokenizer), hidden=32, layers=2, heads=4, mlp=37))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_text_config(len(tokenizer), hidden=32, layers=2, heads=4, mlp=37, projection_dim=pooled_dim)
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
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )
    text_encoder = CLIPTextModel(_tiny_text_config(49408, hidden=768, layers=12, heads=12, mlp=3072))
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
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
        scaling_factor=0.13025, force_upcast=False,  # stands in for the fp16-fix VAE
    )
    text_encoder = CLIPTextModel(_tiny_text_config(49408, hidden=768, layers=12, heads=12, mlp=3072))
    text_encoder_2 = CLIPTextModelWithProjection(  # OpenCLIP ViT-bigG/14's text tower
        _tiny_text_config(49408, hidden=1280, layers=32, heads=20, mlp=5120, projection_dim=1280, hidden_act="gelu")
    )
    controlnet = ControlNetModel.from_unet(unet)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": char_tokenizer(),
            "text_encoder_2": text_encoder_2, "tokenizer_2": char_tokenizer(), "controlnet": controlnet}


TINY_ARCHS = {"sd": build_tiny, "ip2p": partial(build_tiny, in_channels=8), "sdxl": build_tiny_sdxl}
RANDOM_ARCHS = {"sd15": build_sd15_arch, "sdxl": build_sdxl_arch}


def _build_local(archs: Mapping[str, Callable], model: Mapping[str, Any], default_arch: str | None = None
                 ) -> dict[str, Any]:
    arch = model.get("arch") or default_arch
    if arch not in archs:
        raise ModelLoadError(f"unknown model.arch={arch!r} for model.kind={model['kind']}; known: {sorted(archs)}")
    built = archs[arch](model.get("seed", 0))
    return built if isinstance(built, dict) else dict(zip(SD_MODULES, built))


# --------------------------------------------------------------------------------------------------------------------
# Pretrained weights


def _local_or_hub(path: str, key: str) -> str:
    """An absolute or ./relative path must be a directory (a clear error now beats a hub lookup); else a hub id."""
    if is_local(path):
        local = resolve_local(path)
        if not local.is_dir():
            raise ModelLoadError(f"{key}={path!r} is not a directory; point {key} at a diffusers model folder")
        return str(local)
    return path


@contextlib.contextmanager
def _load_errors(key: str, path: str):
    """Turn hub/file errors (OSError subclasses, or ValueError for bad files) into a ModelLoadError naming ``key``."""
    try:
        yield
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if offline else ""
        raise ModelLoadError(
            f"could not load model weights from {key}={path!r}{hint}: {err}\n"
            f"Set {key} to a hub id you can download or to a local diffusers-format directory."
        ) from err


def _load_pretrained(model: Mapping[str, Any], dtype: torch.dtype, vae_dtype: torch.dtype
                     ) -> tuple[dict[str, Any], DDIMScheduler]:
    family = model.get("family") or "sd"
    if family not in ("sd", "sdxl"):
        raise ModelLoadError(f"unknown model.family={family!r}; expected sd or sdxl")
    path = _local_or_hub(model["path"], "model.path")
    unet_path, vae_path = model.get("unet_path"), model.get("vae_path")
    variant = {"variant": model["variant"]} if model.get("variant") else {}
    hub = hub_kwargs(path, "model.path")
    modules: dict[str, Any] = {}
    with _load_errors("model.path", path):
        if not unet_path:
            modules["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype, **variant,
                                                                   **hub)
        if not vae_path:
            modules["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=vae_dtype, **hub)
        modules["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **hub)
        modules["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **hub)
        if family == "sdxl":
            modules["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", dtype=dtype, **hub
            )
            modules["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **hub)
        scheduler = sd_scheduler(**_beta_overrides(DDIMScheduler.load_config(path, subfolder="scheduler", **hub)))
    if unet_path:  # a standalone UNet (e.g. latent-consistency/lcm-ssd-1b) in place of the base model's
        unet_path = _local_or_hub(unet_path, "model.unet_path")
        hub = hub_kwargs(unet_path, "model.unet_path")
        with _load_errors("model.unet_path", unet_path):
            modules["unet"] = UNet2DConditionModel.from_pretrained(unet_path, dtype=dtype, **variant, **hub)
    if vae_path:  # a standalone VAE (e.g. madebyollin/sdxl-vae-fp16-fix)
        vae_path = _local_or_hub(vae_path, "model.vae_path")
        hub = hub_kwargs(vae_path, "model.vae_path")
        with _load_errors("model.vae_path", vae_path):
            modules["vae"] = AutoencoderKL.from_pretrained(vae_path, dtype=vae_dtype, **hub)
    return modules, scheduler


def _beta_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the checkpoint's beta schedule but the reference DDIM conventions (offset 0, no clipping)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return {k: config[k] for k in keys if k in config}


# --------------------------------------------------------------------------------------------------------------------
# Assembly: dtypes, LoRA, placement


def to_channels_last(*modules: torch.nn.Module | None) -> None:
    """NHWC memory format for the convolutions of ``modules`` (None skipped): fewer layout conversions in cuDNN on
    recent GPUs, the same results up to rounding (``precision.channels_last``)."""
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)


def load_components(model: Mapping[str, Any], precision: Mapping[str, Any], offload: Mapping[str, Any],
                    device: str = "auto") -> Components:
    """Build the model described by the ``model`` config in the ``precision`` dtypes, with ``offload`` applied."""
    device_ = resolve_device(device)
    dtype = DTYPES[precision["dtype"]]
    vae_dtype = DTYPES[model.get("vae_dtype") or precision["vae_dtype"]]
    kind = model["kind"]
    if kind == "pretrained":
        modules, scheduler = _load_pretrained(model, dtype, vae_dtype)
    elif kind == "tiny":
        modules, scheduler = _build_local(TINY_ARCHS, model, default_arch="sd"), sd_scheduler()
    elif kind == "random_arch":
        modules, scheduler = _build_local(RANDOM_ARCHS, model), sd_scheduler()
    else:
        raise ModelLoadError(f"unknown model.kind={kind!r}; expected pretrained, tiny or random_arch")
    unet, vae = modules["unet"], modules["vae"]
    if unet.config.get("prediction_type", "epsilon") not in (None, "epsilon") or \
            scheduler.config.prediction_type != "epsilon":
        raise ModelLoadError(f"{model['name']}: only epsilon-prediction models are supported")
    if "text_encoder_2" in modules and vae_dtype == torch.float16 and vae.config.get("force_upcast", True):
        raise ModelLoadError(
            f"{model['name']}: SDXL's VAE overflows in float16 (NaN latents, black images); set "
            "model.vae_path=madebyollin/sdxl-vae-fp16-fix, or model.vae_dtype=float32"
        )

    for module in modules.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
            target = vae_dtype if module is vae else dtype
            if any(p.dtype != target for p in module.parameters()):  # loaded in it already: no cast (and no warning)
                module.to(dtype=target)
    if precision.get("channels_last"):
        to_channels_last(unet, vae, modules.get("controlnet"))
    unet.set_attn_processor(AttnProcessor2_0())  # fused SDPA everywhere; editors install their own where needed

    components = Components(
        name=model["name"], scheduler=scheduler, device=device_, dtype=dtype, vae_dtype=vae_dtype,
        resolution=int(model["resolution"]), offload=_offload_mode(offload.get("mode", "none"), device_), **modules,
    )
    pipe = _base_pipeline(components)
    _load_lora(pipe, model)  # before any offload hook exists (diffusers #10914: LoRA loading misreads the hooks)
    attach_pipeline(components, pipe)  # the ControlNet of random-weight SDXL models is placed by the editor using it
    return components


def _base_pipeline(components: Components) -> DiffusionPipeline:
    """A text-to-image pipeline over the loaded modules (no copies): the LoRA loader and offload hooks live on it."""
    c = components
    # It never samples. Its own scheduler copy keeps StableDiffusionPipeline from rewriting the shared scheduler's
    # reference steps_offset 0 to 1 (and warning about it).
    scheduler = DDIMScheduler.from_config(c.scheduler.config, steps_offset=1)
    if c.text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=scheduler, add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _load_lora(pipe: DiffusionPipeline, model: Mapping[str, Any]) -> None:
    """Load ``model.lora`` into the networks and, unless ``model.lora_fuse`` is false, fuse it into their weights."""
    lora = model.get("lora")
    if not lora:
        return
    hub = hub_kwargs(lora, "model.lora") if not Path(lora).expanduser().is_file() else {}
    with _load_errors("model.lora", lora):  # offline, a cached hub LoRA is only found with its weight_name
        pipe.load_lora_weights(lora, weight_name=model.get("lora_weight_name"), adapter_name=LORA_ADAPTER, **hub)
    if model.get("lora_fuse", True):
        pipe.fuse_lora(adapter_names=[LORA_ADAPTER])
        pipe.unload_lora_weights()  # the fused weights stay, the adapter layers go: no per-call LoRA cost


def _offload_mode(mode: str, device: torch.device) -> str:
    if mode not in ("none", "model", "sequential"):
        raise ValueError(f"unknown offload.mode={mode!r}; expected none, model or sequential")
    if mode != "none" and device.type == "cpu":
        log.warning("offload=%s has no effect on CPU; running without offload", mode)
        return "none"
    return mode


def attach_pipeline(components: Components, pipe: DiffusionPipeline) -> None:
    """Run ``pipe`` (a pipeline over the loaded modules, plus any an editor adds, e.g. a ControlNet) on the device.

    Without offload its modules are moved there. With offload, diffusers' hooks are re-installed on ``pipe``: that
    offloads the modules only it holds too, and lets its ``__call__`` put every model back when it ends. The hooks also
    fire when the modules are called directly, so `Components` helpers keep working.
    """
    if components.offload == "none":
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(components.device)
        return
    if components.offload == "model":
        pipe.enable_model_cpu_offload(device=components.device)
    else:
        pipe.enable_sequential_cpu_offload(device=components.device)
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
