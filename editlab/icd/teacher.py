"""The teacher interface eps(x, t, c, w) (w in code units), with two backends, and the CFG-distilled UNet.

- ``embedded``: a CFG-distilled UNet that takes w through ``time_cond_proj_dim = 512`` (the released
  ``sd15_cfg_distill.pt`` / ``sdxl_cfg_distill.pt``). One UNet pass per evaluation, any mix of w per row.
- ``cfg``: any plain SD UNet with two-pass classifier-free guidance, eps_c + w (eps_c - eps_u). Rows with w = 0
  need no unconditional pass, and a batch that is unguided throughout costs a single pass.

`GuidedUNet` evaluates whatever adapter state the UNet is in, so the same object serves the teacher (adapters
disabled) and both LoRA students (one adapter active): the students see w exactly as the teacher does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from editlab.icd.guidance import guidance_embedding

log = logging.getLogger(__name__)

GUIDANCE_MODES = ("embedded", "cfg")


def guidance_mode(unet: UNet2DConditionModel) -> str:
    """``embedded`` when the UNet has a w-embedding (time_cond_proj_dim), else ``cfg``."""
    return "embedded" if unet.config.get("time_cond_proj_dim") else "cfg"


class GuidedUNet:
    """eps(x, t, text, w) for fp32 latents; returns fp32.

    ``uncond`` [1, 77, D] is the empty-prompt embedding (needed by the ``cfg`` backend only), ``uncond_added`` its
    SDXL micro-conditioning (``text_embeds`` [1, P], ``time_ids`` [1, 6]). ``dtype`` is the dtype the UNet inputs
    are cast to (None: leave them, e.g. under autocast).
    """

    def __init__(self, unet: UNet2DConditionModel, mode: str | None = None, uncond: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, uncond_added: dict[str, torch.Tensor] | None = None):
        self.unet = unet
        self.mode = mode or guidance_mode(unet)
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance mode {self.mode!r}; expected one of {GUIDANCE_MODES}")
        if self.mode == "embedded" and not unet.config.get("time_cond_proj_dim"):
            raise ValueError("guidance mode 'embedded' needs a UNet with time_cond_proj_dim (a CFG-distilled teacher)")
        if self.mode == "cfg" and uncond is None:
            raise ValueError("guidance mode 'cfg' needs the empty-prompt embedding (uncond)")
        self.uncond, self.uncond_added = uncond, uncond_added
        self.dtype = dtype

    def needs_uncond(self, w: torch.Tensor) -> bool:
        """Whether a call with these w runs the unconditional rows too (cfg backend, some row guided)."""
        return self.mode == "cfg" and bool((w != 0).any())

    def _unet(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.dtype is not None:
            x, text = x.to(self.dtype), text.to(self.dtype)
        return self.unet(x, t, encoder_hidden_states=text, **kwargs).sample.float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int, text: torch.Tensor, w: torch.Tensor,
                 added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, C, h, w], t int or [B], text [B, 77, D], w [B], added (SDXL) per-row tensors -> eps [B, C, h, w]."""
        t = torch.as_tensor(t, device=x.device)
        kwargs = {} if added is None else {"added_cond_kwargs": added}
        if self.mode == "embedded":
            proj = self.unet.time_embedding.cond_proj
            emb = guidance_embedding(w.to(x.device), proj.in_features, self.dtype or proj.weight.dtype)
            return self._unet(x, t, text, timestep_cond=emb, **kwargs)
        if not self.needs_uncond(w):
            return self._unet(x, t, text, **kwargs)
        t2 = t.repeat(2) if t.ndim else t
        rows = x.shape[0]
        uncond = self.uncond.to(text.dtype).expand(rows, -1, -1)
        if added is not None:  # rows [uncond x B, cond x B], as the text
            kwargs = {"added_cond_kwargs": {k: torch.cat([self.uncond_added[k].expand(rows, *v.shape[1:]).to(v), v])
                                            for k, v in added.items()}}
        eps_u, eps_c = self._unet(torch.cat([x, x]), t2, torch.cat([uncond, text]), **kwargs).chunk(2)
        w = w.to(x.device, eps_c.dtype).view(-1, *([1] * (x.ndim - 1)))
        return eps_c + w * (eps_c - eps_u)


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
    # private keys (e.g. _use_default_values) would make from_config ignore the new value
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")} | {"time_cond_proj_dim": dim}
    with init_empty_weights():  # no second full-size copy: weights are assigned, not allocated
        embedded = UNet2DConditionModel.from_config(config)
    param = next(unet.parameters())
    if state_dict is None:
        missing, unexpected = embedded.load_state_dict(unet.state_dict(), strict=False, assign=True)
        if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
            raise RuntimeError(f"unexpected UNet layout: missing {missing}, unexpected {unexpected}")
        proj = embedded.time_embedding.cond_proj
        embedded.time_embedding.cond_proj = torch.nn.Linear(proj.in_features, proj.out_features, bias=False)
        if init == "zeros":
            torch.nn.init.zeros_(embedded.time_embedding.cond_proj.weight)
        else:
            log.warning("w-embedding (cond_proj %d->%d) initialised randomly: a test teacher, not a CFG-distilled "
                        "one", proj.in_features, proj.out_features)
    else:
        result = embedded.load_state_dict(state_dict, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(
                f"the CFG-distilled state dict does not fit this UNet (time_cond_proj_dim={dim}): "
                f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
            )
    embedded.set_attn_processor(unet.attn_processors)
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
