"""The forward and reverse iCD students as two LoRA adapters on one base UNet, and their files.

One UNet holds the teacher's weights and two adapters: ``icd_fwd`` (the forward model fCD, image -> noise) and
``icd_rev`` (the reverse model CD, noise -> image). Disabling the adapters gives the teacher, so training needs no
second or third UNet copy. Both adapters start with B = 0, i.e. equal to the teacher.

peft pitfalls handled here:
- the adapter name "forward" collides with ``nn.Module.forward`` in peft's ModuleDicts: the names are
  ``icd_fwd`` / ``icd_rev``;
- ``set_adapter`` / disabling adapters switch ``requires_grad`` off on the inactive adapter, so a graph built
  through adapter A would give A no gradient once B is activated: `AdapterSwitch` never touches
  ``requires_grad`` when switching, and parameters are selected by name, never by requires_grad.

Files. ``style="diffusers"`` (our exports): keys ``unet.<module>.lora_A.weight`` with the LoraConfig (rank,
alpha) as safetensors metadata, which diffusers' ``load_lora_weights`` reads. ``style="released"``: the released
iCD files' peft-style keys ``unet.base_model.model.<module>.lora_A.weight`` (alpha 8 implied). `load_adapter`
reads both.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

FORWARD = "icd_fwd"
REVERSE = "icd_rev"
ADAPTERS = (FORWARD, REVERSE)

# The 14 module kinds the reference (and LCM-LoRA) adapt; conv_in/out, time_embedding (incl. the w-embedding's
# cond_proj), norms and SDXL's add_embedding stay the teacher's.
TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
RELEASED_PREFIX = "unet.base_model.model."
DIFFUSERS_PREFIX = "unet."
RELEASED_ALPHA = 8  # the reference loader hard-codes alpha = 8 (peft 0.8's default) for the released files
_METADATA_KEY = "lora_adapter_metadata"


def lora_config(rank: int = 64, alpha: float = 8, target_modules: Sequence[str] = TARGET_MODULES) -> LoraConfig:
    """B = 0 init (student == teacher at step 0), no dropout; scale alpha / rank (8 / 64 as released)."""
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                      target_modules=list(target_modules))


def add_icd_adapters(unet: UNet2DConditionModel, rank: int = 64, alpha: float = 8,
                     target_modules: Sequence[str] = TARGET_MODULES) -> None:
    """Add ``icd_fwd`` and ``icd_rev``, both equal to the teacher (independent weights, same init)."""
    for name in ADAPTERS:
        add_named_adapter(unet, lora_config(rank, alpha, target_modules), name)


def add_named_adapter(unet: UNet2DConditionModel, config: LoraConfig, name: str) -> None:
    """``unet.add_adapter`` without peft's warning about a second adapter (that is the point here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(config, adapter_name=name)


def lora_parameters(unet: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of one adapter, selected by name (requires_grad is not reliable, see module doc)."""
    return [p for n, p in unet.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n]


def adapted_module_names(unet: torch.nn.Module) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]


def adapted_layers(unet: torch.nn.Module) -> list[BaseTunerLayer]:
    """The LoRA-wrapped layers of ``unet``; a UNet without adapters is an error."""
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the UNet carries no LoRA adapters; call add_icd_adapters or load_adapter first")
    return layers


class AdapterSwitch:
    """Activates one adapter (a student) or none (the teacher) on a UNet carrying both.

    Switching sets exactly the two fields peft's LoRA forward reads (active adapter, disabled flag) on every
    adapted layer and leaves ``requires_grad`` alone: peft's own ``set_adapter`` / ``enable_adapters`` would flip
    it off on the inactive adapter (the pitfall above) and walk every parameter (milliseconds per switch on SD,
    a dozen switches per training step). ``trainable`` sets ``requires_grad`` on all LoRA parameters once.
    """

    def __init__(self, unet: torch.nn.Module, trainable: bool = False):
        self.layers = adapted_layers(unet)
        if not all(hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters") for m in self.layers):
            raise RuntimeError("this peft version keeps the adapter state elsewhere; update icd.lora.AdapterSwitch")
        for name in ADAPTERS:
            for p in lora_parameters(unet, name):
                p.requires_grad_(trainable)
        for m in self.layers:  # after a FusedAdapterSwitch: back to the teacher's weights under the LoRA branch
            if hasattr(m, "_icd_teacher_weight"):
                m.get_base_layer().weight.data = m._icd_teacher_weight
        self.active: str | None = None
        self.activate(REVERSE)

    def activate(self, adapter: str | None) -> None:
        """``icd_fwd`` / ``icd_rev`` / None (adapters disabled: the teacher)."""
        for layer in self.layers:
            layer._disable_adapters = adapter is None
            if adapter is not None:
                layer._active_adapter = [adapter]
        self.active = adapter


class FusedAdapterSwitch(AdapterSwitch):
    """Inference-only `AdapterSwitch` that runs each student as plain merged weights: every adapted layer keeps
    W + delta_fwd and W + delta_rev precomputed, and switching swaps the base layer's weight tensor (no copy, no
    kernel), with the LoRA branch disabled. Per UNet call this saves the two extra matmuls (or convolutions) of every
    adapted layer; it costs two extra copies of the adapted weights in memory (SD1.5 in half precision: +3.2 GB).
    Merging is done once, in float32, so repeated switching never drifts the weights (peft's merge / unmerge per
    phase would). The adapters' own weights must not change afterwards: build a new switch if they do.
    """

    def __init__(self, unet: torch.nn.Module):
        self.layers = adapted_layers(unet)
        for m in self.layers:  # the teacher's weight, kept on the layer so that a second switch finds it too
            if not hasattr(m, "_icd_teacher_weight"):
                m._icd_teacher_weight = m.get_base_layer().weight.data
        self.weights: dict[str | None, list[torch.Tensor]] = {None: [m._icd_teacher_weight for m in self.layers]}
        with torch.no_grad():
            for name in ADAPTERS:
                self.weights[name] = [
                    (base.float() + layer.get_delta_weight(name).float()).to(base.dtype)
                    if name in layer.lora_A else base
                    for layer, base in zip(self.layers, self.weights[None])
                ]
        self.active = None
        self.activate(REVERSE)

    def activate(self, adapter: str | None) -> None:
        for layer, weight in zip(self.layers, self.weights[adapter]):
            layer.get_base_layer().weight.data = weight
            layer._disable_adapters = True
        self.active = adapter


# -- files ------------------------------------------------------------------------------------------------------------
def adapter_state_dict(unet: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """peft-format weights of one adapter, keys ``<module>.lora_A.weight`` (adapter name removed)."""
    return get_peft_model_state_dict(unet, adapter_name=adapter)


def save_adapter(unet: UNet2DConditionModel, adapter: str, path: str | Path, style: str = "diffusers",
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write one adapter to ``path`` (a .safetensors file) in ``dtype`` (loading casts to the UNet's dtype); see the
    module doc for the two styles."""
    path = Path(path)
    weights = {k: v.detach().to(dtype).cpu().contiguous() for k, v in adapter_state_dict(unet, adapter).items()}
    config = unet.peft_config[adapter].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    if style == "diffusers":
        StableDiffusionPipeline.save_lora_weights(
            path.parent, unet_lora_layers=weights, weight_name=path.name, unet_lora_adapter_metadata=config,
        )
    elif style == "released":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({RELEASED_PREFIX + k: v for k, v in weights.items()}, path,
                  metadata={"format": "pt", _METADATA_KEY: json.dumps(config)})
    else:
        raise ValueError(f"unknown LoRA file style {style!r}; expected diffusers or released")
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft-format weights with the ``unet.`` / ``unet.base_model.model.`` prefixes removed, LoraConfig dict)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}
    for prefix in (RELEASED_PREFIX, DIFFUSERS_PREFIX, "base_model.model."):
        if all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
            break
    if not weights or not all(".lora_A." in k or ".lora_B." in k for k in weights):
        raise ValueError(f"{path}: not a peft-style UNet LoRA file (expected keys '<module>.lora_A.weight')")
    config = json.loads(metadata[_METADATA_KEY]) if _METADATA_KEY in metadata else {}
    config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in config.items()}  # diffusers prefixes "unet."
    return weights, config


def load_adapter(unet: UNet2DConditionModel, adapter: str, path: str | Path, alpha: float | None = None) -> None:
    """Add ``adapter`` to ``unet`` with the weights of a LoRA file (released or ours); rank and targets come from
    the file, alpha from its metadata, else ``alpha``, else the released files' 8."""
    weights, config = read_adapter_file(path)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    ranks = {v.shape[0] for k, v in weights.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"{path}: mixed LoRA ranks {sorted(ranks)} are not supported")
    alpha = config.get("lora_alpha", alpha if alpha is not None else RELEASED_ALPHA)
    if adapter in getattr(unet, "peft_config", {}):
        unet.delete_adapters(adapter)
    add_named_adapter(unet, lora_config(ranks.pop(), alpha, modules), adapter)
    result = set_peft_model_state_dict(unet, weights, adapter_name=adapter)
    expected = set(adapter_state_dict(unet, adapter))
    if result.unexpected_keys or expected != set(weights):
        raise ValueError(f"{path}: LoRA keys do not match this UNet "
                         f"({len(expected - set(weights))} missing, {len(set(weights) - expected)} unexpected)")
    log.info("loaded LoRA %s from %s (rank %d, alpha %s, %d modules)", adapter, path, unet.peft_config[adapter].r,
             alpha, len(modules))


def attach_adapters(unet: UNet2DConditionModel, forward_path: str | Path | None = None,
                    reverse_path: str | Path | None = None, rank: int = 64, alpha: float = 8) -> list[str]:
    """Give ``unet`` both adapters, from files where given, else freshly initialised (== the teacher).

    Replaces adapters of the same names already on the UNet. Returns the names of the untrained ones.
    """
    untrained = []
    for name, path in ((FORWARD, forward_path), (REVERSE, reverse_path)):
        if path:
            load_adapter(unet, name, path)
            continue
        if name in getattr(unet, "peft_config", {}):
            unet.delete_adapters(name)
        add_named_adapter(unet, lora_config(rank, alpha), name)
        untrained.append(name)
    return untrained
