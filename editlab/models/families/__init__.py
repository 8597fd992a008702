"""Model families: one file each, the only place that knows what a family's networks are and how they are called.

A `Family` owns its modules and how they load (the diffusers layout of a pretrained folder, the modules a config may
take from a folder of their own, tiny and full-size random builds), its noise schedule and prediction type, prompt
encoding into a `Conditioning`, its denoiser call, the diffusers pipeline over its modules (LoRA loading, offload),
and where its attention sites are. ``model.family`` picks the file (a tiny or random model's ``arch`` names its
family); `models.loading` and `models.components.Components` call the family and nothing else, so adding a family is
one file here that calls `register`, plus a model config.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from editlab.diffusion.schedules import VPSchedule
from editlab.models.conditioning import Conditioning
from editlab.models.errors import ModelLoadError
from editlab.models.guidance import Guidance

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from editlab.models.components import Components


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a denoiser: its processor name, whether its keys are text tokens (``cross``) or the
    image itself, and the side of the latent grid its queries cover."""

    name: str
    cross: bool
    side: int


class Family:
    """The SD-shaped defaults; a family overrides what differs. Methods take the loaded model (`Components`)."""

    name: str = ""
    modules: dict[str, type] = {}  # pretrained layout: module name = subfolder -> class
    optional: tuple[str, ...] = ()  # modules a model of the family may lack (None then)
    standalone: dict[str, str] = {"unet": "unet_path", "vae": "vae_path"}  # module -> config key of its own folder
    denoiser: str = "unet"  # the network a sampling step evaluates
    tiny_archs: dict[str, Callable[[int], dict[str, Any]]] = {}  # model.arch of kind tiny -> builder(seed)
    random_archs: dict[str, Callable[[int], dict[str, Any]]] = {}  # model.arch of kind random_arch -> builder(seed)
    prediction_type: str = "epsilon"
    generic_editors: bool = True  # editors written for any family (``Editor.families`` None) run on its models

    def scheduler(self, config: Mapping[str, Any] | None = None) -> Any:
        """The family's diffusers scheduler (its schedule's source), from a checkpoint's scheduler config or, for
        local builds (None), the family's default."""
        raise NotImplementedError

    def modules_of(self, model: Mapping[str, Any]) -> dict[str, type]:
        """The modules ``model`` loads: all of ``modules`` unless its config switches some off (SD3's ``t5``); the
        others are None on the loaded model."""
        return self.modules

    def options(self, model: Mapping[str, Any]) -> dict[str, Any]:
        """The settings of ``model``'s config the family reads at run time (`Components.options`)."""
        return {}

    def check(self, model: Mapping[str, Any], modules: Mapping[str, Any], scheduler: Any,
              vae_dtype: torch.dtype) -> None:
        """Refuse a loaded set of modules this family's code would run wrongly (raise `ModelLoadError`)."""

    def prepare(self, modules: Mapping[str, Any]) -> None:
        """Once after loading: e.g. the attention processors every editor starts from."""

    def force_zeros_for_empty_prompt(self, model: Mapping[str, Any]) -> bool:
        """Whether CFG's unconditional branch is zeros rather than the encoded empty prompt."""
        return False

    def schedule(self, m: Components) -> Any:
        """The noise schedule the samplers walk (`diffusion.schedules`), on the device."""
        return VPSchedule(m.alphas_cumprod.to(m.device))

    def local_builds(self, kind: str) -> dict[str, Callable[[int], dict[str, Any]]]:
        """The builders of a ``tiny`` or ``random_arch`` model, by ``model.arch``."""
        return self.tiny_archs if kind == "tiny" else self.random_archs

    def check_prompt(self, m: Components, prompt: str) -> None:
        raise NotImplementedError

    def encode(self, m: Components, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def predict(self, m: Components, x: torch.Tensor, t: Any, cond: torch.Tensor | Conditioning,
                **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def guidance_kind(self, m: Components) -> str:
        """How the family's models are guided by default (`models.guidance.KINDS`): two-pass CFG."""
        return "cfg"

    def guidance(self, m: Components, uncond: Conditioning | None = None) -> Guidance:
        """The model's default guided prediction, classic units; ``cfg`` against ``uncond`` (default: the model's
        unconditional branch)."""
        kind = self.guidance_kind(m)
        if kind == "cfg" and uncond is None:
            uncond = m.unconditional()
        return Guidance(m.predict, kind, "classic", uncond)

    def latent_channels(self, m: Components) -> int:
        return m.vae.config.latent_channels

    def vae_scale_factor(self, vae: Any) -> int:
        """Pixels per latent along a side: the VAE's downsamplings."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def pipeline(self, m: Components) -> DiffusionPipeline | None:
        """A diffusers pipeline over the loaded modules (LoRA loading, offload hooks); None: the family has none."""
        return None

    def attention_sites(self, m: Components) -> list[AttentionSite]:
        return []


def diffusers_class(name: str, since: str) -> type:
    """diffusers' class ``name`` (first released in diffusers ``since``), looked up when a model or an editor needs
    it, so an older diffusers fails there, with what to install, and not on import."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(f"{name} is not in the installed diffusers {diffusers.__version__}; it needs diffusers "
                             f">= {since}: pip install -U 'diffusers>={since}'")
    return cls


FAMILIES: dict[str, Family] = {}


def register(family: type[Family]) -> type[Family]:
    FAMILIES[family.name] = family()
    return family


def _import_family_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def local_arch(model: Mapping[str, Any]) -> str | None:
    """The ``arch`` of a tiny or random model (a tiny one's default: sd)."""
    return model.get("arch") or ("sd" if model["kind"] == "tiny" else None)


def family_of(model: Mapping[str, Any]) -> Family:
    """``model.family``; for a tiny or random model without one, the family that builds its ``arch``; else sd."""
    _import_family_modules()
    name = model.get("family")
    if not name and model.get("kind") in ("tiny", "random_arch"):
        arch = local_arch(model)
        name = next((f.name for f in FAMILIES.values() if arch in f.local_builds(model["kind"])), None)
        if name is None:
            known = sorted(a for f in FAMILIES.values() for a in f.local_builds(model["kind"]))
            raise ModelLoadError(f"unknown model.arch={arch!r} for model.kind={model['kind']}; known: {known}")
    name = name or "sd"
    if name not in FAMILIES:
        raise ModelLoadError(f"unknown model.family={name!r}; expected one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
