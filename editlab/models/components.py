"""The face every editor and trainer sees of a loaded model: `Components`.

A latent text-to-image model, whatever its family, offers the same helpers: prompt conditioning
(`encode_prompts`), image <-> latent (`encode_image` / `decode_latents`), the denoiser's prediction in fp32
(`predict`), its resolution and device, and a call counter on the denoiser (`count_calls`). Samplers and editors
work through these; the networks themselves (``unet``, ``vae``, text encoders) stay reachable for the methods that
need their internals (Prompt-to-Prompt's attention processors, LoRA adapters).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from editlab.diffusion.schedules import VPSchedule
from editlab.models.conditioning import Conditioning, encode_conditioning, unconditional
from editlab.models.images import to_model_pixels, to_uint8

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """Weights could not be found or loaded; the message says which config key to set."""


class PromptTooLongError(ValueError):
    pass


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
    force_zeros_for_empty_prompt: bool = False  # the pipeline's: CFG's unconditional branch is zeros (SDXL family)

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

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @functools.cached_property
    def schedule(self) -> VPSchedule:
        """The noise schedule the samplers walk, on the device."""
        return VPSchedule(self.alphas_cumprod.to(self.device))

    def check_prompt(self, prompt: str) -> None:
        n = len(self.tokenizer(prompt).input_ids)
        limit = self.tokenizer.model_max_length
        if n > limit:
            raise PromptTooLongError(
                f"prompt has {n} tokens (with start/end tokens); the text encoder takes at most {limit}: {prompt!r}"
            )

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning (SD: text [B, 77, D]; SDXL: both encoders plus pooled and size embeddings) in
        the compute dtype; over-long prompts raise instead of being cut silently."""
        for prompt in prompts:
            self.check_prompt(prompt)
        encoders = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            encoders.append((self.tokenizer_2, self.text_encoder_2))
        return encode_conditioning(prompts, encoders, self.resolution, self.device, self.dtype)

    def unconditional(self) -> Conditioning:
        """CFG's unconditional branch (`models.conditioning.unconditional`)."""
        return unconditional(self.conditioning, self.force_zeros_for_empty_prompt)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, 77, D] of an SD-family model (`conditioning`)."""
        if self.text_encoder_2 is not None:
            raise NotImplementedError(
                f"{self.name} is an SDXL-family model: its UNet takes both text encoders plus pooled embeddings; "
                "use Components.conditioning"
            )
        return self.conditioning(prompts).text

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """RGB image at model resolution -> fp32 latent [1, 4, h, w] (posterior mean x scaling factor)."""
        return vae_encode(self.vae, to_model_pixels(image)[None].to(self.device))  # from [1, 3, H, W] in [-1, 1]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """fp32 latents [B, 4, h, w] -> list of RGB images (clamped, rounded down to uint8 like the reference)."""
        if not torch.isfinite(latents).all():
            raise FloatingPointError(f"NaN/inf in the latents before decoding; {_nan_cause('UNet', self.dtype)}")
        x = vae_decode(self.vae, latents)
        if not torch.isfinite(x).all():  # clamped, a NaN image would pass as all black and an inf one as all white
            raise FloatingPointError(f"the VAE decoder returned NaN/inf pixels; {_nan_cause('VAE', self.vae_dtype)}")
        return [Image.fromarray(img) for img in to_uint8(x)]

    def predict(self, latents: torch.Tensor, t: int, text: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The denoiser's prediction (noise, for the epsilon-prediction families) for fp32 latents at timestep
        ``t`` given the prompt conditioning ``text``; the network runs in the compute dtype, the result is fp32."""
        timestep = torch.tensor(t, device=self.device)
        out = self.unet(latents.to(self.dtype), timestep, encoder_hidden_states=text, **kwargs).sample
        return out.float()

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network a sampling step evaluates (the UNet of the SD families)."""
        return self.unet

    def count_calls(self) -> contextlib.AbstractContextManager[dict[str, int]]:
        """Count the denoiser's forward calls inside the block (`count_forward_calls`)."""
        return count_forward_calls(self.denoiser)


def vae_encode(vae: AutoencoderKL, pixels: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> fp32 latents x scaling factor: the posterior mean, or a sample of it. The
    VAE runs in its own dtype."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    return (posterior.sample() if sample else posterior.mean).float() * vae.config.scaling_factor


def vae_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """fp32 latents [B, 4, h, w] -> fp32 pixels [B, 3, H, W], nominally in [-1, 1] (not clamped)."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()


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




@contextlib.contextmanager
def count_forward_calls(module: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Count ``module``'s forward calls inside the block (one call = one network evaluation, whatever its batch
    size); ``counter["n"]`` holds the count."""
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
