"""The editing harness behind ``run.py``: dataset -> editor -> metrics -> results.csv / summary.csv / W&B.

Every item's row is appended to ``results.csv`` (and flushed) as soon as it finishes, so an interrupted run loses
nothing, and re-running into the same output directory skips the items that already succeeded. A failing item
(missing or corrupt image, over-long prompt, bad blend words, NaN, out of memory) gets a row with its ``error`` and
the run goes on.
"""

from __future__ import annotations

import csv
import logging
import math
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from editors.base import EditRequest, build_editor
from editors.models import load_components
from evaluation.ground_truth import GT_KEYS, ground_truth_scores
from evaluation.metrics import METRIC_KEYS, build_metrics
from evaluation.piebench import PieBenchDataset, PieBenchItem, load_rgb_image
from evaluation.summary import format_summary, summarize
from evaluation.wandb_logger import RunLogger

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "run", "editor", "model", "precision", "image_id", "edit_type", *METRIC_KEYS, *GT_KEYS,
    "seconds", "nfe", "backward_passes", "peak_mem_mb", "error", "note",
)


def build_dataset(cfg: Mapping[str, Any]) -> PieBenchDataset:
    root = cfg.get("root")
    if not root:
        raise ValueError(f"dataset={cfg['name']} needs dataset.root=/path/to/the/benchmark (mapping_file.json)")
    if cfg["kind"] == "toyset":
        from evaluation.toyset import write_piebench

        write_piebench(root, n_per_type=cfg["n_per_type"], size=cfg["size"], seed=cfg["seed"])
    elif cfg["kind"] != "piebench":
        raise ValueError(f"unknown dataset.kind={cfg['kind']!r}; expected piebench or toyset")
    edit_types = cfg.get("edit_types")
    return PieBenchDataset(
        root, edit_types=[str(t) for t in edit_types] if edit_types else None,
        ids=[str(i) for i in cfg["ids"]] if cfg.get("ids") else None, limit=cfg.get("limit"),
        shard=cfg.get("shard", 0), num_shards=cfg.get("num_shards", 1),
    )


def fit_to_resolution(image: Image.Image, mask: np.ndarray, size: int) -> tuple[Image.Image, np.ndarray, str]:
    """Resize the short side to ``size`` and centre-crop (image: bicubic, mask: nearest). Note what was done."""
    width, height = image.size
    if (width, height) == (size, size):
        return image, mask, ""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    box = (left, top, left + size, top + size)
    image = image.resize((new_w, new_h), Image.BICUBIC).crop(box)
    mask_img = Image.fromarray((mask * 255).astype(np.uint8)).resize((new_w, new_h), Image.NEAREST).crop(box)
    return image, (np.asarray(mask_img) > 127).astype(np.float64), f"resized {width}x{height}->{size}x{size}"


class ResultsFile:
    """Append-only results.csv; rows are flushed as they arrive; knows which items already succeeded."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        if path.exists() and path.stat().st_size:
            previous = pd.read_csv(path, dtype={"image_id": str, "edit_type": str, "error": str},
                                   keep_default_na=False)
            self.done = set(previous.loc[previous["error"] == "", "image_id"])
        else:
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(RESULT_COLUMNS)

    def append(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(column, "") for column in RESULT_COLUMNS])

    def read(self) -> pd.DataFrame:
        """The latest row per item (a retried item's success replaces its earlier error)."""
        frame = pd.read_csv(self.path, dtype={"image_id": str, "edit_type": str, "error": str})
        frame["error"] = frame["error"].fillna("")
        return frame.drop_duplicates("image_id", keep="last").reset_index(drop=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; process peak so far


@dataclass
class Outcome:
    row: dict[str, Any]
    source: Image.Image | None = None
    edited: Image.Image | None = None


def edit_item(item: PieBenchItem, dataset: PieBenchDataset, editor, metrics, seed: int) -> Outcome:
    """Edit and score one item; any failure becomes the row's ``error``."""
    components = editor.components
    row: dict[str, Any] = {"image_id": item.image_id, "edit_type": item.edit_type, "error": "", "note": ""}
    try:
        image, note = load_rgb_image(dataset.image_file(item))
        mask = dataset.load_mask(item, image.height, image.width)
        image, mask, resize_note = fit_to_resolution(image, mask, components.resolution)
        row["note"] = "; ".join(n for n in (note, resize_note) if n)
        if components.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(components.device)
        result = editor.edit(EditRequest(image, item.source_prompt, item.target_prompt, item.instruction,
                                         item.blend_words, seed))
        row.update(seconds=result.seconds, nfe=result.nfe, backward_passes=result.extras.get("backward_passes", 0),
                   peak_mem_mb=peak_memory_mb(components.device))
        row.update(metrics.compute(np.asarray(image), np.asarray(result.edited), mask, item.source_prompt,
                                   item.target_prompt))
        row.update(ground_truth_scores(dataset.root, item.image_path, np.asarray(result.edited)))
        return Outcome(row, image, result.edited)
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        row["error"] = f"out of GPU memory: {err}. Try precision=fp16, offload=model or offload=sequential"
        log.warning("item %s failed: %s", item.image_id, row["error"])
    except Exception as err:  # noqa: BLE001 - one bad item must not stop a sweep
        row["error"] = f"{type(err).__name__}: {err}"
        log.warning("item %s failed: %s", item.image_id, row["error"], exc_info=True)
    return Outcome(row)


def load_editor(cfg: DictConfig, device: str):
    """The configured model and editor; an editor's ``unet_path`` (the model's variant UNet it needs, e.g. the toy
    InstructPix2Pix one) replaces the model's UNet."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    editor_cfg = OmegaConf.to_container(cfg.editor, resolve=True)
    if unet_path := editor_cfg.pop("unet_path", None):
        model["unet_path"] = unet_path
    return build_editor(editor_cfg, load_components(model, cfg.precision, cfg.offload, device))


def run(cfg: DictConfig, output_dir: Path, group: str, run_name: str = "default") -> pd.DataFrame:
    """Run the configured editor over the configured dataset; returns the summary table.

    ``run_name`` labels the rows (the job's overrides), so the results of a sweep stay apart when concatenated.
    """
    if cfg.get("tour_editor") and cfg.tour_editor != cfg.editor.name:
        raise ValueError(f"the toy tour picks each job's editor (tour={cfg.tour_editor}), so editor={cfg.editor.name} "
                         f"does not apply; one editor on the toy world: python run.py experiment=toy "
                         f"editor={cfg.editor.name}; the plain defaults: python run.py ~experiment editor=...")
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(cfg.dataset)
    editor = load_editor(cfg, cfg.device)
    components = editor.components
    metrics = build_metrics(OmegaConf.to_container(cfg.metrics, resolve=True), components.device)
    results = ResultsFile(output_dir / "results.csv")
    run_info = {"run": run_name, "editor": cfg.editor.name, "model": cfg.model.name, "precision": cfg.precision.name}

    with RunLogger(cfg, output_dir, group) as logger:
        todo = [item for item in dataset if item.image_id not in results.done]
        if len(todo) < len(dataset):
            log.info("resuming: %d of %d items already done in %s", len(dataset) - len(todo), len(dataset), output_dir)
        if cfg.warmup and todo:  # untimed: the first calls pay for kernel selection and allocation
            edit_item(todo[0], dataset, editor, metrics, cfg.seed)
        for item in tqdm(todo, desc=f"{cfg.editor.name} on {cfg.model.name}/{cfg.precision.name}", unit="edit"):
            outcome = edit_item(item, dataset, editor, metrics, cfg.seed)
            outcome.row.update(run_info)
            results.append(outcome.row)
            if outcome.edited is not None and cfg.save_images:
                target = output_dir / "annotation_images" / Path(item.image_path).with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                outcome.edited.save(target)
            logger.log_item(item, outcome)

        frame = results.read()
        summary = summarize(frame)
        summary.to_csv(output_dir / "summary.csv", index=False)
        failed = int((frame["error"] != "").sum())
        print(f"\n{cfg.editor.name} | {cfg.model.name} | {cfg.precision.name} | {len(frame) - failed} edited, "
              f"{failed} failed | {output_dir}")
        if metrics.unavailable:
            print(f"unavailable metrics (no backbone): {', '.join(metrics.unavailable)}")
        if cfg.metrics.get("label"):
            print(f"metric backbones: {cfg.metrics.label} (not comparable with the PIE-Bench reference backbones)")
        print(format_summary(summary))
        logger.log_summary(frame, summary, output_dir)
    return summary


def objective(summary: pd.DataFrame) -> float:
    """A scalar for Hydra sweepers: the overall CLIP-whole mean when available, else NaN."""
    rows = summary[summary["edit_type"] == "all"]
    if rows.empty or "clip_whole" not in rows:
        return math.nan
    return float(rows["clip_whole"].iloc[0])
