"""One W&B run per job: config, per-item metrics, a table of the edits, the summary, result files.

Runs are offline by default and land in ``<output_dir>/wandb`` with everything they hold (W&B's staging folder
for tables and artifacts is ``<output_dir>/wandb/data``); ``wandb sync <output_dir>/wandb/offline-run-*`` uploads
them. The run is always finished on exit, also on error (its summary then holds the ``error``), so sequential
multirun jobs never share a run and a job that fails as a whole still has one. The summary holds the aggregates of
``summary.csv`` (the ``item/*`` history is per item).

A job keeps one run id (``job.json``) across restarts. Resumed, the run first logs the history of the items that
earlier attempts finished (online: those past the resumed run's last step), and the edits table is built at the end
from ``results.csv`` and the saved images, so history and table cover every item whatever was killed when. Offline,
W&B starts a new folder for the same id: the folders of earlier, interrupted attempts move to ``wandb/superseded/``
(outside ``offline-run-*``), their content being in the new one.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from editlab.evaluation.ground_truth import ground_truth_file
from editlab.evaluation.piebench import EDIT_TYPES, edited_image_path
from editlab.evaluation.summary import ID_COLUMNS

log = logging.getLogger(__name__)

TABLE_IMAGES = ("source", "edited", "ground_truth", "mask")
TABLE_LABELS = ("image_id", "edit_type", "edit_type_name", "source_prompt", "target_prompt", "instruction", "error")


def attempt_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """The offline folders of run ``run_id``: ``offline-run-<time>-<id>``, or ``...-<id>-<n>`` when W&B started an
    attempt within the same second as an earlier one whose folder was still there."""
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    return sorted(p for p in wandb_dir.glob("offline-run-*") if pattern.fullmatch(p.name))


def free_name(path: Path) -> Path:
    """``path``, or ``path-<n>`` with the first n that names nothing yet."""
    n = 1
    candidate = path
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


class RunLogger:
    def __init__(self, cfg: DictConfig, output_dir: Path, group: str, run_id: str | None = None,
                 name: str | None = None):
        self.cfg = cfg
        self.output_dir = output_dir
        self.group = cfg.logger.get("group") or group
        self.run_id = run_id
        self.name = name or f"{cfg.editor.name}-{cfg.model.name}-{cfg.precision.name}"
        self.run = None
        self._data_dir: str | None = None

    def __enter__(self) -> "RunLogger":
        if self.cfg.logger.name != "wandb" or self.cfg.logger.mode == "disabled":
            return self
        import wandb

        lg = self.cfg.logger
        earlier = attempt_folders(self.output_dir / "wandb", self.run_id) if self.run_id else []
        # W&B stages table and artifact files in a global folder by default: keep them with the run
        self._data_dir = os.environ.get("WANDB_DATA_DIR")
        os.environ["WANDB_DATA_DIR"] = str(self.output_dir / "wandb" / "data")
        try:
            self.run = wandb.init(
                project=lg.project, entity=lg.entity, group=self.group, id=self.run_id,
                job_type=self.cfg.get("task", {}).get("name", "edit"),
                resume="allow" if self.run_id else None, name=self.name,
                tags=[self.cfg.editor.name, self.cfg.model.name, self.cfg.dataset.name, *lg.tags],
                config=OmegaConf.to_container(self.cfg, resolve=True), dir=str(self.output_dir), mode=lg.mode,
                reinit="finish_previous",
            )
        except BaseException:
            self._restore_data_dir()
            raise
        self.run.define_metric("item/*", summary="none")  # the summary holds the aggregates, not the last item
        live = Path(self.run.dir).resolve().parent  # a restart within the same second reuses the folder's name
        earlier = [folder for folder in earlier if folder.resolve() != live]
        if earlier and lg.mode == "offline":
            superseded = self.output_dir / "wandb" / "superseded"
            superseded.mkdir(exist_ok=True)
            for folder in earlier:
                folder.rename(free_name(superseded / folder.name))
            log.info("W&B: %d earlier attempt(s) of run %s moved to %s; this run logs every finished item again",
                     len(earlier), self.run_id, superseded)
        return self

    def set_model(self, model: str) -> None:
        """Name and tag the run by the model the editor runs on, where a variant of the configured model named
        another (the toy model sends the flow editors to the toy flow teacher)."""
        if self.run is None or model == self.cfg.model.name:
            return
        configured = re.escape(self.cfg.model.name)
        self.run.name = re.sub(rf"(?<![^\s-]){configured}(?![^\s-])", model, self.run.name, count=1)
        self.run.tags = tuple(model if tag == self.cfg.model.name else tag for tag in self.run.tags)

    def log_history(self, rows: pd.DataFrame) -> None:
        """The per-item history of rows finished by earlier attempts: all of them in a new run (offline, W&B starts
        one per attempt); online, those past the resumed run's last step."""
        if self.run is None:
            return
        for row in rows.iloc[self.run.step:].to_dict("records"):
            self.log_item(row)

    def log_item(self, row: dict) -> None:
        if self.run is None:
            return
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log({f"item/{k}": v for k, v in numbers.items() if not (isinstance(v, float) and math.isnan(v))})

    def _table(self, results: pd.DataFrame, output_dir: Path, dataset):
        """Up to ``logger.table_rows`` items, taken in turn from each edit type: the source, the edit, the true edit
        and the mask where the benchmark has them, the prompts and every metric."""
        import wandb

        items = {item.image_id: item for item in dataset}
        rows = results[results["image_id"].isin(items)]
        by_type = [group.to_dict("records") for _, group in rows.groupby("edit_type", sort=True)]
        picked = [group[k] for k in range(max(map(len, by_type), default=0)) for group in by_type if k < len(group)]
        values = [key for key in results if key not in ID_COLUMNS]  # the columns its metrics declared, the costs
        table = wandb.Table(columns=[*TABLE_LABELS[:3], *TABLE_IMAGES, *TABLE_LABELS[3:], *values])
        for row in picked[: self.cfg.logger.table_rows]:
            item = items[row["image_id"]]
            truth = ground_truth_file(dataset.root, item.image_path)
            try:
                mask = dataset.load_mask(item)  # None: the benchmark has no masks
                mask = None if mask is None else Image.fromarray((mask * 255).astype(np.uint8))
            except (ValueError, OSError):  # a malformed or missing mask: its row already says so
                mask = None
            table.add_data(
                item.image_id, item.edit_type, EDIT_TYPES.get(item.edit_type, ""),
                _source_image(dataset, item),
                _image(edited_image_path(output_dir, item)) if not row["error"] else None,
                _image(truth) if truth else None, wandb.Image(mask) if mask is not None else None,
                item.source_prompt, item.target_prompt, item.instruction, row["error"],
                *[row.get(key) for key in values],
            )
        return table

    def log_summary(self, results: pd.DataFrame, summary: pd.DataFrame, output_dir: Path, dataset) -> None:
        if self.run is None:
            return
        import wandb

        overall = summary[summary["edit_type"] == "all"]
        if not overall.empty:
            self.run.summary.update({k: v for k, v in overall.iloc[0].items() if k not in ("editor", "edit_type")})
        self.run.summary["failed_items"] = int((results["error"] != "").sum())
        self.run.log({"edits": self._table(results, output_dir, dataset), "summary": wandb.Table(dataframe=summary)})
        artifact = wandb.Artifact(f"results-{self.run.id}", type="results")
        for name in ("results.csv", "summary.csv"):
            artifact.add_file(str(output_dir / name))
        self.run.log_artifact(artifact)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            if exc is not None:  # a job that failed as a whole: its run says why
                self.run.summary["error"] = f"{type(exc).__name__}: {exc}"
            self.run.finish(exit_code=1 if exc_type else 0)
            self.run = None
            self._restore_data_dir()

    def _restore_data_dir(self) -> None:
        if self._data_dir is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = self._data_dir


def _image(path: Path):
    """A W&B image of the file at ``path``; None when it is missing or unreadable."""
    import wandb

    try:
        with Image.open(path) as image:
            return wandb.Image(image.convert("RGB"))
    except (OSError, ValueError):
        return None


def _source_image(dataset, item):
    """The item's source image; None for a caption without one (text-to-image benchmarks)."""
    try:
        return _image(dataset.image_file(item))
    except FileNotFoundError:
        return None
