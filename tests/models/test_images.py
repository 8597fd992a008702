"""The shared image conventions: fitting (short side, centre crop) and the model's pixel range."""

import numpy as np
import torch
from PIL import Image

from editlab.models.images import crop_geometry, fit, to_model_pixels, to_uint8, uint8_to_model_pixels


def test_fit_resizes_the_short_side_and_crops_the_centre():
    assert crop_geometry(200, 100, (50, 50)) == ((100, 50), (25, 0, 75, 50))
    assert crop_geometry(64, 128, (32, 32)) == ((32, 64), (0, 16, 32, 48))
    wide = Image.fromarray(np.zeros((100, 200, 3), dtype=np.uint8))
    assert fit(wide, (50, 50)).size == (50, 50)
    same = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    assert fit(same, (32, 32)) is same


def test_pixel_range_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = to_model_pixels(Image.fromarray(rgb))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(uint8_to_model_pixels(torch.from_numpy(rgb)[None])[0], x, rtol=0, atol=0)
    assert np.abs(to_uint8(x[None])[0].astype(int) - rgb).max() <= 1  # rounded down, as the reference decodes
    assert to_uint8(torch.full((1, 3, 2, 2), 5.0)).max() == 255  # clamped
