"""The metric protocol (`evaluation.protocol`): a metric declared in this file, by its builder's path, scores beside
PIE-Bench's in one list config, and its columns reach results.csv and summary.csv in the declared order; the shipped
metrics' column declarations (names, directions, paper scales, headlines) drive the summaries and the sweep report."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from editlab.evaluation import aggregate
from editlab.evaluation.ground_truth import GroundTruthMetrics, with_ground_truth
from editlab.evaluation.metrics import PieBenchMetrics
from editlab.evaluation.paper_metrics import ICDPaperMetrics
from editlab.evaluation.protocol import Column, Metric, MetricSets, Sample, build_metrics
from editlab.evaluation.summary import COLUMNS, SHIPPED
from editlab.evaluation.table_layouts import load_layouts
from editlab.experiments.harness import run

PIE = PieBenchMetrics.columns
OFFLINE = {"structure": {"backbone": None}, "clip": {"path": None}, "lpips": {"net": None}, "on_missing": "warn"}
BRIGHTNESS = {"kind": "test_protocol:build_brightness", "scale": 100}


class Brightness(Metric):
    """A metric in one file: the edit's mean brightness, and its brightness change where there is a source."""

    columns = ("brightness", "brightness_change")
    needs = frozenset({"edited"})

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def score(self, samples):
        def mean(image):
            return float(np.asarray(image, dtype=np.float64).mean()) / 255 * self.scale

        return [{"brightness": mean(s.edited),
                 "brightness_change": math.nan if s.source is None else mean(s.edited) - mean(s.source)}
                for s in samples]


def sample(truth: bool = False) -> Sample:
    """An 8x8 black source, its edit grey all over, the top half masked; ``truth``: the edit is its ground truth."""
    source = np.zeros((8, 8, 3), np.uint8)
    edited = np.full((8, 8, 3), 51, np.uint8)
    mask = np.zeros((8, 8))
    mask[:4] = 1
    return Sample(edited, source, mask, "a cat", "a dog", "make it a dog", ground_truth=edited if truth else None)


def build_brightness(cfg, device="cpu", names=None, prefix="metrics") -> Brightness:
    return Brightness(cfg["scale"])


def test_a_metric_in_a_test_file_combines_with_piebench():
    metrics = build_metrics({"sets": {"piebench": OFFLINE, "brightness": BRIGHTNESS}})
    assert isinstance(metrics, MetricSets) and metrics.columns == (*PIE, "brightness", "brightness_change")
    assert metrics.needs == {"source", "edited", "mask"} and metrics.set_columns == ()  # CLIP off: no captions
    (row,) = metrics.score([sample()])
    assert list(row) == list(metrics.columns) and row["brightness"] == pytest.approx(20)
    assert row["brightness_change"] == pytest.approx(20) and math.isfinite(row["psnr_unedit_part"])
    assert metrics.unavailable == [k for k in PIE if k.startswith(("structure", "lpips", "clip"))]


def test_metric_sets_keep_their_set_level_columns_and_refuse_shared_columns():
    icd = {"kind": "icd_paper", "clip": {"path": None}, "dinov2": {"backbone": None}, "image_reward": {"path": None},
           "lpips": {"net": None}, "fid": {"backbone": None}}
    metrics = build_metrics({"sets": {"icd": icd, "brightness": BRIGHTNESS}})
    assert metrics.columns == (*ICDPaperMetrics.columns, "brightness", "brightness_change")
    assert metrics.set_columns == ICDPaperMetrics.set_columns and metrics.set_unavailable == ["fid"]
    assert math.isnan(metrics.finish([], [])["fid"]) and "source" not in metrics.needs
    with pytest.raises(ValueError, match="column in common"):
        build_metrics({"sets": {"a": BRIGHTNESS, "b": BRIGHTNESS}})
    with pytest.raises(ValueError, match="unknown metrics.kind='fancy'; expected piebench or icd_paper"):
        build_metrics({"kind": "fancy"})


@pytest.mark.parametrize("name", ["piebench", "icd_paper", "icd_paper_toy", "offline", "toy"])
def test_every_metric_config_still_composes_flat(name):
    metrics = compose_config(f"metrics={name}").metrics
    assert "sets" not in metrics and metrics.on_missing in ("error", "warn")


def test_the_combined_config_lists_both_sets_and_names_their_keys(tmp_path):
    metrics = OmegaConf.to_container(compose_config("metrics=piebench_icd_paper").metrics)
    assert list(metrics["sets"]) == ["piebench", "icd_paper"] and metrics["sets"]["icd_paper"]["kind"] == "icd_paper"
    missing = {"clip": {"path": str(tmp_path / "nowhere")}, "on_missing": "error"}
    with pytest.raises(RuntimeError, match="metrics.sets.second.clip.path"):
        build_metrics({"sets": {"first": OFFLINE, "second": {**OFFLINE, **missing}}})


def test_the_harness_writes_the_declared_columns_of_a_metric_list(tmp_path, own_cache):
    cfg = compose_config("~experiment", "model=tiny", "editor.num_steps=3", "warmup=false", "logger=none",
                         "dataset.limit=2", "metrics=offline")
    cfg.metrics = {"sets": {"offline": OmegaConf.to_container(cfg.metrics), "brightness": BRIGHTNESS}}
    summary = run(cfg, tmp_path / "run", "g")
    header = (tmp_path / "run" / "results.csv").read_text().splitlines()[0].split(",")
    start = header.index(PIE[0])
    assert header[start: start + len(PIE) + 5] == [*PIE, "brightness", "brightness_change", "gt_psnr", "gt_ssim",
                                                   "gt_mse"]
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert (results["error"].isna()).all() and results["brightness"].between(0, 100).all()
    overall = summary[summary["edit_type"] == "all"].iloc[0]
    assert overall["brightness"] == pytest.approx(results["brightness"].mean())
    assert list(pd.read_csv(tmp_path / "run" / "summary.csv").columns) == list(summary.columns)


def test_a_column_is_its_name_with_how_summaries_print_it():
    column = Column("structure_distance", higher_is_better=False, paper="struct_x1e3", factor=1e3)
    assert column == "structure_distance" and {column: 1}["structure_distance"] == 1 and f"{column}" == column
    assert column.summary_name == "struct_x1e3" and Column("brightness").summary_name == "brightness"
    copied = pickle.loads(pickle.dumps(column))  # rows and frames travel between processes
    assert (copied.higher_is_better, copied.paper, copied.factor) == (False, "struct_x1e3", 1e3)


def test_the_shipped_declarations_agree_with_the_paper_tables():
    """Every column of published.yaml that a shipped metric declares (by its summary name) points the way the
    declaration does, and every headline column is one of its metric's columns."""
    declared = {c.summary_name: c for c in COLUMNS.values()}
    checked = 0
    for layout in load_layouts().values():
        for column in layout["columns"]:
            if (metric := declared.get(column["key"])) is not None:
                assert (column["direction"] == "↑") == metric.higher_is_better, column["key"]
                checked += 1
    assert checked >= 20
    for metric in SHIPPED:
        assert set(metric.headline) <= set(metric.columns)
    assert list(COLUMNS) == [*PIE, *ICDPaperMetrics.columns, "fid", "gt_psnr", "gt_ssim", "gt_mse"]


def test_the_sweep_report_shows_the_declared_headlines_in_order():
    assert aggregate.HEADLINE_VIEW == (
        "run", "editor", "model", "precision", "n", "clip_whole", "clip_gain", "clip_edited", "struct_x1e3", "psnr",
        "lpips_x1e3", "mse_x1e4", "ssim_x1e2", "clip_t", "clip_i", "dinov2", "image_reward", "lpips_vgg",
        "psnr_uint8", "gt_psnr", "gt_ssim", "seconds", "nfe")
    summary = pd.DataFrame({"editor": ["a", "b"], "edit_type": "all", "n": 2, "clip_whole": [20.0, 25.0],
                            "lpips_x1e3": math.nan, "clip_t": math.nan, "gt_psnr": [18.0, math.nan]})
    # PIE-Bench's empty column stays (its backbone was off), the iCD suite's goes
    assert list(aggregate.headline(summary).columns) == ["editor", "n", "clip_whole", "lpips_x1e3", "gt_psnr"]


def test_a_job_scores_its_metrics_then_the_ground_truth():
    metrics = with_ground_truth(build_metrics(OFFLINE))
    assert metrics.columns == (*PIE, "gt_psnr", "gt_ssim", "gt_mse") and "ground_truth" in metrics.needs
    with_truth, without = metrics.score([sample(truth=True), sample()])
    assert math.isinf(with_truth["gt_psnr"]) and with_truth["gt_mse"] == 0
    assert all(math.isnan(without[c]) for c in GroundTruthMetrics.columns)
    assert with_truth["psnr_unedit_part"] == without["psnr_unedit_part"]
