"""Networks an editor or trainer owns: a new module of a loaded network's architecture over its weights.

An editor that needs another denoiser (iCD's adapters, a guidance-distilled teacher, Null-Text Inversion's fp32
UNet) builds one of these instead of patching the shared model: adapters, attention processors and casts applied
to the copy never reach the original, and where dtype and device are the same the copy shares the weights' storage
(no second copy in memory).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import init_empty_weights


def rebuilt(module, state_dict: dict[str, torch.Tensor] | None = None, **config_changes: Any):
    """A new module of ``module``'s class and config (with ``config_changes``), its weights assigned (not copied)
    from ``state_dict``, by default ``module``'s own. Returns (module, the load result: missing / unexpected keys)."""
    # private keys (e.g. _use_default_values) would make from_config ignore a changed value
    config = {k: v for k, v in module.config.items() if not k.startswith("_")} | config_changes
    with init_empty_weights():  # no allocation: every weight is assigned below
        new = type(module).from_config(config)
    result = new.load_state_dict(module.state_dict() if state_dict is None else state_dict, strict=False,
                                 assign=True)
    if hasattr(module, "attn_processors"):
        new.set_attn_processor(module.attn_processors)
    return new, result


def own_copy(module, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """``module`` as a frozen network of the caller's own, in ``dtype`` on ``device`` (None: as it is)."""
    if any(p.device.type == "meta" for p in module.parameters()):
        raise ValueError(f"{type(module).__name__} keeps its weights in offload hooks (offload=sequential), so it "
                         "cannot be copied; use offload=model or none")
    new, result = rebuilt(module)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"copying {type(module).__name__}: missing {result.missing_keys[:3]}, unexpected "
                           f"{result.unexpected_keys[:3]}")
    return new.to(device=device, dtype=dtype).eval().requires_grad_(False)
