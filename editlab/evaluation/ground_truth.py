"""Metrics against the true edit, for benchmarks that ship one (the toy world's `ground_truth/` folder).

No real benchmark can say what the correct edit looks like; the toy set renders both sides of every edit, so an
edit can also be scored against its target render: ``gt_psnr`` (dB, higher is better), ``gt_ssim`` (higher is
better) and ``gt_mse`` (lower is better), over the whole image, on [0, 1] values with torchmetrics' defaults, like
the PIE-Bench pixel metrics. Items without a ground-truth file get NaN, so these columns never fake a number.

The harness calls it once per item, next to the PIE-Bench metrics:

    row.update(ground_truth_scores(dataset.root, item.image_path, np.asarray(result.edited)))
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from editlab.models.images import fit

GT_KEYS = ("gt_psnr", "gt_ssim", "gt_mse")
GT_FOLDER = "ground_truth"


def ground_truth_file(root: str | Path, image_path: str) -> Path | None:
    """`<root>/ground_truth/<image_path>` when the benchmark has it, else None."""
    path = Path(root) / GT_FOLDER / image_path
    return path if path.is_file() else None


def ground_truth_metrics(edited: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and MSE of an edit (uint8 HWC) against the true edit (uint8 HWC, same shape)."""
    if edited.shape != target.shape:
        raise ValueError(f"shape mismatch: edited {edited.shape}, ground truth {target.shape}")
    pair = [torch.from_numpy(np.asarray(x, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous()
            for x in (edited, target)]
    return {
        "gt_psnr": peak_signal_noise_ratio(*pair, data_range=1.0).item(),
        "gt_ssim": structural_similarity_index_measure(*pair, data_range=1.0).item(),
        "gt_mse": mean_squared_error(*pair).item(),
    }


def ground_truth_scores(root: str | Path, image_path: str, edited: np.ndarray) -> dict[str, float]:
    """The ground-truth metrics of one benchmark item's edit; NaN for each when the benchmark has no true edit."""
    path = ground_truth_file(root, image_path)
    if path is None:
        return dict.fromkeys(GT_KEYS, math.nan)
    with Image.open(path) as image:
        target = fit(image.convert("RGB"), (edited.shape[1], edited.shape[0]))  # as the harness fits the source
    return ground_truth_metrics(edited, np.asarray(target))
