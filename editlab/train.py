"""Train iCD (forward + reverse LoRA students of a CFG-distilled teacher):  python train.py [group=option ...]

Defaults (conf/train.yaml): the tiny teacher on a generated captioned toy set, CPU when no GPU is present, a few
dozen iterations, W&B offline into the run directory, adapters exported to <run dir>/lora/. The training groups
live under ``train/`` and their keys under ``train.``. Real runs pick a preset, e.g. ``python train.py
train/experiment=sd15_reference train.teacher.checkpoint=/ckpt/sd15_cfg_distill.pt
train.data.root=/data/coco/train2014 train.data.annotations=/data/coco/annotations/captions_train2014.json``.

Sweeps: ``python train.py -m train.icd.num_steps=3,4`` runs the jobs one after another (single device each).

Multi-GPU / multi-node: DDP, one process per GPU. Never combine Hydra ``-m`` with Lightning's own ddp launcher
(it re-executes sys.argv, so each rank would start its own sweep). Either let Lightning spawn the local ranks of
one run:
    python train.py train.trainer.devices=8 train.trainer.strategy=ddp_find_unused_parameters_true ...
or start every rank yourself (torchrun / srun set the environment Lightning reads), e.g. on each of 2 nodes:
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 train.py \
        train.trainer.devices=8 train.trainer.num_nodes=2 train.trainer.strategy=ddp_find_unused_parameters_true \
        hydra.run.dir=/shared/runs/icd_sd15 ...
(with SLURM: ``srun --ntasks-per-node 8 python train.py train.trainer.num_nodes=2 ...``; give every rank the same
``hydra.run.dir``). ``find_unused_parameters`` is needed because each loss reaches only one adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shlex
import signal
import sys
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from editlab.experiments.cli import needs_launcher, run_names  # also the resolver of --help's config groups

if TYPE_CHECKING:  # torch, Lightning and the models load inside the functions: --help returns without them
    import pytorch_lightning as pl

    from editlab.icd.schedule import BoundarySchedule

log = logging.getLogger("train")

LIGHTNING_PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}


def settings(cls: type, group: DictConfig, key: str):
    """The config group at ``key`` as ``cls`` (its keys are the settings class's field names); a key the class does
    not have stops with the key's path."""
    values = OmegaConf.to_container(group, resolve=True)
    fields = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(values) - fields):
        raise SystemExit(f"error: {key} has no setting {', '.join(unknown)}; it takes: {', '.join(sorted(fields))}")
    return cls(**values)


def build_schedule(icd: DictConfig) -> BoundarySchedule:
    from editlab.icd.schedule import BoundarySchedule

    return BoundarySchedule(
        icd.num_steps,
        reverse=list(icd.reverse_boundaries) if icd.reverse_boundaries else None,
        forward=list(icd.forward_boundaries) if icd.forward_boundaries else None,
        num_ddim_steps=icd.num_ddim_steps, start=icd.start_timestep,
    )


def wandb_names(cfg: DictConfig, hydra_cfg, output_dir: Path, multirun: bool) -> tuple[str, str]:
    """Named as run.py names editing runs: the group is the preset and the run's date (a sweep's: and time), the
    name what trains and the run's time (``icd toy fp32 10-06-15``; a sweep's job number first)."""
    experiment = hydra_cfg.runtime.choices.get("train/experiment") or ("sweep" if multirun else "run")
    sweep = Path(hydra_cfg.sweep.dir) if multirun else None  # its folder is named by its start: <date>/<time>
    return run_names(experiment, f"{cfg.train.method} {cfg.model.name} {cfg.precision.name}", output_dir,
                     hydra_cfg.job.num if multirun else None,
                     f"{sweep.parent.name} {sweep.name.split('_', 1)[0]}" if sweep else None)


def build_logger(logger: DictConfig, cfg: DictConfig, output_dir: Path, group: str, name: str, run_id: str):
    if logger.name == "none":
        return False
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    run = WandbLogger(project=logger.project, entity=logger.entity, mode=logger.mode, save_dir=str(output_dir),
                      group=logger.group or group, tags=list(logger.tags), name=name, id=run_id,  # resumes the run
                      config=OmegaConf.to_container(cfg, resolve=True),
                      settings=wandb.Settings(silent=cfg.get("quiet", True)))
    run._wandb_init.pop("anonymous", None)  # Lightning always passes it; W&B warns that it is deprecated
    return run


def resume_checkpoint(resume: str | None, output_dir: Path) -> str | None:
    """The checkpoint ``resume`` names: ``null`` (default) = the run directory's ``checkpoints/last.ckpt`` when it
    exists, so re-running into a directory continues it rather than starting over; ``last`` = that one, which must
    exist; a ``.ckpt`` file; or a run directory or checkpoints folder (its ``last.ckpt``)."""
    own = output_dir / "checkpoints" / "last.ckpt"
    if resume in (None, "", "auto"):
        return check_intact(own) if own.is_file() else None
    path = own if resume == "last" else Path(resume).expanduser()
    for candidate in (path, path / "last.ckpt", path / "checkpoints" / "last.ckpt"):
        if candidate.is_file():
            return check_intact(candidate)
    raise FileNotFoundError(f"resume={resume}: no checkpoint at {path} (nor last.ckpt in it or in its checkpoints/)")


def intact(path: Path) -> bool:
    """Whether a checkpoint (torch.save's zip) is whole: a kill while it was written leaves it truncated."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def check_intact(path: Path) -> str:
    """``path``, or an error naming it and the newest intact checkpoint beside it to continue from instead."""
    if intact(path):
        return str(path)
    others = sorted((p for p in path.parent.glob("*.ckpt") if p != path), key=lambda p: p.stat().st_mtime)
    newest = next((p for p in reversed(others) if intact(p)), None)
    then = (f"continue from the newest intact one with resume={newest}" if newest else
            "there is no intact checkpoint beside it: move it away to start over")
    raise SystemExit(f"error: the checkpoint {path} is damaged or truncated (a kill while it was written?): {then}")


# What a run may change when it continues a directory's checkpoint: its length and how it reports.
RESUMABLE = ("train.trainer.iterations", "train.trainer.progress_bar", "train.trainer.validation_every",
             "train.trainer.log_every", "train.trainer.checkpoint_every", "train.trainer.keep_checkpoints",
             "train.trainer.export_every", "train.trainer.export_dtype")


def job_record(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """What ``<run dir>/job.json`` holds once training starts (`OnTrainStart` in `fit`): the settings the run's
    checkpoints are trained with and its W&B run id, which a resumed run logs on into. Continuing the directory's
    own run (resume null or last) with other settings stops with the keys that differ (a new learning rate would be
    overridden by the restored optimizer)."""
    from editlab.experiments.harness import flatten, read_job

    settings = {k: v for key in ("model", "precision", "train", "seed")
                for k, v in flatten(OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key])
                                    else cfg[key], key).items()
                if not k.startswith("train.logger") and k not in RESUMABLE}
    if settings["train.method"] == "icd":  # the guidance distillation settings do not touch an iCD run
        settings = {k: v for k, v in settings.items() if not k.startswith("train.guidance.")}
    job = read_job(output_dir / "job.json")
    before = job.get("config") if cfg.resume in (None, "", "auto", "last") else None
    if before is not None:
        before.setdefault("train.method", "icd")  # runs made before guidance distillation existed: iCD ones
    # a setting the run's code did not have yet (absent from its job.json) is no change
    changed = [f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in sorted(before)
               if before.get(k) != settings.get(k)] if before is not None else []
    if changed:
        raise SystemExit(f"error: {output_dir} holds a run trained with other settings ({'; '.join(changed[:6])}): "
                         "choose another directory (hydra.run.dir=...), or name a checkpoint (resume=<file>.ckpt) "
                         "to start from it on purpose")
    return {"config": settings, "wandb_id": job.get("wandb_id") or uuid.uuid4().hex[:12]}


def resume_command(output_dir: Path) -> str:
    """The command that continues this run: its overrides (less any resume=), into its directory."""
    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in given if o.split("=", 1)[0].lstrip("+~") not in ("resume", "hydra.run.dir")]
    return shlex.join(["python", "train.py", *kept, f"hydra.run.dir={output_dir}"])


def train(cfg: DictConfig, output_dir: Path, group: str, name: str | None = None) -> dict[str, float]:
    """One training run, W&B ``group`` and ``name`` (default: the run directory's); the last validation metrics."""
    import pytorch_lightning as pl

    from editlab.experiments.console import quiet_libraries
    from editlab.icd.guidance import GuidancePolicy
    from editlab.icd.teacher import warn_outside_w_range
    from editlab.icd.training import ICDModule, LoraSettings, LossSettings, OptimSettings, load_teacher

    quiet_libraries(cfg.get("quiet", True))
    checkpoint = resume_checkpoint(cfg.resume, output_dir)
    job = job_record(cfg, output_dir)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # the frozen VAE / text encoders are in eval mode on purpose; the other is Lightning's own deprecation
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # every checkpoint is taken after its iteration's optimizer steps on purpose; Lightning suggests otherwise
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    # re-running into a run directory continues its checkpoints: that is what it is for
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty", category=UserWarning)
    t = cfg.train
    if t.method == "guidance":
        return train_guidance(cfg, output_dir, checkpoint, group, name or output_dir.name, job)
    if t.method != "icd":
        raise SystemExit(f"error: unknown train.method={t.method!r}; expected icd or guidance")
    schedule = build_schedule(t.icd)
    log.info("iCD with %s; inference reverse %s, forward %s", schedule, schedule.reverse_steps,
             schedule.forward_steps)
    components = load_teacher(cfg.model, cfg.precision, t.teacher)
    policy = GuidancePolicy(scale=t.icd.guidance.eval_scale, tau=t.icd.guidance.eval_tau,
                            train_scales=tuple(float(w) for w in t.icd.guidance.train_scales))
    warn_outside_w_range(components.unet, [*policy.train_scales, policy.scale], "train.icd.guidance")
    module = ICDModule(
        components, schedule, policy, guidance=t.teacher.guidance,
        lora=settings(LoraSettings, t.icd.lora, "train.icd.lora"),
        loss=settings(LossSettings, t.icd.loss, "train.icd.loss"),
        optim=settings(OptimSettings, t.optim, "train.optim"),
        gradient_checkpointing=t.trainer.gradient_checkpointing, validation_every=t.trainer.validation_every,
        validation_seed=cfg.seed,
    )
    return fit(cfg, module, components, output_dir / "lora", output_dir, checkpoint, group, name or output_dir.name,
               job)


def train_guidance(cfg: DictConfig, output_dir: Path, checkpoint: str | None, group: str, name: str,
                   job: dict[str, Any]) -> dict[str, float]:
    """Guidance distillation of the plain base model into a w-conditioned teacher (<run dir>/teacher/)."""
    from editlab.icd.guidance_distillation import DistillSettings, GuidanceDistillationModule, WMixture
    from editlab.icd.training import OptimSettings
    from editlab.models.loading import load_components

    t = cfg.train
    values = OmegaConf.to_container(t.guidance, resolve=True)
    mixture = WMixture(**values.pop("mixture", {}))
    distill = settings(DistillSettings, OmegaConf.create(values), "train.guidance")
    if "lcm" in str(cfg.model.get("lora") or "").lower():
        raise SystemExit(f"error: model={cfg.model.name} fuses the LCM-LoRA {cfg.model.lora} into the base: guidance "
                         "distillation starts from the plain checkpoint; give model.lora=null "
                         "(train/experiment=sdxl_guidance does)")
    components = load_components(cfg.model, cfg.precision, {"mode": "none"}, "cpu")
    if components.unet.config.get("time_cond_proj_dim"):
        raise SystemExit(f"error: the UNet of model={cfg.model.name} already takes a w-embedding (time_cond_proj_dim="
                         f"{components.unet.config.time_cond_proj_dim}: an LCM or CFG-distilled UNet); guidance "
                         "distillation starts from a plain one (e.g. model.unet_path=null for ssd1b)")
    log.info("guidance distillation of %s: %s student, w-embedding %d, w ~ %s", cfg.model.name, distill.variant,
             distill.embed_dim, mixture)
    module = GuidanceDistillationModule(
        components, dataclasses.replace(distill, mixture=mixture), settings(OptimSettings, t.optim, "train.optim"),
        gradient_checkpointing=t.trainer.gradient_checkpointing, validation_every=t.trainer.validation_every,
        validation_seed=cfg.seed,
    )
    return fit(cfg, module, components, output_dir / "teacher", output_dir, checkpoint, group, name, job)


def fit(cfg: DictConfig, module: pl.LightningModule, components, export_dir: Path, output_dir: Path,
        checkpoint: str | None, group: str, name: str, job: dict[str, Any]) -> dict[str, float]:
    """Lightning's fit of ``module`` on the configured data, exporting into ``export_dir``; the last validation.
    On SIGTERM or SIGINT the run stops after checkpointing its running iteration (exit status 128 + the signal)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from editlab.experiments.harness import write_json
    from editlab.icd.data import ICDDataModule
    from editlab.icd.training import IterationCheckpoint, IterationProgressBar, OnTrainStart, PeriodicExport

    t = cfg.train
    datamodule = ICDDataModule(resolution=components.resolution, seed=cfg.seed,
                               **OmegaConf.to_container(t.data, resolve=True))
    steps = module.steps_per_iteration  # Lightning counts optimizer steps; the config counts iterations
    tc = t.trainer
    callbacks = [PeriodicExport(export_dir, tc.export_every, getattr(torch, tc.export_dtype)),
                 # job.json once training has started: a run stopped by a start-up error leaves none, so its
                 # corrected re-run is not refused as a run trained with other settings
                 OnTrainStart(lambda: write_json(output_dir / "job.json", job))]
    if tc.progress_bar:
        callbacks.append(IterationProgressBar())
    checkpoints = IterationCheckpoint(output_dir / "checkpoints", tc.checkpoint_every, steps, tc.keep_checkpoints)
    if tc.checkpoint_every:
        callbacks.append(checkpoints)
    trainer = pl.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, strategy=tc.strategy,
        precision=LIGHTNING_PRECISION[cfg.precision.dtype], max_steps=tc.iterations * steps,
        log_every_n_steps=max(1, tc.log_every),
        logger=build_logger(t.logger, cfg, output_dir, group, name, job["wandb_id"]),
        callbacks=callbacks, default_root_dir=str(output_dir), enable_progress_bar=tc.progress_bar,
        enable_checkpointing=bool(tc.checkpoint_every), enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, use_distributed_sampler=False,  # the data module splits its batches over the ranks
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)  # no code from a file
    except SIGTERMException:  # Lightning's stop on SIGTERM, or on Ctrl-C passed on as one: between iterations
        stopped_by = checkpoints.stopped_by or "SIGTERM"
        saved = checkpoints.best_model_path or checkpoints.last_model_path or "nothing (checkpoint_every=0)"
        log.warning("%s: stopped after iteration %d, saved %s; resume with: %s", stopped_by, module.iteration, saved,
                    resume_command(output_dir))
        raise SystemExit(128 + getattr(signal, stopped_by)) from None
    finally:
        if trainer.logger:
            import wandb

            wandb.finish()  # one W&B run per job, also in a multirun
    return module.validation_history[-1] if module.validation_history else {}


@needs_launcher
@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from editlab.icd.training import SettingError

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    os.environ.setdefault("WANDB_DATA_DIR", str(output_dir / "wandb" / "data"))  # W&B stages artifacts there
    try:
        metrics = train(cfg, output_dir, *wandb_names(cfg, hydra_cfg, output_dir, hydra_cfg.mode.name == "MULTIRUN"))
    except SettingError as err:  # the message names the key and what to do: no traceback
        sys.exit(f"error: {err}")
    # a sweep objective: iCD's round-trip error, guidance distillation's mean single-pass error
    return metrics.get("val/latent_mse", metrics.get("val/rel_error_mean", math.nan))


if __name__ == "__main__":
    main()
