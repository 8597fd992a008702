"""Edit a benchmark with one editor and score it:  python run.py [group=option ...]  (-m for sweeps).

Defaults (conf/run.yaml): the tiny model, DDIM + Prompt-to-Prompt, the built-in PIE-Bench-format set, CPU when no
GPU is present, offline W&B. Each job writes results.csv, summary.csv, the edited images and its W&B run into its
Hydra output directory.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from evaluation.harness import RunError, objective, run

log = logging.getLogger("run")


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if multirun else output_dir.name
    (output_dir / "job_error.txt").unlink(missing_ok=True)  # from an earlier attempt of this job
    try:
        return objective(run(cfg, output_dir, group, hydra_cfg.job.override_dirname or "default"))
    except RunError as err:  # the configuration or the data: the message says what to do, no traceback needed
        if not multirun:
            sys.exit(f"error: {err}")  # to stderr, exit status 1
        log.error("job failed: %s", err)
        (output_dir / "job_error.txt").write_text(f"{err}\n")
        return math.nan
    except Exception as err:
        if not multirun:
            raise
        # In a sweep one failing job (say, out of memory in one precision) must not stop the others.
        log.exception("job failed: %s", err)
        (output_dir / "job_error.txt").write_text(f"{type(err).__name__}: {err}\n")
        return math.nan


if __name__ == "__main__":
    main()
