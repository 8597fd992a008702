"""Metrics against the true edit, for benchmarks that ship one (the toy world's `ground_truth/` folder).

No real benchmark can say what the correct edit looks like; the toy set renders both sides of every edit, so an
edit can also be scored against its target render: ``gt_psnr`` (dB, higher is better), ``gt_ssim`` (higher is
better) and ``gt_mse`` (lower is better), over the whole image, on [0, 1] values with torchmetrics' defaults, like
the PIE-Bench pixel metrics. Items without a ground-truth file get NaN, so these columns never fake a number.

`GroundTruthMetrics` is a metric of the protocol; the harness and the scoring CLI score it after the configured
metric set (`with_ground_truth`), on samples whose ``ground_truth`` they load:

    Sample(edited, ..., ground_truth=load_ground_truth(dataset.root, item.image_path, edited))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from editlab.evaluation.protocol import Column, Metric, MetricSets, Sample
from editlab.models.images import fit

GT_FOLDER = "ground_truth"


def ground_truth_file(root: str | Path, image_path: str) -> Path | None:
    """`<root>/ground_truth/<image_path>` when the benchmark has it, else None."""
    path = Path(root) / GT_FOLDER / image_path
    return path if path.is_file() else None


def load_ground_truth(root: str | Path, image_path: str, edited: np.ndarray) -> np.ndarray | None:
    """The true edit of a benchmark item (uint8 HWC) at the size of its ``edited`` image, fitted as the harness fits
    the source; None when the benchmark has none."""
    path = ground_truth_file(root, image_path)
    if path is None:
        return None
    with Image.open(path) as image:
        return np.asarray(fit(image.convert("RGB"), (edited.shape[1], edited.shape[0])))


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


class GroundTruthMetrics(Metric):
    """`ground_truth_metrics` of each sample's edit against its ``ground_truth``; NaN for a sample without one."""

    columns = (Column("gt_psnr", higher_is_better=True), Column("gt_ssim", higher_is_better=True),
               Column("gt_mse", higher_is_better=False))
    needs = frozenset({"edited", "ground_truth"})
    headline = ("gt_psnr", "gt_ssim")

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        return [dict.fromkeys(self.columns, math.nan) if s.ground_truth is None
                else ground_truth_metrics(s.edited, s.ground_truth) for s in samples]


def with_ground_truth(metrics: Metric) -> MetricSets:
    """What a job scores: ``metrics``, then the comparison with the true edit (results.csv's ``gt_*`` columns)."""
    return MetricSets([metrics, GroundTruthMetrics()])
