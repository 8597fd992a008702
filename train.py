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
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.cli import needs_launcher  # also the resolver of --help's config groups

if TYPE_CHECKING:  # torch, Lightning and the models load inside the functions: --help returns without them
    import pytorch_lightning as pl

    from icd.schedule import BoundarySchedule

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
    from icd.schedule import BoundarySchedule

    return BoundarySchedule(
        icd.num_steps,
        reverse=list(icd.reverse_boundaries) if icd.reverse_boundaries else None,
        forward=list(icd.forward_boundaries) if icd.forward_boundaries else None,
        num_ddim_steps=icd.num_ddim_steps, start=icd.start_timestep,
    )


def build_logger(logger: DictConfig, cfg: DictConfig, output_dir: Path, group: str):
    if logger.name == "none":
        return False
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    run = WandbLogger(project=logger.project, entity=logger.entity, mode=logger.mode, save_dir=str(output_dir),
                      group=logger.group or group, tags=list(logger.tags), name=output_dir.name,
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
        return str(own) if own.is_file() else None
    path = own if resume == "last" else Path(resume).expanduser()
    for candidate in (path, path / "last.ckpt", path / "checkpoints" / "last.ckpt"):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"resume={resume}: no checkpoint at {path} (nor last.ckpt in it or in its checkpoints/)")


# What a run may change when it continues a directory's checkpoint: its length and how it reports.
RESUMABLE = ("train.trainer.iterations", "train.trainer.progress_bar", "train.trainer.validation_every",
             "train.trainer.log_every", "train.trainer.checkpoint_every", "train.trainer.export_every",
             "train.trainer.export_dtype")


def check_same_run(cfg: DictConfig, output_dir: Path) -> None:
    """``<run dir>/job.json`` holds the settings the run's checkpoints were trained with; continuing them with other
    settings stops with the keys that differ (a new learning rate would be overridden by the restored optimizer)."""
    from experiments.harness import flatten, read_job, write_json

    settings = {k: v for key in ("model", "precision", "train", "seed")
                for k, v in flatten(OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key])
                                    else cfg[key], key).items()
                if not k.startswith("train.logger") and k not in RESUMABLE}
    if settings["train.method"] == "icd":  # the guidance distillation settings do not touch an iCD run
        settings = {k: v for k, v in settings.items() if not k.startswith("train.guidance.")}
    path = output_dir / "job.json"
    before = read_job(path).get("config")
    if before is not None:
        before.setdefault("train.method", "icd")  # runs made before guidance distillation existed: iCD ones
    # a setting the run's code did not have yet (absent from its job.json) is no change
    changed = [f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in sorted(before)
               if before.get(k) != settings.get(k)] if before is not None else []
    if changed:
        raise SystemExit(f"error: {output_dir} holds a run trained with other settings ({'; '.join(changed[:6])}): "
                         "choose another directory (hydra.run.dir=...), or name a checkpoint (resume=<file>.ckpt) "
                         "to start from it on purpose")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, {"config": settings})


def train(cfg: DictConfig, output_dir: Path, group: str) -> dict[str, float]:
    """One training run; returns the last validation metrics."""
    import pytorch_lightning as pl

    from experiments.console import quiet_libraries
    from icd.guidance import GuidancePolicy
    from icd.teacher import warn_outside_w_range
    from icd.training import ICDModule, LoraSettings, LossSettings, OptimSettings, load_teacher

    quiet_libraries(cfg.get("quiet", True))
    checkpoint = resume_checkpoint(cfg.resume, output_dir)
    if cfg.resume in (None, "", "auto", "last"):  # continuing (or starting) this directory's own run
        check_same_run(cfg, output_dir)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # the frozen VAE / text encoders are in eval mode on purpose; the other is Lightning's own deprecation
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    t = cfg.train
    if t.method == "guidance":
        return train_guidance(cfg, output_dir, group, checkpoint)
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
    return fit(cfg, module, components, output_dir / "lora", output_dir, group, checkpoint)


def train_guidance(cfg: DictConfig, output_dir: Path, group: str, checkpoint: str | None) -> dict[str, float]:
    """Guidance distillation of the plain base model into a w-conditioned teacher (<run dir>/teacher/)."""
    from icd.guidance_distillation import DistillSettings, GuidanceDistillationModule, WMixture
    from icd.training import OptimSettings
    from models.loading import load_components

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
    return fit(cfg, module, components, output_dir / "teacher", output_dir, group, checkpoint)


def fit(cfg: DictConfig, module: pl.LightningModule, components, export_dir: Path, output_dir: Path, group: str,
        checkpoint: str | None) -> dict[str, float]:
    """Lightning's fit of ``module`` on the configured data, exporting into ``export_dir``; the last validation."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from icd.data import ICDDataModule
    from icd.training import IterationProgressBar, PeriodicExport

    t = cfg.train
    datamodule = ICDDataModule(resolution=components.resolution, seed=cfg.seed,
                               **OmegaConf.to_container(t.data, resolve=True))
    steps = module.steps_per_iteration  # Lightning counts optimizer steps; the config counts iterations
    tc = t.trainer
    callbacks = [PeriodicExport(export_dir, tc.export_every, getattr(torch, tc.export_dtype))]
    if tc.progress_bar:
        callbacks.append(IterationProgressBar())
    if tc.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=output_dir / "checkpoints", every_n_train_steps=tc.checkpoint_every
                                         * steps, save_last=True, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, strategy=tc.strategy,
        precision=LIGHTNING_PRECISION[cfg.precision.dtype], max_steps=tc.iterations * steps,
        log_every_n_steps=max(1, tc.log_every), logger=build_logger(t.logger, cfg, output_dir, group),
        callbacks=callbacks, default_root_dir=str(output_dir), enable_progress_bar=tc.progress_bar,
        enable_checkpointing=bool(tc.checkpoint_every), enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, use_distributed_sampler=False,  # the data module splits its batches over the ranks
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
    finally:
        if trainer.logger:
            import wandb

            wandb.finish()  # one W&B run per job, also in a multirun
    return module.validation_history[-1] if module.validation_history else {}


@needs_launcher
@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode.name == "MULTIRUN" else output_dir.name
    metrics = train(cfg, output_dir, group)
    # a sweep objective: iCD's round-trip error, guidance distillation's mean single-pass error
    return metrics.get("val/latent_mse", metrics.get("val/rel_error_mean", math.nan))


if __name__ == "__main__":
    main()
