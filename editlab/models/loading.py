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
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from editlab.models.builders import RANDOM_ARCHS, SD_MODULES, TINY_ARCHS
from editlab.models.components import DTYPES, Components, ModelLoadError, resolve_device
from editlab.models.hub import hub_kwargs, is_local, resolve_local
from editlab.models.safe_load import safe_loading

log = logging.getLogger(__name__)

LORA_ADAPTER = "lora"  # adapter name of ``model.lora``


def sd_scheduler(**overrides: Any) -> DDIMScheduler:
    """SD 1.x noise schedule as the P2P / PIE-Bench reference runs it (steps_offset 0, abar_final = abar_0)."""
    config = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=0,
    )
    return DDIMScheduler(**{**config, **overrides})


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


# The model-family seam: each family's modules in the diffusers layout (module name = subfolder) and their classes.
# A model.family names one; a new family adds its entry here (and, where its denoiser predicts something else than
# noise, its own `Components.predict`).
FAMILIES: dict[str, dict[str, type]] = {
    "sd": {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
           "tokenizer": CLIPTokenizer},
    "sdxl": {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
             "tokenizer": CLIPTokenizer, "text_encoder_2": CLIPTextModelWithProjection, "tokenizer_2": CLIPTokenizer},
}
STANDALONE = {"unet": "unet_path", "vae": "vae_path"}  # modules a model config may take from a folder of their own


def _load_pretrained(model: Mapping[str, Any], dtype: torch.dtype, vae_dtype: torch.dtype
                     ) -> tuple[dict[str, Any], DDIMScheduler]:
    family = model.get("family") or "sd"
    if family not in FAMILIES:
        raise ModelLoadError(f"unknown model.family={family!r}; expected one of {', '.join(FAMILIES)}")
    path = _local_or_hub(model["path"], "model.path")
    variant = {"variant": model["variant"]} if model.get("variant") else {}

    def load(name: str, cls: type, source: str, key: str, subfolder: str | None) -> Any:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        if issubclass(cls, torch.nn.Module):
            kwargs["dtype"] = vae_dtype if name == "vae" else dtype
        if name == "unet":
            kwargs.update(variant)
        kwargs.update(hub_kwargs(source, key))  # outside _load_errors: an unreachable hub is its own clear error
        with _load_errors(key, source):
            return cls.from_pretrained(source, **kwargs)

    modules: dict[str, Any] = {}
    for name, cls in FAMILIES[family].items():
        key = STANDALONE.get(name)
        if key and model.get(key):  # e.g. latent-consistency/lcm-ssd-1b, madebyollin/sdxl-vae-fp16-fix
            modules[name] = load(name, cls, _local_or_hub(model[key], f"model.{key}"), f"model.{key}", None)
        else:
            modules[name] = load(name, cls, path, "model.path", name)
    hub = hub_kwargs(path, "model.path")
    with _load_errors("model.path", path):
        config = DDIMScheduler.load_config(path, subfolder="scheduler", **hub)
    return modules, sd_scheduler(**_beta_overrides(config))


def _force_zeros_for_empty_prompt(model: Mapping[str, Any], sdxl: bool) -> bool:
    """The pipeline's ``force_zeros_for_empty_prompt`` (its model_index.json), else diffusers' default for the
    family: zeros for SDXL pipelines; SD pipelines have no such setting (the encoded empty prompt)."""
    if not sdxl:
        return False
    if model["kind"] == "pretrained":
        path = _local_or_hub(model["path"], "model.path")
        with contextlib.suppress(OSError):  # a folder without model_index.json keeps the default
            index = DiffusionPipeline.load_config(path, **hub_kwargs(path, "model.path"))
            return bool(index.get("force_zeros_for_empty_prompt", True))
    return True


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


@safe_loading
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
        resolution=int(model["resolution"]), offload=_offload_mode(offload.get("mode", "none"), device_),
        force_zeros_for_empty_prompt=_force_zeros_for_empty_prompt(model, "text_encoder_2" in modules), **modules,
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
            force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt,
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


