"""The iCD paper's metric suite (``metrics=icd_paper``), following the conventions of the iCD evaluation code.

Per image (``ICDPaperMetrics.compute``; whole images, the PIE-Bench edit mask is not used):
- ``clip_t``: cosine(CLIP image features of the edited image, CLIP text features of the target prompt), CLIP
  ViT-L/14; a plain cosine in [-1, 1], where PIE-Bench reports max(100 cos, 0);
- ``clip_i``: cosine of the CLIP image features of source and edited image (PIE-Bench has no image-image CLIP);
- ``dinov2``: cosine of DINOv2-base ``pooler_output`` (the layer-normed CLS token) of source and edited image, higher
  = more similar (the paper says "cosine distance"); PIE-Bench's structure distance uses DINO v1 attention keys;
- ``image_reward``: ImageReward-v1.0 of (target prompt, edited image);
- ``lpips_vgg``: piq's LPIPS (VGG16, the only net piq has) on [0, 1] images resized to 224x224, where PIE-Bench
  uses the lpips package's SqueezeNet on zero-filled backgrounds in [-1, 1] at full size. The resize is PIL's
  ``Image.resize((224, 224))`` with its default filter, as the iCD code calls it: bicubic (Pillow >= 7), not
  bilinear;
- ``psnr_uint8``: 20 log10(255 / sqrt(MSE)) over the whole uint8 image, in float64, +inf for an identical pair (for
  that pair only: the iCD code returns a single inf for the whole list; means leave inf out, the summary counts
  them). PIE-Bench's PSNR is over the zero-filled background in [0, 1].

Prompts lose PIE-Bench's edit brackets (``evaluation.piebench.strip_brackets``) before CLIP and ImageReward see them;
text is truncated to CLIP's 77 tokens (the iCD code pads and truncates to 77). Backbones run in float32, where the
iCD code used CUDA autocast. Without a source image (text-to-image generation) the paired metrics (CLIP-I, DINOv2,
LPIPS, PSNR) are NaN; a metric whose backbone is off or missing is NaN (``unavailable``), never faked.

Per set (``ICDPaperMetrics.finish``): FID between two lists of image files, each image Lanczos-resized to short
side 256 and centre-cropped to 256 (uint8), as the iCD code; features from torchmetrics' FrechetInceptionDistance
with the 2048-d pool features of torch-fidelity's InceptionV3 (the same TF-ported pt_inception-2015-12-05 weights
pytorch-fid uses; its bilinear upsampling to 299 is torch's, as pytorch-fid's), with its input scaling changed from
torch-fidelity's (x - 128) / 128 to the iCD code's (pytorch-fid's) 2 x / 255 - 1 (`scale_inputs_as_the_icd_code`),
or, for the toy world, the toy CLIP vision tower's pooled output.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from editlab.evaluation.backbones import (
    CLIP_MEAN,
    CLIP_PATH,
    CLIP_STD,
    HF_HINT,
    OFF,
    BackboneScores,
    ClipScorer,
    backbone_path,
    check_on_missing,
    load_clip,
    load_clip_vision,
    processed,
    try_load,
    weights_path,
)
from editlab.evaluation.piebench import strip_brackets
from editlab.evaluation.protocol import Column, Metric, Sample
from editlab.models.hub import hub_kwargs
from editlab.models.safe_load import safe_loading

log = logging.getLogger(__name__)

# results.csv's columns, printed as they are (the iCD paper's tables do); FID is the job's, in set_metrics.json
COLUMNS = (
    Column("clip_t", higher_is_better=True),
    Column("clip_i", higher_is_better=True),
    Column("dinov2", higher_is_better=True),  # a similarity to the source
    Column("image_reward", higher_is_better=True),
    Column("lpips_vgg", higher_is_better=False),
    Column("psnr_uint8", higher_is_better=True),
)
SET_COLUMNS = (Column("fid", higher_is_better=False),)

DINOV2_PATH = "facebook/dinov2-base"
IMAGE_REWARD_PATH = "THUDM/ImageReward"
LPIPS_SIZE = 224
LPIPS_RESAMPLE = Image.Resampling.BICUBIC  # PIL's default for Image.resize, which the iCD code calls without one
FID_SIZE = 256
FID_BATCH = 32
FID_FEATURES = 2048
# what torch.hub caches for each download (file names of the URLs torchvision, piq and torch-fidelity load)
VGG16_FILE = "vgg16-397923af.pth"
PIQ_LPIPS_FILE = "lpips_weights.pt"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"

# What run.py users set; a caller may map some keys to its own flags, the rest keep their config keys.
ICD_SETTINGS = ("clip.path", "dinov2.path", "image_reward.path", "lpips.net", "fid.weights", "fid.path", "on_missing")


# ----------------------------------------------------------------------------------------------------------
# backbones


class PooledImageEncoder:
    """A vision transformer and its image processor; ``embed`` gives the model's ``pooler_output`` for one image
    (DINOv2: layer-normed CLS; CLIP's vision tower: post-layernorm CLS, before the projection)."""

    def __init__(self, model: torch.nn.Module, processor: Callable) -> None:
        self.model, self.processor = model.eval(), processor

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        return self.model(pixel_values=processed(image, self.processor, self.model)).pooler_output[0].float()


def _load_pooled_encoder(kind: str, path: str, device: str | torch.device, key: str) -> PooledImageEncoder:
    from transformers import AutoImageProcessor, AutoModel, CLIPImageProcessorPil

    path = weights_path(path)
    hub = hub_kwargs(path, key)
    if kind == "dinov2":
        # the PIL backend, as transformers 4.x's processor the iCD code used (resize 256 bicubic, crop 224)
        processor = AutoImageProcessor.from_pretrained(path, backend="pil", **hub)
        model = AutoModel.from_pretrained(path, dtype=torch.float32, **hub)
    else:
        processor = CLIPImageProcessorPil.from_pretrained(path, **hub)
        model = load_clip_vision(path, key)
    return PooledImageEncoder(model.to(device), processor)


def _load_image_reward(path: str, device: str | torch.device, key: str) -> Any:
    from editlab.evaluation.image_reward import ImageRewardScorer  # written separately; imported only when asked for

    return ImageRewardScorer.from_pretrained(weights_path(path), device, key)


def _load_piq_lpips(device: str | torch.device) -> torch.nn.Module:
    import piq

    # VGG16 ImageNet weights (torchvision) and the linear heads (piq) both come through the torch hub cache
    with warnings.catch_warnings():  # piq still asks torchvision for `vgg16(pretrained=True)`
        warnings.simplefilter("ignore", UserWarning)
        return piq.LPIPS(reduction="none").to(device).eval()


class ClipVisionFeatures(torch.nn.Module):
    """FID features for the toy world: a CLIP vision tower's pooled output of uint8 [B, 3, H, W] images, with the
    CLIP preprocessing done on tensors (bicubic antialiased resize to the model's input size, CLIP mean/std)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.image_size = model.config.image_size
        self.num_features = model.config.hidden_size  # torchmetrics reads this instead of probing with a dummy image
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        x = F.interpolate(images.float() / 255, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return self.model(pixel_values=x.to(next(self.model.parameters()).dtype)).pooler_output.float()


def _fid_metric(feature: int | torch.nn.Module, weights: str | None, device: str | torch.device) -> torch.nn.Module:
    from torchmetrics.image.fid import FrechetInceptionDistance

    # normalize=False: uint8 inputs, as the iCD pipeline's PIL images (ToTensor's x / 255 loses nothing)
    if isinstance(feature, torch.nn.Module):
        return FrechetInceptionDistance(feature=feature, normalize=False).to(device)
    return FrechetInceptionDistance(
        feature=feature, normalize=False, feature_extractor_weights_path=weights
    ).to(device)


def scale_inputs_as_the_icd_code(inception: torch.nn.Module) -> None:
    """Make torch-fidelity's InceptionV3, which scales its uint8 input as ``y = (x - 128) / 128``, compute the
    features of the iCD code's pytorch-fid scaling ``y' = 2 x / 255 - 1`` exactly. ``y' = a y + b`` with ``a =
    256 / 255``, ``b = 1 / 255``; the first convolution has no padding and no bias, so ``W * y' = a W * y + b
    sum(W)``: its weights are scaled by ``a`` and ``b`` times each filter's sum becomes its bias. (Both resize to
    299² bilinearly first, which commutes with the scaling.)"""
    conv = inception.Conv2d_1a_3x3.conv
    if conv.padding != (0, 0) or conv.bias is not None:
        raise ValueError("InceptionV3's first convolution is not the unpadded, bias-free one this rescaling assumes")
    with torch.no_grad():
        conv.bias = torch.nn.Parameter(conv.weight.sum(dim=(1, 2, 3)) / 255, requires_grad=False)
        conv.weight.mul_(256 / 255)


def _load_fid(kind: str, weights: str | None, path: str | None, device: str | torch.device, key: str) -> Any:
    if kind == "inception":
        if weights is not None:
            weights = weights_path(weights)
            if not Path(weights).is_file():
                raise FileNotFoundError(f"no InceptionV3 weights file at {weights}")
        fid = _fid_metric(FID_FEATURES, weights, device)
        scale_inputs_as_the_icd_code(fid.inception)
        return fid
    return _fid_metric(ClipVisionFeatures(load_clip_vision(path, key).to(device)), None, device)


def fid_image(path: str | Path) -> torch.Tensor:
    """uint8 [3, 256, 256]: Lanczos resize of the short side to 256, centre crop 256 (torchvision on PIL)."""
    from torchvision import transforms

    prep = transforms.Compose([
        transforms.Resize(FID_SIZE, interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.CenterCrop(FID_SIZE),
        transforms.PILToTensor(),
    ])
    with Image.open(path) as image:
        return prep(image.convert("RGB"))


# ----------------------------------------------------------------------------------------------------------
# per-pair metrics


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=0).item()


def psnr_uint8(source: np.ndarray, edited: np.ndarray) -> float:
    """20 log10(255 / sqrt(MSE)) in float64 over the whole image; +inf when the two are identical."""
    a, b = np.asarray(source, dtype=np.float64), np.asarray(edited, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: source {a.shape}, edited {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 20 * math.log10(255.0 / math.sqrt(mse))


def lpips_input(image: np.ndarray) -> torch.Tensor:
    """1x3x224x224 float32 in [0, 1]: PIL resize of the uint8 image (bicubic, the iCD code's PIL default), / 255."""
    resized = np.asarray(Image.fromarray(np.asarray(image)).resize((LPIPS_SIZE, LPIPS_SIZE), LPIPS_RESAMPLE))
    return torch.from_numpy(resized.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()


@torch.no_grad()
def lpips_vgg(model: torch.nn.Module, source: np.ndarray, edited: np.ndarray) -> float:
    device = next(model.parameters()).device
    return model(lpips_input(source).to(device), lpips_input(edited).to(device)).item()


# ----------------------------------------------------------------------------------------------------------
# the metric set


class ICDPaperMetrics(Metric):
    """The iCD metric set; a backbone left as None makes its metrics NaN (listed in ``unavailable``). The source
    image is used where there is one (generation has none)."""

    columns = COLUMNS
    needs = frozenset({"edited", "prompts", "references"})
    set_columns = SET_COLUMNS
    headline = COLUMNS

    def __init__(
        self,
        clip: ClipScorer | None = None,
        dinov2: PooledImageEncoder | None = None,
        image_reward: Any | None = None,
        lpips: torch.nn.Module | None = None,
        fid: Any | None = None,
        device: str | torch.device = "cpu",
        backbones: Mapping[str, str | None] | None = None,
    ) -> None:
        self.clip, self.dinov2, self.image_reward, self.lpips, self.fid = clip, dinov2, image_reward, lpips, fid
        self.device = device
        # which backbone each metric used, for reports (None: off or unavailable)
        self.backbones: dict[str, str | None] = dict(backbones or {})

    def _backbone_of(self) -> dict[str, Any]:
        return {"clip_t": self.clip, "clip_i": self.clip, "dinov2": self.dinov2, "image_reward": self.image_reward,
                "lpips_vgg": self.lpips}

    @property
    def unavailable(self) -> list[str]:
        """Per-image keys whose backbone is off or missing (PSNR needs none)."""
        backbones = self._backbone_of()
        return [key for key in self.columns if key in backbones and backbones[key] is None]

    @property
    def set_unavailable(self) -> list[str]:
        return [] if self.fid is not None else list(self.set_columns)

    def compute(
        self,
        source: np.ndarray | None,
        edited: np.ndarray,
        mask: np.ndarray | None,
        source_prompt: str,
        target_prompt: str,
        failures: dict[str, str] | None = None,
    ) -> dict[str, float]:
        """The six per-image metrics of uint8 HWC images; ``mask`` and ``source_prompt`` are not used (whole-image
        metrics), ``source`` None (generation) makes the paired metrics NaN. A backbone's non-finite score is NaN
        and recorded in ``failures``."""
        out = dict.fromkeys(self.columns, math.nan)
        checked = BackboneScores(failures)
        prompt = strip_brackets(target_prompt)
        edited_emb = None
        if self.clip is not None:
            edited_emb = self.clip.image_embeds(edited)
            out["clip_t"] = checked("clip_t", lambda: _cosine(edited_emb, self.clip.text_embeds(prompt)))
        if self.image_reward is not None:
            out["image_reward"] = checked("image_reward", lambda: self.image_reward.score(np.asarray(edited), prompt))
        if source is None:
            return out
        out["psnr_uint8"] = psnr_uint8(source, edited)  # also checks the shapes
        if edited_emb is not None:
            out["clip_i"] = checked("clip_i", lambda: _cosine(self.clip.image_embeds(source), edited_emb))
        if self.dinov2 is not None:
            out["dinov2"] = checked("dinov2", lambda: _cosine(self.dinov2.embed(source), self.dinov2.embed(edited)))
        if self.lpips is not None:
            out["lpips_vgg"] = checked("lpips_vgg", lambda: lpips_vgg(self.lpips, source, edited))
        return out

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        return [self.compute(s.source, s.edited, s.mask, s.source_prompt, s.target_prompt, s.failures)
                for s in samples]

    @torch.no_grad()
    def finish(self, outputs: Sequence[Path], references: Sequence[Path]) -> dict[str, float]:
        """``{"fid": FID(outputs, references)}``; NaN without the FID backbone or with fewer than 2 images a side."""
        if self.fid is None or len(outputs) < 2 or len(references) < 2:
            return {"fid": math.nan}
        fid = self.fid
        fid.reset()
        device = fid.device  # a torchmetrics Metric: where its states and feature network live
        for files, real in ((references, True), (outputs, False)):
            for start in range(0, len(files), FID_BATCH):
                batch = torch.stack([fid_image(f) for f in files[start : start + FID_BATCH]])
                fid.update(batch.to(device), real=real)
        value = fid.compute().item()
        fid.reset()
        return {"fid": value}


# ----------------------------------------------------------------------------------------------------------
# construction from a config mapping


def _section(cfg: Mapping, key: str) -> Mapping:
    return cfg.get(key) or {}


@safe_loading
def build_icd_metrics(cfg: Mapping, device: str | torch.device = "cpu", names: Mapping[str, str] | None = None,
                      prefix: str = "metrics") -> ICDPaperMetrics:
    """Load the backbones named in a plain config mapping::

        {"kind": "icd_paper", "clip": {"path": ...|None}, "dinov2": {"backbone": "dinov2"|"clip_vision"|None,
         "path": ...}, "image_reward": {"path": ...|None}, "lpips": {"net": "vgg"|None},
         "fid": {"backbone": "inception"|"clip_vision"|None, "weights": None|local .pth, "path": ...},
         "on_missing": "error"|"warn"}

    Missing sections take the paper's backbones (CLIP ViT-L/14, DINOv2-base, ImageReward, piq's VGG LPIPS,
    InceptionV3 from the torch hub cache); an explicit None switches a metric off. ``names``: what the user sets for
    each key (by default the config keys under ``prefix``, for run.py), so the messages name what to change."""
    names = {**{key: f"{prefix}.{key}" for key in ICD_SETTINGS}, **(names or {})}
    on_missing = check_on_missing(cfg)
    clip_cfg, dino_cfg, ir_cfg, lpips_cfg, fid_cfg = (
        _section(cfg, key) for key in ("clip", "dinov2", "image_reward", "lpips", "fid")
    )
    cache = f"{torch.hub.get_dir()}/checkpoints"

    def load(metric: str, source: str, hint: str, loader: Callable[[], Any]) -> Any:
        return try_load(metric, source, hint, loader, on_missing, names["on_missing"])

    backbones: dict[str, str | None] = dict.fromkeys((*COLUMNS, *SET_COLUMNS))
    backbones["psnr_uint8"] = "pixels (uint8)"

    clip = None
    if (clip_path := clip_cfg.get("path", CLIP_PATH)) not in OFF:
        clip = load_clip(clip_path, "clip_t/clip_i", device, names["clip.path"], on_missing, names["on_missing"])
        if clip is not None:
            backbones["clip_t"] = backbones["clip_i"] = f"clip:{clip_path}"

    dinov2 = None
    if (kind := dino_cfg.get("backbone", "dinov2")) not in OFF:
        dino_path = backbone_path(dino_cfg, kind, {"dinov2": DINOV2_PATH, "clip_vision": CLIP_PATH}, "dinov2")
        key = names["dinov2.path"]
        dinov2 = load("dinov2", repr(dino_path), HF_HINT(key),
                      lambda: _load_pooled_encoder(kind, dino_path, device, key))
        if dinov2 is not None:
            backbones["dinov2"] = f"{kind}:{dino_path}"

    image_reward = None
    if (ir_path := ir_cfg.get("path", IMAGE_REWARD_PATH)) not in OFF:
        key = names["image_reward.path"]
        image_reward = load(
            "image_reward", repr(ir_path),
            f"make the ImageReward-v1.0 weights available offline (HF_HOME cache, or a local copy named by {key})",
            lambda: _load_image_reward(ir_path, device, key),
        )
        if image_reward is not None:
            backbones["image_reward"] = f"image_reward:{ir_path}"

    lpips_model = None
    net = lpips_cfg.get("net", "vgg")
    if net not in (*OFF, "vgg"):
        raise ValueError(f"unknown LPIPS net {net!r}: piq's LPIPS has only 'vgg' (or None to switch it off)")
    if net not in OFF:
        lpips_model = load(
            "lpips_vgg", f"torchvision's {VGG16_FILE} and piq's {PIQ_LPIPS_FILE} in {cache}",
            f"pre-populate TORCH_HOME on a machine with network access (piq downloads both on first use), or set "
            f"{names['lpips.net']}=null",
            lambda: _load_piq_lpips(device),
        )
        if lpips_model is not None:
            backbones["lpips_vgg"] = "piq:lpips-vgg16"

    fid = None
    fid_kind = fid_cfg.get("backbone", "inception")
    if fid_kind not in (*OFF, "inception", "clip_vision"):
        raise ValueError(f"unknown FID backbone {fid_kind!r}; use 'inception', 'clip_vision' or None")
    if fid_kind == "inception":
        weights = fid_cfg.get("weights")
        key = names["fid.weights"]
        fid = load(
            "fid", repr(weights) if weights else f"torch-fidelity's {INCEPTION_FILE} in {cache}",
            f"pre-populate TORCH_HOME on a machine with network access (torch-fidelity downloads it on first use), "
            f"or set {key} to a local copy of {INCEPTION_FILE}",
            lambda: _load_fid("inception", weights, None, device, key),
        )
        if fid is not None:
            backbones["fid"] = f"inception:{weights or 'torch-hub'}"
    elif fid_kind == "clip_vision":
        fid_path = fid_cfg.get("path")
        if not fid_path:
            raise ValueError(f"the clip_vision FID backbone needs a path: set {names['fid.path']}")
        key = names["fid.path"]
        fid = load("fid", repr(fid_path), HF_HINT(key), lambda: _load_fid("clip_vision", None, fid_path, device, key))
        if fid is not None:
            backbones["fid"] = f"clip_vision:{fid_path}"

    return ICDPaperMetrics(clip=clip, dinov2=dinov2, image_reward=image_reward, lpips=lpips_model, fid=fid,
                           device=device, backbones=backbones)
