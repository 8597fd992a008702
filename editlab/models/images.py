"""The image conventions every model family shares: fitting an image to a size (short side resized, centre crop)
and the [-1, 1] pixel range the VAEs take."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def crop_geometry(width: int, height: int, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The resized size of a ``width`` x ``height`` image whose short side fits ``size`` (width, height), and the
    centred crop box of ``size`` inside it."""
    scale = max(size[0] / width, size[1] / height)
    new_w, new_h = max(size[0], round(width * scale)), max(size[1], round(height * scale))
    left, top = (new_w - size[0]) // 2, (new_h - size[1]) // 2
    return (new_w, new_h), (left, top, left + size[0], top + size[1])


def fit(image: Image.Image, size: tuple[int, int], resample: int = Image.BICUBIC) -> Image.Image:
    """``image`` resized (short side) and centre-cropped to ``size``; unchanged when it has that size already."""
    if image.size == size:
        return image
    resized, box = crop_geometry(*image.size, size)
    return image.resize(resized, resample).crop(box)


def to_model_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1], the range the VAEs encode."""
    return uint8_to_model_pixels(torch.from_numpy(np.array(image.convert("RGB"))))  # a writable copy


def uint8_to_model_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]."""
    return (images.float() / 127.5 - 1.0).movedim(-1, -3)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Decoded pixels (nominally [-1, 1]) -> [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoded pixels [B, 3, H, W] (nominally [-1, 1]) -> uint8 [B, H, W, 3], clamped and rounded down like the
    reference implementations."""
    return (to_unit_range(x).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
