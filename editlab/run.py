"""Edit a benchmark with one editor and score it:  python run.py [group=option ...]  (-m for sweeps).
``task=inversion`` reconstructs each source image instead, ``task=generation`` generates from each caption.

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

from editlab.experiments.cli import needs_launcher, run_names  # also the resolver of --help's config groups

log = logging.getLogger("run")


def wandb_names(cfg: DictConfig, hydra_cfg, output_dir: Path, multirun: bool) -> tuple[str, str]:
    """The W&B group (the experiment and, in a sweep, its start time ``cfg.started``, wherever its folder is:
    ``toy_tour 2026-12-01 10-06-15``; a single run: the date) and a short run name (``3 ddim_p2p toy fp32``, the
    job number first in a sweep; a single run's ends with its folder's time)."""
    experiment = hydra_cfg.runtime.choices.get("experiment") or ("sweep" if multirun else "run")
    return run_names(experiment, f"{cfg.editor.name} {cfg.model.name} {cfg.precision.name}", output_dir,
                     hydra_cfg.job.num if multirun else None, cfg.started if multirun else None)


def one_editor_is_one_run(argv: list[str]) -> list[str]:
    """``python run.py editor=X`` on the default experiment (the toy tour, a sweep over every editor) is one run of
    X: a single job in ``hydra.run.dir`` (default ``outputs/<date>/<time>_<editor>_<model>_<precision>``), not a
    one-job sweep. Several editors (``editor=a,b``), ``-m`` or another experiment keep their own mode."""
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    experiments = [a for a in overrides if a.lstrip("+~").split("=", 1)[0] == "experiment"]
    editors = [a.split("=", 1)[1] for a in overrides if a.lstrip("+").split("=", 1)[0] == "editor"]
    if any(a in ("-m", "--multirun") for a in argv) or experiments not in ([], ["experiment=toy_tour"]):
        return argv
    if len(editors) == 1 and "," not in editors[0] and "(" not in editors[0]:
        return [*argv, "hydra.mode=RUN"]
    return argv


def main() -> float:
    """``python run.py`` and ``editlab-run``: the Hydra program, with `one_editor_is_one_run` applied to the
    command line."""
    sys.argv = one_editor_is_one_run(sys.argv)
    return run_job()


@needs_launcher
@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def run_job(cfg: DictConfig) -> float:
    from editlab.experiments.harness import RunError, objective, run  # torch and diffusers: not before --help

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group, name = wandb_names(cfg, hydra_cfg, output_dir, multirun)
    (output_dir / "job_error.txt").unlink(missing_ok=True)  # from an earlier attempt of this job
    try:
        label = cfg.get("paper_row") or hydra_cfg.job.override_dirname or "default"  # a paper row names its runs
        return objective(run(cfg, output_dir, group, label, name,
                             hydra_cfg.job.num if multirun else None))
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
