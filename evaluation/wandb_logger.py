"""One W&B run per job: config, per-item metrics, a table of source / edited images, the summary, result files.

Runs are offline by default and land in ``<output_dir>/wandb``; ``wandb sync <output_dir>/wandb/offline-run-*``
uploads them. The run is always finished on exit, also on error, so sequential multirun jobs never share a run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, cfg: DictConfig, output_dir: Path, group: str):
        self.cfg = cfg
        self.output_dir = output_dir
        self.group = cfg.logger.get("group") or group
        self.run = None
        self.table = None

    def __enter__(self) -> "RunLogger":
        if self.cfg.logger.name != "wandb" or self.cfg.logger.mode == "disabled":
            return self
        import wandb

        lg = self.cfg.logger
        self.run = wandb.init(
            project=lg.project, entity=lg.entity, group=self.group, job_type="edit",
            name=f"{self.cfg.editor.name}-{self.cfg.model.name}-{self.cfg.precision.name}-{self.output_dir.name}",
            tags=[self.cfg.editor.name, self.cfg.model.name, self.cfg.dataset.name, *lg.tags],
            config=OmegaConf.to_container(self.cfg, resolve=True), dir=str(self.output_dir), mode=lg.mode,
            reinit="finish_previous",
        )
        self.table = wandb.Table(columns=[
            "image_id", "edit_type", "source", "edited", "source_prompt", "target_prompt", "error",
            "psnr_unedit_part", "clip_similarity_target_image", "seconds", "nfe",
        ])
        return self

    def log_item(self, item, outcome) -> None:
        if self.run is None:
            return
        import wandb

        row = outcome.row
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log({f"item/{k}": v for k, v in numbers.items() if not (isinstance(v, float) and math.isnan(v))})
        if len(self.table.data) < self.cfg.logger.table_rows:
            self.table.add_data(
                item.image_id, item.edit_type,
                wandb.Image(outcome.source) if outcome.source is not None else None,
                wandb.Image(outcome.edited) if outcome.edited is not None else None,
                item.source_prompt, item.target_prompt, row["error"], row.get("psnr_unedit_part"),
                row.get("clip_similarity_target_image"), row.get("seconds"), row.get("nfe"),
            )

    def log_summary(self, results: pd.DataFrame, summary: pd.DataFrame, output_dir: Path) -> None:
        if self.run is None:
            return
        import wandb

        overall = summary[summary["edit_type"] == "all"]
        if not overall.empty:
            self.run.summary.update({k: v for k, v in overall.iloc[0].items() if k not in ("editor", "edit_type")})
        self.run.summary["failed_items"] = int((results["error"] != "").sum())
        self.run.log({"edits": self.table, "summary": wandb.Table(dataframe=summary)})
        artifact = wandb.Artifact(f"results-{self.run.id}", type="results")
        for name in ("results.csv", "summary.csv"):
            artifact.add_file(str(output_dir / name))
        self.run.log_artifact(artifact)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if exc_type else 0)
            self.run = None
