"""Model loading: the one place that turns ``model`` / ``precision`` / ``offload`` configs into diffusers components.

Three kinds of model config:
- ``pretrained``: a hub id or a local directory in the diffusers layout of ``model.family`` (`models.families`; sd
  by default: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; sdxl adds ``text_encoder_2/``,
  ``tokenizer_2/``; sd3 and flux have ``transformer/`` and three / two text encoders, T5 the last; qwen_image has
  ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``processor/``). Optional
  ``unet_path`` / ``vae_path`` (the family's standalone keys) replace a module with a model of its own folder (e.g.
  an LCM-distilled UNet, the fp16-fix SDXL VAE); ``t5: false`` loads SD3 without T5. ``HF_HUB_OFFLINE=1`` is
  honoured by huggingface_hub itself.
- ``tiny``: a tiny random model built locally (no network), for tests and the offline default run; ``arch`` names a
  family's tiny build (sd: ``sd`` (default), ``ip2p`` (8 input channels); sdxl: ``sdxl``, with a random ControlNet;
  sd3: ``sd3``, ``sd35``; flux: ``flux``, Kontext's too; qwen_image: ``qwen_image``).
- ``random_arch``: a full-size architecture (sd: ``sd15``; sdxl: ``sdxl``, with a random ControlNet mirroring its
  encoder; sd3: ``sd3`` (SD3-medium); flux: ``flux`` (FLUX.1-dev, Kontext's); qwen_image: ``qwen_image``
  (Qwen-Image-Edit)) with random weights, for speed and memory benchmarks.

Any kind takes an optional ``scheduler``: keys of the scheduler config that replace the checkpoint's (a
step-distilled LoRA's schedule, e.g. Qwen-Image-Lightning's shift), and an optional ``lora`` (hub id, directory or
file in the diffusers LoRA format; ``lora_weight_name`` names the file inside a repo), loaded through the pipeline's
LoRA loader and, with ``lora_fuse`` (default true), fused into the weights. It is loaded before offload hooks are
installed: loading LoRAs into an offloaded pipeline misreads the hooks (diffusers #10914).

The VAE stays in ``precision.vae_dtype`` (fp32 by default; a model config may set its own ``vae_dtype``): encoding
images in half precision is a known NaN source, and inversion starts from that latent. Latent trajectories are kept
in fp32 by the editors; only the networks run in the compute dtype. The SD3 and FLUX model configs make bf16 their
default ``precision``; the command line still chooses.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from editlab.models.components import DTYPES, Components, ModelLoadError, resolve_device
from editlab.models.families import Family, family_of, local_arch
from editlab.models.families.sd import sd_scheduler  # noqa: F401 - the SD schedule, imported from here by callers
from editlab.models.hub import hub_kwargs, local_or_hub
from editlab.models.safe_load import safe_loading

log = logging.getLogger(__name__)

LORA_ADAPTER = "lora"  # adapter name of ``model.lora``


def _build_local(family: Family, model: Mapping[str, Any]) -> dict[str, Any]:
    archs, arch = family.local_builds(model["kind"]), local_arch(model)
    if arch not in archs:
        raise ModelLoadError(f"unknown model.arch={arch!r} for model.kind={model['kind']} of family "
                             f"{family.name}; known: {sorted(archs)}")
    off = family.modules.keys() - family.modules_of(model).keys()  # built, then switched off by the config
    return {name: module for name, module in archs[arch](model.get("seed", 0)).items() if name not in off}


# --------------------------------------------------------------------------------------------------------------------
# Pretrained weights


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


def _load_pretrained(family: Family, model: Mapping[str, Any], dtype: torch.dtype, vae_dtype: torch.dtype
                     ) -> tuple[dict[str, Any], Any]:
    path = local_or_hub(model["path"], "model.path")
    variant = {"variant": model["variant"]} if model.get("variant") else {}

    def load(name: str, cls: type, source: str, key: str, subfolder: str | None) -> Any:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        if issubclass(cls, torch.nn.Module):
            kwargs["dtype"] = vae_dtype if name == "vae" else dtype
        if name == family.denoiser:
            kwargs.update(variant)
        kwargs.update(hub_kwargs(source, key))  # outside _load_errors: an unreachable hub is its own clear error
        with _load_errors(key, source):
            return cls.from_pretrained(source, **kwargs)

    modules: dict[str, Any] = {}
    for name, cls in family.modules_of(model).items():
        key = family.standalone.get(name)
        if key and model.get(key):  # e.g. latent-consistency/lcm-ssd-1b, madebyollin/sdxl-vae-fp16-fix
            modules[name] = load(name, cls, local_or_hub(model[key], f"model.{key}"), f"model.{key}", None)
        else:
            modules[name] = load(name, cls, path, "model.path", name)
    hub = hub_kwargs(path, "model.path")
    with _load_errors("model.path", path):
        config = DDIMScheduler.load_config(  # any scheduler class reads scheduler_config.json
            path, subfolder="scheduler", **hub)
    return modules, family.scheduler(config)


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
    if kind not in ("pretrained", "tiny", "random_arch"):
        raise ModelLoadError(f"unknown model.kind={kind!r}; expected pretrained, tiny or random_arch")
    family = family_of(model)
    if kind == "pretrained":
        modules, scheduler = _load_pretrained(family, model, dtype, vae_dtype)
    else:
        modules, scheduler = _build_local(family, model), family.scheduler()
    if model.get("scheduler"):  # scheduler config keys the model sets (a step-distilled LoRA's schedule)
        scheduler = type(scheduler).from_config({**scheduler.config, **model["scheduler"]})
    family.check(model, modules, scheduler, vae_dtype)
    vae = modules["vae"]
    for module in modules.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
            target = vae_dtype if module is vae else dtype
            if any(p.dtype != target for p in module.parameters()):  # loaded in it already: no cast (and no warning)
                module.to(dtype=target)
    if precision.get("channels_last"):
        to_channels_last(modules[family.denoiser], vae, modules.get("controlnet"))
    family.prepare(modules)

    components = Components(
        name=model["name"], family=family, modules=modules, scheduler=scheduler, device=device_, dtype=dtype,
        vae_dtype=vae_dtype, resolution=int(model["resolution"]),
        offload=_offload_mode(offload.get("mode", "none"), device_),
        force_zeros_for_empty_prompt=family.force_zeros_for_empty_prompt(model), options=family.options(model),
    )
    pipe = family.pipeline(components)
    if pipe is None:  # a family without a diffusers pipeline: no LoRA loader, no offload hooks
        if model.get("lora") or components.offload != "none":
            raise ModelLoadError(f"model.family={family.name} has no diffusers pipeline: model.lora and offload "
                                 "need one")
        for module in modules.values():
            if isinstance(module, torch.nn.Module):
                module.to(device_)
        return components
    _load_lora(pipe, model)  # before any offload hook exists (diffusers #10914: LoRA loading misreads the hooks)
    # the ControlNet of random-weight SDXL models is placed by the editor using it
    return components if attach_pipeline(components, pipe) is None else replace(components, pipeline=pipe)


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


def attach_pipeline(components: Components, pipe: DiffusionPipeline) -> DiffusionPipeline | None:
    """Run ``pipe`` (a pipeline over the loaded modules, plus any an editor adds, e.g. a ControlNet) on the device;
    returns ``pipe`` when it now owns offload hooks (keep it alive as long as the modules are used), else None.

    Without offload its modules are moved there. With offload, diffusers' hooks are re-installed on ``pipe``: that
    offloads the modules only it holds too, and lets its ``__call__`` put every model back when it ends. The hooks also
    fire when the modules are called directly, so `Components` helpers keep working. Its own progress bar is off:
    it runs inside the harness's.
    """
    pipe.set_progress_bar_config(disable=True)
    if components.offload == "none":
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(components.device)
        return None
    if components.offload == "model":
        pipe.enable_model_cpu_offload(device=components.device)
    else:
        pipe.enable_sequential_cpu_offload(device=components.device)
    return pipe
