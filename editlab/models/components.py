"""The face every editor and trainer sees of a loaded model: `Components`, a frozen object over a model family.

Whatever its family (`models.families`), a loaded model offers the same helpers: prompt conditioning
(`conditioning`), image <-> latent (`encode_image` / `decode_latents`), the denoiser's native prediction in fp32
(`predict`, of type `prediction_type`), its default `guidance` (CFG, or FLUX-dev's embedded scale), its noise
`schedule`, its resolution and device, and a call counter on the denoiser (`count_calls`). Samplers and editors
work through these. The networks stay readable by name (``components.unet``, ``.vae``, ...) for the methods that
need their internals (Prompt-to-Prompt's attention processors), but the object is frozen: an editor that needs
another denoiser (iCD's teacher and adapters, NTI's fp32 UNet) makes a derived model (`derive`) whose lifetime it
owns, and the shared one is never reassigned.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from PIL import Image

from editlab.diffusion.schedules import VPSchedule
from editlab.models.conditioning import Conditioning, unconditional
from editlab.models.errors import ModelLoadError, PromptTooLongError  # noqa: F401 - raised to callers from here
from editlab.models.families import AttentionSite, Family
from editlab.models.guidance import Guidance
from editlab.models.images import to_model_pixels, to_uint8

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, eq=False)
class Components:
    """The networks of a latent text-to-image model (by module name, as the family names them) and its helpers."""

    name: str
    family: Family
    modules: Mapping[str, Any]
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    resolution: int
    offload: str = "none"  # the offload mode in effect ("none" on CPU)
    force_zeros_for_empty_prompt: bool = False  # CFG's unconditional branch is zeros (the family's pipeline rule)
    options: Mapping[str, Any] = field(default_factory=dict)  # the model config's settings its family reads
    pipeline: DiffusionPipeline | None = field(default=None, repr=False)  # owner of the offload hooks, if any

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))  # read-only

    def __getattr__(self, name: str) -> Any:
        """A module by name (``unet``, ``vae``, ``text_encoder``, ...); None for a module the family makes
        optional and this model lacks."""
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        family = self.__dict__.get("family")
        if family is not None and (name in family.modules or name in family.optional):
            return None
        raise AttributeError(f"{type(self).__name__} of family {getattr(family, 'name', '?')} has no {name!r}")

    def derive(self, **modules: Any) -> "Components":
        """A model sharing everything but the given modules (e.g. ``unet=`` a teacher with adapters); its owner
        decides its lifetime, the shared model is unchanged."""
        return replace(self, modules={**self.modules, **modules}, pipeline=None)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network a sampling step evaluates."""
        return self.modules[self.family.denoiser]

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor(self.vae)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self)

    def attention_sites(self) -> list[AttentionSite]:
        return self.family.attention_sites(self)

    @property
    def blend_resolution(self) -> int:
        """Side of the cross-attention maps P2P's LocalBlend reads: latent/4 (SD's five 16² layers on 64² latents),
        or, when the encoder has no cross-attention there, its cross-attention side nearest to that (ties: the
        finer; the toy UNet's 4² on 8² latents)."""
        target = max(self.latent_size // 4, 1)
        sides = {s.side for s in self.attention_sites() if s.cross and s.name.startswith("down_blocks")}
        return min(sides, key=lambda s: (abs(s - target), -s)) if sides else target

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float32)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @functools.cached_property
    def schedule(self) -> VPSchedule:
        """The noise schedule the samplers walk, on the device."""
        return self.family.schedule(self)

    def check_prompt(self, prompt: str) -> None:
        """Raise `PromptTooLongError` for a prompt the text encoder(s) would have to cut."""
        self.family.check_prompt(self, prompt)

    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning in the compute dtype (the family's encoders; open fields in ``added``);
        over-long prompts raise instead of being cut silently."""
        return self.family.encode(self, prompts)

    def unconditional(self) -> Conditioning:
        """CFG's unconditional branch (`models.conditioning.unconditional`)."""
        return unconditional(self.conditioning, self.force_zeros_for_empty_prompt)

    def guidance(self, uncond: Conditioning | None = None) -> Guidance:
        """The family's default guided prediction (`Family.guidance`: CFG; FLUX-dev's embedded scale)."""
        return self.family.guidance(self, uncond)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Token embeddings [B, L, D] of a family conditioned on them alone (`conditioning` otherwise)."""
        cond = self.conditioning(prompts)
        if cond.added is not None:
            raise NotImplementedError(
                f"{self.name} is a {self.family.name}-family model: its denoiser takes more than token embeddings "
                f"({', '.join(cond.added)}); use Components.conditioning"
            )
        return cond.text

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """RGB image at model resolution -> fp32 latent [1, C, h, w] (posterior mean, scaled)."""
        return vae_encode(self.vae, to_model_pixels(image)[None].to(self.device))  # from [1, 3, H, W] in [-1, 1]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """fp32 latents [B, C, h, w] -> list of RGB images (clamped, rounded down to uint8 like the reference)."""
        if not torch.isfinite(latents).all():
            raise FloatingPointError(f"NaN/inf in the latents before decoding; {nan_cause('denoiser', self.dtype)}")
        x = vae_decode(self.vae, latents)
        if not torch.isfinite(x).all():  # clamped, a NaN image would pass as all black and an inf one as all white
            raise FloatingPointError(f"the VAE decoder returned NaN/inf pixels; {nan_cause('VAE', self.vae_dtype)}")
        return [Image.fromarray(img) for img in to_uint8(x)]

    def predict(self, latents: torch.Tensor, t: Any, cond: torch.Tensor | Conditioning, **kwargs: Any
                ) -> torch.Tensor:
        """The denoiser's native prediction (`prediction_type`) for fp32 latents at time ``t`` given the prompt
        conditioning; the network runs in the compute dtype, the result is fp32."""
        return self.family.predict(self, latents, t, cond, **kwargs)


def vae_encode(vae, pixels: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> fp32 latents, (z - shift) x scale: the posterior mean, or a sample of it.
    The VAE runs in its own dtype; ``shift_factor`` is the 16-channel VAEs' (none for SD's)."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    latents = (posterior.sample() if sample else posterior.mean).float()
    if vae.config.get("shift_factor") is not None:
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """fp32 latents [B, C, h, w] -> fp32 pixels [B, 3, H, W], nominally in [-1, 1] (not clamped)."""
    latents = latents / vae.config.scaling_factor
    if vae.config.get("shift_factor") is not None:
        latents = latents + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample.float()


def nan_cause(network: str, dtype: torch.dtype) -> str:
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
def count_forward_calls(*modules: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Count the forward calls of ``modules`` together inside the block (one call = one network evaluation, whatever
    its batch size); ``counter["n"]`` holds the count."""
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()
