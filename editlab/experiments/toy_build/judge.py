"""How the quality bars judge images (also `toy_guidance_chain`'s): PSNR, and the saved toy CLIP as a zero-shot
judge of shape, colour and background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio
from transformers import CLIPModel, CLIPTokenizer

from editlab.experiments.toy_build.clip import clip_pixels, pooled
from editlab.experiments.toy_build.data import alternatives
from editlab.experiments.toy_build.text_encoder import token_ids
from editlab.toyworld.scenes import Scene


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (float64; +inf for identical ones)."""
    return peak_signal_noise_ratio(*(torch.tensor(x, dtype=torch.float64) for x in (a, b)), data_range=255.0).item()


class ToyClip:
    """The saved toy CLIP as a zero-shot judge: does an image rank its own caption above captions that differ in
    one attribute?"""

    def __init__(self, path: Path, device: torch.device):
        self.model = CLIPModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        ids = token_ids(self.tokenizer, captions).to(self.device)
        return F.normalize(pooled(self.model.get_text_features(input_ids=ids)), dim=-1)

    @torch.no_grad()
    def image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_pixels(images, self.device)
        return F.normalize(pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def checks(self, images: torch.Tensor, scenes: list[Scene]) -> list[dict[str, bool]]:
        """Per image, {check name: correct} for every check of `alternatives`."""
        embeds = self.image(images)
        results = []
        for embed, scene in zip(embeds, scenes):
            checks = alternatives(scene)
            captions = [scene.caption(), *{cap for others in checks.values() for cap in others}]
            score = dict(zip(captions, (self.text(captions) @ embed).tolist()))  # one text batch per scene
            truth = score[scene.caption()]
            results.append({name: all(truth > score[cap] for cap in others) for name, others in checks.items()})
        return results


def accuracy(checks: list[dict[str, bool]]) -> dict[str, float]:
    """Accuracy per attribute kind (shape, colour, background) and the fraction of images with every check right."""
    by_kind: dict[str, list[bool]] = {}
    for outcome in checks:
        for name, ok in outcome.items():
            by_kind.setdefault(name.rstrip("0123456789"), []).append(ok)
    result = {kind: float(np.mean(v)) for kind, v in by_kind.items()}
    result["all_correct"] = float(np.mean([all(o.values()) for o in checks]))
    return result
