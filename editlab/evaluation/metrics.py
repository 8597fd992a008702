"""PIE-Bench metrics, reproducing the reference evaluator's conventions (see the README's metric conventions).

Conventions that look like bugs but are what the published numbers mean:
- background ("unedit_part") metrics zero-fill the edited region of *both* images and average over the whole
  image, so they depend on the mask area; they are NaN when the background is empty (full masks, style edits);
- structure distance feeds DINO 0-255 floats, normalised with the [0, 1] ImageNet mean/std;
- CLIP scores are max(100 cos, 0); the edit-part score sees uint8(target * M) with the target prompt.

Images are uint8 HWC numpy arrays, masks (H, W) arrays of 0/1 with 1 = edited.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.transforms import Resize

from editlab.evaluation import backbones
from editlab.evaluation.backbones import CLIP_MEAN, CLIP_PATH, CLIP_STD, ClipScorer
from editlab.evaluation.piebench import strip_brackets
from editlab.evaluation.protocol import Column, Metric, Sample
from editlab.models.hub import hub_kwargs
from editlab.models.safe_load import safe_loading

DINO_PATH = "facebook/dino-vitb8"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# results.csv's columns; summary.csv prints them as the PnP-Inversion paper's tables do (the ``paper`` names, scaled)
COLUMNS = (
    Column("structure_distance", higher_is_better=False, paper="struct_x1e3", factor=1e3),
    Column("psnr_unedit_part", higher_is_better=True, paper="psnr"),
    Column("lpips_unedit_part", higher_is_better=False, paper="lpips_x1e3", factor=1e3),
    Column("mse_unedit_part", higher_is_better=False, paper="mse_x1e4", factor=1e4),
    Column("ssim_unedit_part", higher_is_better=True, paper="ssim_x1e2", factor=1e2),
    Column("clip_similarity_source_image"),  # the unedited source with its own prompt: context, not the edit's score
    Column("clip_similarity_target_image", higher_is_better=True, paper="clip_whole"),
    Column("clip_similarity_target_image_edit_part", higher_is_better=True, paper="clip_edited"),
)
CLIP_COLUMNS = COLUMNS[5:]  # the three CLIP scores (one backbone)


# ----------------------------------------------------------------------------------------------------------
# background (unedit-part) pixel metrics


def _background_pair(
    source: np.ndarray, edited: np.ndarray, mask: np.ndarray, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(edited, source) as 1x3xHxW float32 in [0, 1] with the edited region zero-filled; None if no background."""
    if source.shape != edited.shape or source.shape[:2] != mask.shape:
        raise ValueError(f"shape mismatch: source {source.shape}, edited {edited.shape}, mask {mask.shape}")
    background = (1.0 - np.asarray(mask, dtype=np.float32))[..., None]
    if background.sum() == 0:
        return None
    # same float32 order of operations as the reference: x / 255, then times the mask
    pair = [np.asarray(img).astype(np.float32) / 255 * background for img in (edited, source)]
    return tuple(torch.from_numpy(p).permute(2, 0, 1)[None].contiguous().to(device) for p in pair)


def psnr_unedit_part(
    source: np.ndarray, edited: np.ndarray, mask: np.ndarray, device: str | torch.device = "cpu"
) -> float:
    """10 log10(1 / MSE) over the whole zero-filled image; +inf for identical backgrounds."""
    pair = _background_pair(source, edited, mask, device)
    return math.nan if pair is None else peak_signal_noise_ratio(*pair, data_range=1.0).item()


def mse_unedit_part(
    source: np.ndarray, edited: np.ndarray, mask: np.ndarray, device: str | torch.device = "cpu"
) -> float:
    pair = _background_pair(source, edited, mask, device)
    return math.nan if pair is None else mean_squared_error(*pair).item()


def ssim_unedit_part(
    source: np.ndarray, edited: np.ndarray, mask: np.ndarray, device: str | torch.device = "cpu"
) -> float:
    """torchmetrics SSIM with its defaults (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03), as the reference."""
    pair = _background_pair(source, edited, mask, device)
    return math.nan if pair is None else structural_similarity_index_measure(*pair, data_range=1.0).item()


@torch.no_grad()
def lpips_unedit_part(lpips_model: torch.nn.Module, source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    """LPIPS on [-1, 1] inputs mapped *after* zero-filling, so the edited region is -1 in both images."""
    device = next(lpips_model.parameters()).device
    pair = _background_pair(source, edited, mask, device)
    return math.nan if pair is None else lpips_model(pair[0] * 2 - 1, pair[1] * 2 - 1).mean().item()


# ----------------------------------------------------------------------------------------------------------
# structure distance


class StructureBackbone(Protocol):
    image_size: int

    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """0-255 float images [B, 3, H, W] -> last-block attention keys [B, tokens, dim], CLS included."""
        ...


def _last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    # transformers 5 names the key projection `k_proj` for ViT and CLIP; older releases used `...attention.key`
    keys = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("k_proj", "key")]
    if not keys:
        raise ValueError(f"{type(model).__name__} has no attention key projection (k_proj/key) to hook")
    return keys[-1]


class KeyBackbone:
    """A ViT whose last attention block's key projection is hooked; heads stay concatenated, as in the reference,
    which reshapes DINO's fused qkv output to (tokens, 3, heads, head_dim), takes the keys and re-joins the heads."""

    def __init__(
        self, model: torch.nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.model = model.eval()
        self.image_size = image_size
        self._key_proj = _last_key_projection(model)
        # Tensor Resize antialiases by default since torchvision 0.17 (Jan 2024), not before. The published numbers
        # (2023; the reference repo pins no torchvision) were made without it, so pin antialias=False.
        self._resize = Resize(image_size, max_size=480 if image_size < 480 else None, antialias=False)
        self._mean = torch.tensor(mean).view(1, 3, 1, 1)
        self._std = torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_vit(cls, model: torch.nn.Module) -> KeyBackbone:
        """DINO through `transformers.ViTModel` (e.g. facebook/dino-vitb8), ImageNet mean/std."""
        return cls(model, model.config.image_size, IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def from_clip_vision(cls, model: torch.nn.Module) -> KeyBackbone:
        """A CLIP vision tower (`load_clip_vision`), its own input size and CLIP mean/std, still on 0-255 inputs."""
        return cls(model, model.config.image_size, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        images = images.to(device=param.device, dtype=torch.float32)
        # ImageNet/CLIP mean and std are meant for [0, 1] but, like the reference, are applied to 0-255 values
        pixels = (self._resize(images) - self._mean.to(images.device)) / self._std.to(images.device)
        captured: list[torch.Tensor] = []
        handle = self._key_proj.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self.model(pixel_values=pixels.to(param.dtype), interpolate_pos_encoding=True)
        finally:
            handle.remove()
        return captured[-1].float()


def key_self_similarity(backbone: StructureBackbone, image: np.ndarray) -> torch.Tensor:
    """Cosine self-similarity (tokens x tokens) of the concatenated-head keys of a uint8 HWC image."""
    pixels = torch.from_numpy(np.asarray(image).astype(np.float32)).permute(2, 0, 1)[None]  # 0-255, not /255
    keys = backbone.keys(pixels)[0]
    norms = keys.norm(dim=-1, keepdim=True)
    return (keys @ keys.T) / torch.clamp(norms @ norms.T, min=1e-8)


def structure_distance(backbone: StructureBackbone, source: np.ndarray, edited: np.ndarray) -> float:
    """Mean squared difference of the two full key self-similarity matrices (CLS row/column included)."""
    # one image per forward pass, as the reference, so identical images give exactly 0
    return F.mse_loss(key_self_similarity(backbone, edited), key_self_similarity(backbone, source)).item()


# ----------------------------------------------------------------------------------------------------------
# CLIP


def clip_score(clip: ClipScorer, image: np.ndarray, prompt: str) -> float:
    """max(100 cos(E_image, E_text), 0) with the prompt's brackets removed."""
    image_emb, text_emb = clip.image_embeds(image).float(), clip.text_embeds(strip_brackets(prompt)).float()
    cos = (image_emb / image_emb.norm()) @ (text_emb / text_emb.norm())
    return max(100 * cos.item(), 0.0)


def clip_edit_part(clip: ClipScorer, image: np.ndarray, mask: np.ndarray, prompt: str) -> float:
    """CLIP score of uint8(image * M): black outside the edited region; NaN for an empty mask."""
    mask = np.asarray(mask, dtype=np.float64)
    if mask.sum() == 0:
        return math.nan
    return clip_score(clip, np.uint8(np.asarray(image) * mask[..., None]), prompt)


# ----------------------------------------------------------------------------------------------------------
# all metrics of one edit


class PieBenchMetrics(Metric):
    """The reference metric set; a backbone left as None makes its metrics NaN (listed in `unavailable`)."""

    columns = COLUMNS
    needs = frozenset({"source", "edited", "prompts", "mask"})
    # the edit's CLIP scores lead (the report puts the gain over the unedited baseline beside the first), then the
    # preservation of the rest
    headline = ("clip_similarity_target_image", "clip_similarity_target_image_edit_part", "structure_distance",
                "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part")

    def __init__(
        self,
        structure: StructureBackbone | None = None,
        clip: ClipScorer | None = None,
        lpips: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.structure, self.clip, self.lpips, self.device = structure, clip, lpips, device
        if clip is None:  # the captions serve the CLIP scores alone: without them, items with no captions score too
            self.needs = self.needs - {"prompts"}

    @property
    def unavailable(self) -> list[str]:
        backbones = {"structure_distance": self.structure, "lpips_unedit_part": self.lpips}
        backbones |= dict.fromkeys(CLIP_COLUMNS, self.clip)
        return [key for key in self.columns if key in backbones and backbones[key] is None]

    def compute(
        self, source: np.ndarray, edited: np.ndarray, mask: np.ndarray, source_prompt: str, target_prompt: str,
        failures: dict[str, str] | None = None,
    ) -> dict[str, float]:
        """The eight PIE-Bench metrics; a backbone's non-finite score is NaN and recorded in ``failures``."""
        nan, structure = math.nan, self.structure
        checked = backbones.BackboneScores(failures)
        out = {
            "structure_distance": nan if structure is None else checked(
                "structure_distance", lambda: structure_distance(structure, source, edited)),
            "psnr_unedit_part": psnr_unedit_part(source, edited, mask, self.device),
            "lpips_unedit_part": nan if self.lpips is None else checked(
                "lpips_unedit_part", lambda: lpips_unedit_part(self.lpips, source, edited, mask)),
            "mse_unedit_part": mse_unedit_part(source, edited, mask, self.device),
            "ssim_unedit_part": ssim_unedit_part(source, edited, mask, self.device),
        }
        if (clip := self.clip) is None:
            return out | dict.fromkeys(CLIP_COLUMNS, nan)
        scores = (lambda: clip_score(clip, source, source_prompt), lambda: clip_score(clip, edited, target_prompt),
                  lambda: clip_edit_part(clip, edited, mask, target_prompt))
        return out | {key: checked(key, score) for key, score in zip(CLIP_COLUMNS, scores, strict=True)}

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        return [self.compute(s.source, s.edited, s.mask, s.source_prompt, s.target_prompt, s.failures)
                for s in samples]


def _load_structure(kind: str, path: str, device: str | torch.device, key: str) -> KeyBackbone:
    if kind == "clip_vision":
        return KeyBackbone.from_clip_vision(backbones.load_clip_vision(path, key).to(device))
    from transformers import ViTModel

    path = backbones.weights_path(path)
    vit = ViTModel.from_pretrained(path, add_pooling_layer=False, **hub_kwargs(path, key))
    return KeyBackbone.from_vit(vit.to(device))


def _load_lpips(net: str, device: str | torch.device) -> torch.nn.Module:
    import lpips

    # the linear heads ship with the package; the SqueezeNet backbone comes from torchvision's download cache
    return lpips.LPIPS(net=net, verbose=False).to(device).eval()


SETTINGS = ("structure.path", "clip.path", "on_missing")  # what run.py users set; the scoring CLI names flags


@safe_loading
def build_piebench_metrics(cfg: Mapping, device: str | torch.device = "cpu", names: Mapping[str, str] | None = None,
                           prefix: str = "metrics") -> PieBenchMetrics:
    """Load the backbones named in a plain config mapping: ``{"structure": {"backbone": "dino"|"clip_vision"|None,
    "path": ...}, "clip": {"path": ...|None}, "lpips": {"net": "squeeze"|None}, "on_missing": "error"|"warn"}``.
    Missing sections take the reference defaults (DINO ViT-B/8, CLIP ViT-L/14, LPIPS SqueezeNet); an explicit None
    switches a metric off. ``names``: what the user sets for each path and for on_missing (default: the config keys
    under ``prefix``, for run.py; flags for the scoring CLI), so the messages name what to change."""
    names = names or {key: f"{prefix}.{key}" for key in SETTINGS}
    on_missing = backbones.check_on_missing(cfg)
    structure_cfg, clip_cfg, lpips_cfg = (cfg.get(key) or {} for key in ("structure", "clip", "lpips"))
    off = (None, "none")

    structure = None
    if (kind := structure_cfg.get("backbone", "dino")) not in off:
        path = backbones.backbone_path(structure_cfg, kind, {"dino": DINO_PATH, "clip_vision": CLIP_PATH}, "structure")
        structure = backbones.try_load(
            "structure_distance", repr(path), backbones.HF_HINT(names["structure.path"]),
            lambda: _load_structure(kind, path, device, names["structure.path"]), on_missing, names["on_missing"],
        )
    clip = None
    if (clip_path := clip_cfg.get("path", CLIP_PATH)) not in off:
        clip = backbones.load_clip(clip_path, "clip_similarity_*", device, names["clip.path"], on_missing,
                                   names["on_missing"])
    lpips_model = None
    if (net := lpips_cfg.get("net", "squeeze")) not in off:
        cache = f"{torch.hub.get_dir()}/checkpoints"
        lpips_model = backbones.try_load(
            "lpips_unedit_part", f"torchvision's {net} ImageNet weights in {cache}",
            "pre-populate TORCH_HOME on a machine with network access (lpips downloads them on first use)",
            lambda: _load_lpips(net, device), on_missing, names["on_missing"],
        )
    return PieBenchMetrics(structure=structure, clip=clip, lpips=lpips_model, device=device)
