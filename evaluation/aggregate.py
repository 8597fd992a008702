"""Summarise every results.csv under a folder (a multirun sweep, sharded jobs, a benchmark) in one table.

    python -m evaluation.aggregate multirun/2026-11-23/10-00-00 [--out summary.csv]

Jobs are told apart by the ``run`` column (their overrides, shard keys excluded, so the shards of one configuration
summarise together); rows of the same item in the same run (overlapping shards, retried jobs) keep the latest.
Prints the cost table (seconds per edit, UNet evaluations, peak memory per editor / model / precision) and the full
summary. Every ``run.py -m`` sweep ends with the same report (`SweepReport`, a Hydra callback): one line per job with
the headline metrics and costs, the jobs that failed and why, and ``comparison.png`` (source, ground truth where the
dataset has one, each job's edit).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from PIL import Image, ImageDraw

from evaluation.summary import RUN_COLUMNS, format_summary, summarize
from evaluation.toyset import dataset_root

log = logging.getLogger(__name__)

COST_VIEW = (*RUN_COLUMNS, "n", "seconds", "nfe", "backward_passes", "peak_mem_mb")
HEADLINE_VIEW = (*RUN_COLUMNS, "n", "clip_whole", "clip_gain", "clip_edited", "psnr", "ssim_x1e2", "structure_x1e3",
                 "gt_psnr", "gt_ssim", "seconds", "nfe")


def collect(folder: Path) -> pd.DataFrame:
    files = sorted(folder.rglob("results.csv"))
    if not files:
        raise FileNotFoundError(f"no results.csv under {folder}")
    frames = [pd.read_csv(f, dtype={"image_id": str, "edit_type": str, "error": str}) for f in files]
    results = pd.concat(frames, ignore_index=True)
    results["error"] = results["error"].fillna("")
    keys = [c for c in RUN_COLUMNS if c in results]
    return results.drop_duplicates([*keys, "image_id"], keep="last").reset_index(drop=True)


def job_errors(folder: Path) -> dict[str, str]:
    """{job folder name: its error} for the jobs of a sweep that failed as a whole (run.py writes job_error.txt)."""
    return {f.parent.name: f.read_text().strip() for f in sorted(folder.rglob("job_error.txt"))}


def _job_label(job: Path) -> str:
    """A job's editor (from its results.csv), else its folder name."""
    try:
        return str(pd.read_csv(job / "results.csv", usecols=["editor"], nrows=1)["editor"].iloc[0])
    except (OSError, ValueError, KeyError, IndexError):
        return job.name


def _tile(path: Path, size: int) -> np.ndarray:
    if not path.is_file():  # a failed item: a mid-gray tile
        return np.full((size, size, 3), 128, np.uint8)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.NEAREST))


def comparison_grid(folder: Path, dataset_root: Path | None, max_items: int = 10, tile: int = 96) -> Path | None:
    """``<folder>/comparison.png``: one row per edited item (at most ``max_items``, one per edit type first), columns
    source, ground truth (if the dataset has one), then each job's edit (gray where it failed), labelled on top.
    None when no job edited anything or the dataset's mapping file is unreadable."""
    jobs = sorted(p for p in folder.iterdir() if (p / "annotation_images").is_dir())
    try:
        mapping = json.loads((Path(dataset_root) / "mapping_file.json").read_text())
    except (OSError, TypeError, ValueError):
        return None
    edited = {str(i) for job in jobs if (job / "results.csv").is_file()
              for i in pd.read_csv(job / "results.csv", dtype={"image_id": str}, usecols=["image_id"])["image_id"]}
    edited &= set(mapping)
    if not edited:
        return None
    by_type: dict[str, str] = {}
    for image_id in sorted(edited):
        by_type.setdefault(mapping[image_id]["editing_type_id"], image_id)
    ids = (sorted(by_type.values()) + [i for i in sorted(edited) if i not in by_type.values()])[:max_items]
    root = Path(dataset_root)
    columns = [("source", lambda e: root / "annotation_images" / e["image_path"])]
    if (root / "ground_truth").is_dir():
        columns.append(("ground truth", lambda e: root / "ground_truth" / e["image_path"]))
    labels = {job: _job_label(job) for job in jobs}
    if len(set(labels.values())) < len(labels):  # e.g. a precision sweep of one editor: the overrides tell them apart
        labels = {job: job.name.split("_", 1)[-1] for job in jobs}
    for job in jobs:
        label = labels[job]
        edit_of = lambda e, job=job: job / "annotation_images" / Path(e["image_path"]).with_suffix(".png")  # noqa: E731
        columns.append((label, edit_of))
    header = np.full((16, tile * len(columns), 3), 255, np.uint8)
    rows = [np.concatenate([_tile(path(mapping[i]), tile) for _, path in columns], axis=1) for i in ids]
    canvas = Image.fromarray(np.concatenate([header, *rows], axis=0))
    draw = ImageDraw.Draw(canvas)
    for k, (label, _) in enumerate(columns):
        draw.text((k * tile + 2, 2), label[: tile // 6], fill=(0, 0, 0))
    out = folder / "comparison.png"
    canvas.save(out)
    return out


def report(folder: Path, dataset_root: Path | None = None) -> pd.DataFrame | None:
    """Print a sweep's headline table (one line per job) and its failed jobs; write aggregate_summary.csv and, given
    the dataset root, comparison.png. Returns the summary (None when no job wrote results)."""
    errors = job_errors(folder)
    try:
        results = collect(folder)
    except FileNotFoundError:
        results = None
    summary = None
    if results is not None:
        summary = summarize(results)
        summary.to_csv(folder / "aggregate_summary.csv", index=False)
        overall = summary[summary["edit_type"] == "all"].copy()
        baseline = overall.loc[overall["editor"] == "identity", "clip_whole"] if "editor" in overall else []
        if len(baseline) == 1 and "clip_whole" in overall:  # the CLIP gain of an edit over the unedited source
            overall["clip_gain"] = overall["clip_whole"] - baseline.iloc[0]
        print(f"\nsweep {folder}: {len(results)} items ({int((results['error'] != '').sum())} failed)")
        print(format_summary(overall[[c for c in HEADLINE_VIEW if c in overall]]))
    for job, error in errors.items():
        print(f"job {job} did not run: {error}")
    grid = comparison_grid(folder, dataset_root)
    if grid is not None:
        print(f"comparison grid: {grid}")
    return summary


class SweepReport(Callback):
    """Hydra callback: after a multirun, `report` on the sweep folder."""

    def on_multirun_end(self, config, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir)
        if not folder.is_dir():
            return
        try:
            report(folder, dataset_root(config.dataset) if config.get("dataset") else None)
        except Exception:  # noqa: BLE001 - the jobs' results are already on disk; a report failure must not hide them
            log.exception("the sweep report failed; the results are in %s", folder)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, help="summary CSV (default: <folder>/aggregate_summary.csv)")
    args = parser.parse_args(argv)
    results = collect(args.folder)
    summary = summarize(results)
    summary.to_csv(args.out or args.folder / "aggregate_summary.csv", index=False)
    overall = summary[summary["edit_type"] == "all"]
    failed = int((results["error"] != "").sum())
    print(f"{len(results)} items ({failed} failed) from {args.folder}\n")
    print(format_summary(overall[[c for c in COST_VIEW if c in overall]]))
    print()
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
