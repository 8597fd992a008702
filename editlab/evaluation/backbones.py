"""The learned backbones the metric sets share, loaded in one place: hub ids or local paths (`weights_path`), CLIP
(`ClipScorer`, `load_clip`, `load_clip_vision`), which kind of backbone a section names and where it loads from
(`backbone_path`), what a backbone that cannot be had does (`try_load`: stop, or NaN with a
warning) and what one that gives a non-finite score does (`BackboneScores`: NaN, and a note on the row)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from editlab.models.hub import hub_kwargs, is_local, resolve_local
from editlab.models.safe_load import UnsafeWeightsError

log = logging.getLogger(__name__)

CLIP_PATH = "openai/clip-vit-large-patch14"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HF_HINT = ("pre-populate HF_HOME on a machine with network access (offline, HF_HUB_OFFLINE=1 skips the slow retries), "
           "or set {} to a local model directory").format
OFF = (None, "none", "null")


def check_on_missing(cfg: Mapping) -> str:
    on_missing = cfg.get("on_missing", "error")
    if on_missing not in ("error", "warn"):
        raise ValueError(f"on_missing must be 'error' or 'warn', got {on_missing!r}")
    return on_missing


def backbone_path(section: Mapping, kind: str, defaults: Mapping[str, str | None], what: str) -> str | None:
    """Where a config section's ``kind`` of backbone loads from: the section's ``path``, else that kind's default in
    ``defaults``, whose keys are the kinds there are (another kind is a ValueError naming them)."""
    if kind not in defaults:
        raise ValueError(f"unknown {what} backbone {kind!r}; use {', '.join(map(repr, defaults))} or None")
    return section.get("path") or defaults[kind]


def weights_path(path: str) -> str:
    """Hub ids pass through; local paths may be relative to the repository (shipped toy backbones)."""
    return str(resolve_local(path)) if is_local(path) else path


def load_clip_vision(path: str, key: str) -> torch.nn.Module:
    """The float32 vision tower of a whole (CLIPModel) or vision-only (CLIPVisionModel) CLIP checkpoint. Loading the
    model the weights hold and keeping its tower leaves transformers no unexpected keys (the text tower) to report."""
    from transformers import AutoModel

    path = weights_path(path)
    return AutoModel.from_pretrained(path, dtype=torch.float32, **hub_kwargs(path, key)).vision_model


def try_load(metric: str, source: str, hint: str, loader: Callable[[], Any], on_missing: str,
             on_missing_name: str) -> Any:
    """``loader()``, or with ``on_missing`` warn None (the metric is NaN, the warning says how to fix it): a
    refused weights file always stops."""
    try:
        return loader()
    except UnsafeWeightsError as err:  # never a missing backbone: a file was refused, whatever on_missing says
        raise RuntimeError(f"cannot load the backbone of {metric} from {source}: {err}") from None
    except Exception as err:  # offline hub/torchvision downloads fail with many exception types
        message = f"cannot load the backbone of {metric} from {source}: {type(err).__name__}: {err}. To fix: {hint}"
        if on_missing == "error":
            raise RuntimeError(f"{message}, or set {on_missing_name}=warn to score without it (NaN).") from err
        log.warning("%s is unavailable, its values will be NaN. %s.", metric, message)
        return None


def load_clip(path: str, metric: str, device: str | torch.device, key: str, on_missing: str,
              on_missing_name: str) -> ClipScorer | None:
    """`try_load` of the CLIP scorer at ``path`` (a hub id or a local folder) for ``metric``; ``key`` names the path's
    setting in the messages."""
    return try_load(metric, repr(path), HF_HINT(key),
                    lambda: ClipScorer.from_pretrained(weights_path(path), device, key), on_missing, on_missing_name)


def processed(image: np.ndarray, processor: Callable, model: torch.nn.Module) -> torch.Tensor:
    """A uint8 HWC image as ``processor`` (a transformers image processor) prepares it for ``model``, on the model's
    device and in its dtype: [1, 3, H, W]."""
    param = next(model.parameters())
    pixels = processor(images=[Image.fromarray(np.asarray(image))], return_tensors="pt")["pixel_values"]
    return pixels.to(param.device, param.dtype)


def _embedding(out: Any) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling from get_{image,text}_features, with the projected
    # embedding in `pooler_output`; 4.x returned the tensor itself
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIPModel + tokenizer + image processor, computing what torchmetrics' CLIPScore computes for one image."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, processor: Callable) -> None:
        self.model, self.tokenizer, self.processor = model.eval(), tokenizer, processor
        # The reference (torchmetrics CLIPScore) refused or truncated prompts over 77 tokens depending on the
        # version; we always truncate to the text encoder's length so long prompts score instead of failing.
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", key: str = "clip.path") -> ClipScorer:
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        # the PIL backend, not transformers 5's default torchvision one: the reference's (4.x) processor resized
        # with PIL bicubic
        hub = hub_kwargs(path, key)
        processor = CLIPImageProcessorPil.from_pretrained(path, **hub)
        # float32 whatever the stored dtype (the toy CLIP ships in float16): scores must not depend on storage
        model = CLIPModel.from_pretrained(path, dtype=torch.float32, **hub)
        return cls(model.to(device), AutoTokenizer.from_pretrained(path, **hub), processor)

    @torch.no_grad()
    def image_embeds(self, image: np.ndarray) -> torch.Tensor:
        return _embedding(self.model.get_image_features(pixel_values=processed(image, self.processor, self.model)))[0]

    @torch.no_grad()
    def text_embeds(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([prompt], truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        return _embedding(self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))[0]


class BackboneScores:
    """Calls a backbone-based metric; a NaN or inf score (a network that overflowed, say) becomes NaN and is recorded
    in ``failures`` as ``{metric: why}``, so the row can say which metric failed rather than leave a silent gap."""

    def __init__(self, failures: dict[str, str] | None) -> None:
        self.failures = {} if failures is None else failures

    def __call__(self, key: str, score: Callable[[], float]) -> float:
        value = float(score())
        if math.isfinite(value):
            return value
        self.failures[key] = f"its backbone gave {value}"
        return math.nan


def failure_notes(failures: Mapping[str, str]) -> list[str]:
    """A row's note for each metric that `BackboneScores` recorded as failed (`evaluation.summary` counts them)."""
    return [f"{key} failed ({why}): left out of its mean" for key, why in failures.items()]
