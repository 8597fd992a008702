"""The CFG-distilled teacher: a UNet with a w input (``time_cond_proj_dim = 512``, the released
``sd15_cfg_distill.pt`` / ``sdxl_cfg_distill.pt``), its checkpoint files and its trained w range.

Its guided prediction is `models.guidance.unet_guidance` (``embedded``: one pass for any mix of w per row; a plain
UNet gets two-pass ``cfg``). That object evaluates whatever adapter state the UNet is in, so the same object serves
the teacher (adapters disabled) and both LoRA students (one adapter active): the students see w as the teacher does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from editlab.models.copies import rebuilt

log = logging.getLogger(__name__)


def add_guidance_embedding(unet: UNet2DConditionModel, dim: int = 512,
                           state_dict: dict[str, torch.Tensor] | None = None,
                           init: str = "random") -> UNet2DConditionModel:
    """The same UNet with a w-embedding input (``time_cond_proj_dim = dim``), sharing the existing weights.

    With ``state_dict`` (a CFG-distilled checkpoint) every weight is taken from it, strictly. Without, the new
    bias-free ``cond_proj`` is ``init``: ``random`` (diffusers' init: a usable test teacher, not a distilled one) or
    ``zeros`` (a guidance-distillation student: it starts equal to the conditional prediction at every w).
    """
    if init not in ("random", "zeros"):
        raise ValueError(f"unknown w-embedding init {init!r}; expected random or zeros")
    param = next(unet.parameters())
    embedded, result = rebuilt(unet, state_dict, time_cond_proj_dim=dim)
    if state_dict is None:
        if result.unexpected_keys or set(result.missing_keys) != {"time_embedding.cond_proj.weight"}:
            raise RuntimeError(f"unexpected UNet layout: missing {result.missing_keys}, unexpected "
                               f"{result.unexpected_keys}")
        proj = embedded.time_embedding.cond_proj
        embedded.time_embedding.cond_proj = torch.nn.Linear(proj.in_features, proj.out_features, bias=False)
        if init == "zeros":
            torch.nn.init.zeros_(embedded.time_embedding.cond_proj.weight)
        else:
            log.warning("w-embedding (cond_proj %d->%d) initialised randomly: a test teacher, not a CFG-distilled "
                        "one", proj.in_features, proj.out_features)
    elif result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"the CFG-distilled state dict does not fit this UNet (time_cond_proj_dim={dim}): "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
    embedded.to(param.device)
    if param.dtype != torch.float32:
        embedded.to(param.dtype)
    return embedded.eval().requires_grad_(False)


def read_unet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A UNet state dict from ``.pt`` / ``.bin`` / ``.safetensors``; unwraps {"state_dict": ...} and strips
    ``module.`` / ``unet.`` prefixes (DDP / pipeline saves)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {str(path)!r} does not exist; set teacher.checkpoint to the "
                                "downloaded sd15_cfg_distill.pt / sdxl_cfg_distill.pt")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "unet"):
        if isinstance(state.get(key), dict):
            state = state[key]
    for prefix in ("module.", "unet."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_cfg_distilled(unet: UNet2DConditionModel, checkpoint: str | Path, dim: int = 512) -> UNet2DConditionModel:
    """The CFG-distilled teacher: ``unet``'s architecture plus the w-embedding, all weights from ``checkpoint``;
    ``trained_w_range`` on it is the (low, high) w our exports record (None for the released files)."""
    log.info("loading the CFG-distilled teacher from %s", checkpoint)
    teacher = add_guidance_embedding(unet, dim, read_unet_state_dict(checkpoint))
    teacher.trained_w_range = distilled_w_range(checkpoint)
    return teacher


def distilled_w_range(checkpoint: str | Path) -> tuple[float, float] | None:
    """The w range (code units) a teacher exported by guidance distillation was trained on, from its metadata."""
    if Path(checkpoint).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        value = (f.metadata() or {}).get("w_range")
    return tuple(float(v) for v in value.split(",")) if value else None


def warn_outside_w_range(unet: UNet2DConditionModel, scales, key: str) -> None:
    """A warning when a w of ``scales`` (code units) lies above the range the teacher was distilled on."""
    w_range = getattr(unet, "trained_w_range", None)
    beyond = [float(w) for w in scales if w_range and float(w) > w_range[1] + 1e-6]
    if beyond:
        log.warning("%s asks the distilled teacher for w = %s, beyond the range it was trained on (%g..%g code "
                    "units): its single pass extrapolates there", key, ", ".join(f"{w:g}" for w in beyond), *w_range)
