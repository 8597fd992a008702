"""Guidance distillation: the w-conditioned teacher eps(x_t, t, c, w) that iCD needs, from a plain checkpoint.

Meng et al.'s stage one, as the iCD maintainers describe their released teachers: one UNet call reproduces
two-pass classifier-free guidance at any strength w. Per batch (clean latents x0 [B, 4, h, w], captions):

1. Draw a noise, a timestep t per sample (uniform over 0..999, or the 50-step DDIM grid 19, 39, ..., 999 the iCD
   solvers query) and a w per sample from `WMixture` (code units: eps_c + w (eps_c - eps_u), w = 0 is the
   conditional prediction; a share at exactly 0, a share on iCD's discrete training scales, the rest uniform).
2. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. Or (``inputs: trajectories``, AGD's idea: train on the states
   the guided sampler visits, not on noised data) x_t is a state of the base's own CFG sampling trajectory for the
   caption at its w, at a random step of ``trajectory_steps`` DDIM steps (`trajectory_points`); the images are
   then unused.
3. Target (no gradient): the frozen base UNet's two-pass CFG, eps_c + w (eps_c - eps_u), with the empty prompt as
   the null prompt (`models.guidance.unet_guidance`, ``cfg``: one call of batch 2B, or B when every w is 0).
4. Student: the base UNet with a w-embedding (diffusers' ``time_cond_proj_dim``, the sinusoidal embedding of 1000 w
   that the released teachers use, `models.guidance.guidance_embedding`) and a zero-initialised projection, so that
   at step 0 it equals the conditional teacher at every w. ``full``: every weight trains (as the released
   teachers); ``lora``: a LoRA adapter plus the projection train, the base weights stay shared and frozen.
5. Loss: MSE on eps per sample, optionally min-SNR-gamma weighted, averaged; logged per w bucket.

Export: the student's full state dict (LoRA merged in) as ``cfg_distill.safetensors``, the layout of
``sd15_cfg_distill.pt``: ``train.teacher.checkpoint`` and ``editor.teacher_checkpoint`` load it like the released
files (`icd.teacher.load_cfg_distilled`). Validation (with the EMA weights when there are) reports, on a held-out
batch with fixed noise and timesteps, the relative error ||eps_student(w) - eps_cfg(w)|| / ||eps_cfg(w)|| per w
beside that of the undistilled model (w ignored: eps_c), and writes samples at several w, single-pass beside
two-pass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from editlab.diffusion.ddim import add_noise
from editlab.diffusion.schedules import VPSchedule
from editlab.diffusion.solver import solve
from editlab.icd.lora import lora_config
from editlab.icd.teacher import add_guidance_embedding
from editlab.icd.training import FrozenPartsModule, OptimSettings, labelled_grid
from editlab.models.components import Components, vae_decode
from editlab.models.conditioning import Conditioning
from editlab.models.guidance import Guidance, unet_guidance
from editlab.models.images import to_unit_range

log = logging.getLogger(__name__)

CFG_ADAPTER = "cfg"
VARIANTS = ("full", "lora")
TIMESTEPS = ("uniform", "ddim_grid")
INPUTS = ("noised", "trajectories")


@dataclass(frozen=True)
class WMixture:
    """The distribution of w (code units) over training samples: ``zero`` at w = 0, ``p_discrete`` on ``discrete``
    (uniformly), the rest uniform in [``low``, ``high``]."""

    zero: float = 0.2
    discrete: Sequence[float] = (7.0, 11.0, 15.0, 19.0)
    p_discrete: float = 0.4
    low: float = 0.0
    high: float = 19.0

    def __post_init__(self):
        if not (0 <= self.zero and 0 <= self.p_discrete and self.zero + self.p_discrete <= 1):
            raise ValueError(f"w mixture shares zero={self.zero}, p_discrete={self.p_discrete} must be >= 0 and sum "
                             "to at most 1")
        if self.low > self.high or self.low < 0:
            raise ValueError(f"w range [{self.low}, {self.high}] must be ordered and >= 0")

    def sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """w per sample [batch]."""
        u = torch.rand(batch, generator=generator)
        uniform = self.low + (self.high - self.low) * torch.rand(batch, generator=generator)
        discrete = torch.tensor(list(self.discrete) or [0.0], dtype=torch.float32)
        picked = discrete[torch.randint(len(discrete), (batch,), generator=generator)]
        w = torch.where(u < self.zero + self.p_discrete, picked, uniform)
        return torch.where(u < self.zero, torch.zeros(batch), w)

    @property
    def eval_scales(self) -> list[float]:
        """The w the validation reports: 0, the discrete scales and the range's end."""
        return sorted({0.0, *map(float, self.discrete), float(self.high)})

    def bucket(self, w: float) -> str:
        return "w0" if w == 0 else "discrete" if any(math.isclose(w, d) for d in self.discrete) else "uniform"


@dataclass(frozen=True)
class DistillSettings:
    """The student and its objective (``train.guidance``)."""

    variant: str = "full"        # full | lora
    embed_dim: int = 512         # time_cond_proj_dim, as the released teachers
    timesteps: str = "uniform"   # uniform over 0..999 | ddim_grid (19, 39, ..., 999)
    inputs: str = "noised"       # noised: x_t from the data's latents | trajectories: from the base's CFG samples
    trajectory_steps: int = 10   # inputs=trajectories: DDIM steps of the sampled trajectories
    snr_gamma: float = 0.0       # > 0: min-SNR-gamma weights; 0: plain MSE
    ema_decay: float = 0.0       # > 0: the export is an EMA of the student's trainable weights
    lora_rank: int = 64          # variant lora
    lora_alpha: float = 64
    mixture: WMixture = WMixture()


def min_snr_weight(abar: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample (eps prediction); ones for gamma = 0."""
    if gamma <= 0:
        return torch.ones_like(abar)
    snr = abar / (1 - abar)
    return torch.clamp(snr, max=gamma) / snr


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """||prediction - target|| / ||target|| over the whole batch."""
    return ((prediction - target).norm() / target.norm().clamp_min(1e-12)).item()


@torch.no_grad()
def guidance_errors(target: Guidance, single_pass: Guidance, x0: torch.Tensor, text: Conditioning,
                    alphas_cumprod: torch.Tensor, scales: Sequence[float], timesteps: Sequence[int] = (259, 519, 779),
                    seed: int = 0) -> dict[float, tuple[float, float]]:
    """{w: (relative error of ``single_pass`` at w, that of ``target`` at w = 0, i.e. the undistilled model with w
    ignored)} against ``target`` (two-pass CFG) at w, on ``x0`` [B, 4, h, w] noised to each of ``timesteps`` with
    fixed noise; each error is the mean over the timesteps."""
    generator = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x0.shape, generator=generator).to(x0.device) for _ in timesteps]
    out = {}
    for w in scales:
        ws = torch.full((x0.shape[0],), float(w), device=x0.device)
        errors, ignored = [], []
        for t, noise in zip(timesteps, noises):
            x_t = add_noise(x0, noise, t, alphas_cumprod)
            reference = target(x_t, t, text, ws)
            errors.append(relative_error(single_pass(x_t, t, text, ws), reference))
            ignored.append(relative_error(target(x_t, t, text, torch.zeros_like(ws)), reference))
        out[float(w)] = (float(np.mean(errors)), float(np.mean(ignored)))
    return out


@torch.no_grad()
def sample_latents(model: Guidance, text: Conditioning, w: float, shape: Sequence[int],
                   alphas_cumprod: torch.Tensor, num_steps: int = 10, seed: int = 0) -> torch.Tensor:
    """DDIM (eta = 0) samples [B, C, h, w] of ``model`` at guidance ``w`` from seeded noise of ``shape``."""
    device = alphas_cumprod.device
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(device)
    ws = torch.full((shape[0],), float(w), device=device)
    schedule = VPSchedule(alphas_cumprod)
    return solve(x, schedule.pairs(num_steps), lambda i, x, t: model(x, t, text, ws), schedule)[-1]


class GuidanceDistillationModule(FrozenPartsModule):
    def __init__(self, components: Components, settings: DistillSettings = DistillSettings(),
                 optim: OptimSettings = OptimSettings(), gradient_checkpointing: bool = False,
                 validation_every: int = 0, validation_seed: int = 0):
        if settings.variant not in VARIANTS or settings.timesteps not in TIMESTEPS or settings.inputs not in INPUTS:
            raise ValueError(f"train.guidance.variant={settings.variant!r} / timesteps={settings.timesteps!r} / "
                             f"inputs={settings.inputs!r}: expected one of {VARIANTS} / {TIMESTEPS} / {INPUTS}")
        if settings.trajectory_steps < 1:
            raise ValueError(f"train.guidance.trajectory_steps={settings.trajectory_steps} must be >= 1")
        super().__init__(components, optim, validation_every, validation_seed)
        self.settings, self.mixture = settings, settings.mixture
        self.latent_size = components.latent_size

        # 1. the frozen base (the target's two passes) and the student, w-embedded and zero-initialised
        self.teacher_unet = components.unet.eval().requires_grad_(False)
        base = copy.deepcopy(components.unet) if settings.variant == "full" else components.unet
        self.student = add_guidance_embedding(base, settings.embed_dim, init="zeros")  # lora: shares base weights
        if settings.variant == "full":
            self.student.float().requires_grad_(True)
        else:
            self.student.add_adapter(lora_config(settings.lora_rank, settings.lora_alpha), adapter_name=CFG_ADAPTER)
            for name, p in self.student.named_parameters():
                trainable = ".lora_" in name or name.startswith("time_embedding.cond_proj")
                p.requires_grad_(trainable)
                if trainable:
                    p.data = p.data.float()
        if gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.student.train()
        self.ema: dict[str, torch.Tensor] = {}
        if settings.ema_decay > 0:
            self.ema = {n: p.detach().clone() for n, p in self.trainable().items()}
        self._guided: tuple[Guidance, Guidance] | None = None

    steps_per_iteration = 1
    progress_name = "guidance"

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.student.named_parameters() if p.requires_grad}

    def frozen_modules(self) -> tuple[torch.nn.Module | None, ...]:
        return *super().frozen_modules(), self.teacher_unet

    # -- networks -------------------------------------------------------------------------------------------------
    @property
    def guided(self) -> tuple[Guidance, Guidance]:
        """(two-pass CFG of the frozen base, the single-pass student)."""
        if self._guided is None:
            self._guided = (unet_guidance(self.teacher_unet, "cfg", self.unconditional()),
                            unet_guidance(self.student, "embedded"))
        return self._guided

    def draw_timesteps(self, batch: int) -> torch.Tensor:
        if self.settings.timesteps == "ddim_grid":
            return (torch.randint(0, 50, (batch,)) * 20 + 19).to(self.device)
        return torch.randint(0, len(self.alphas_cumprod), (batch,), device=self.device)

    def losses(self, x0: torch.Tensor, text: Conditioning, noise: torch.Tensor, t: torch.Tensor,
               w: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted MSE between the student and the two-pass target on ``x0`` noised to t [B]."""
        x_t = add_noise(x0, noise, t, self.alphas_cumprod)
        with torch.no_grad():
            target = self.guided[0](x_t, t, text, w)
        return self.student_losses(x_t, t, text, w, target)

    def student_losses(self, x_t: torch.Tensor, t: torch.Tensor, text: Conditioning, w: torch.Tensor,
                       target: torch.Tensor) -> torch.Tensor:
        prediction = self.guided[1](x_t, t, text, w)
        per_sample = (prediction.float() - target).pow(2).flatten(1).mean(1)
        return per_sample * min_snr_weight(self.alphas_cumprod[t], self.settings.snr_gamma)

    @torch.no_grad()
    def trajectory_points(self, text: Conditioning, w: torch.Tensor, shape: Sequence[int],
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """AGD-style inputs: (x_t [B, C, h, w], t [B], two-pass target [B, C, h, w]) at one random step per sample
        of the frozen base's own CFG sampling trajectory (``trajectory_steps`` DDIM steps from noise, each sample
        at its w). The sampler computes the target at each state anyway, so it costs no extra call; the batch
        runs only as far as its deepest drawn step."""
        schedule = VPSchedule(self.alphas_cumprod)
        pairs = schedule.pairs(self.settings.trajectory_steps)
        step = torch.randint(0, len(pairs), (shape[0],), generator=generator).to(self.device)
        x = torch.randn(tuple(shape), generator=generator).to(self.device)
        x_t, target = torch.empty_like(x), torch.empty_like(x)
        t = torch.empty(shape[0], dtype=torch.long, device=self.device)

        def record(i: int, x: torch.Tensor, t_i: int) -> torch.Tensor:
            eps = self.guided[0](x, t_i, text, w)
            here = step == i
            x_t[here], target[here], t[here] = x[here], eps[here], t_i
            return eps

        solve(x, pairs[: int(step.max()) + 1], record, schedule)
        return x_t, t, target

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.batches_seen += 1
        self.skipped += int(batch["skipped"])
        if not batch["captions"]:
            return None
        text = self.encode_text(batch["captions"])
        w = self.mixture.sample(len(batch["captions"])).to(self.device)
        if self.settings.inputs == "trajectories":  # the captions only: the states come from the base's samples
            shape = (len(w), self.student.config.in_channels, self.latent_size, self.latent_size)
            x_t, t, target = self.trajectory_points(text, w, shape)
            per_sample = self.student_losses(x_t, t, text, w, target)
        else:
            x0 = batch["latents"].float() if "latents" in batch else self.encode_images(batch["pixels"])
            per_sample = self.losses(x0, text, torch.randn_like(x0), self.draw_timesteps(x0.shape[0]), w)
        loss = per_sample.mean()
        self._step(loss, self.optimizers(), self.lr_schedulers())
        if self.ema:
            with torch.no_grad():
                for name, p in self.trainable().items():
                    self.ema[name].lerp_(p.detach(), 1 - self.settings.ema_decay)
        values = {"train/loss": loss.detach()}
        buckets = [self.mixture.bucket(v) for v in w.tolist()]
        for bucket in sorted(set(buckets)):
            values[f"train/loss_{bucket}"] = per_sample[[b == bucket for b in buckets]].mean().detach()
        self.log_dict(values, prog_bar=True)
        self.iteration += 1
        self.log("train/iteration", float(self.iteration))
        return None

    def configure_optimizers(self):
        return self.make_optimizer(list(self.trainable().values()))

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"student.{n}" for n in self.trainable()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["guidance"] = {**self.counters(), "ema": {k: v.cpu() for k, v in self.ema.items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("guidance", {})
        self.restore_counters(saved)
        self.ema.update({k: v.to(self.device) for k, v in saved.get("ema", {}).items()})

    # -- validation: the single-pass error per w, and samples ----------------------------------------------------
    @contextlib.contextmanager
    def exported_weights(self):
        """The student holds the EMA weights (what the export writes) inside the block, its own ones after."""
        if not self.ema:
            yield
            return
        trainable = self.trainable()
        own = {n: p.detach().clone() for n, p in trainable.items()}
        try:
            for name, p in trainable.items():
                p.data.copy_(self.ema[name])
            yield
        finally:
            for name, p in trainable.items():
                p.data.copy_(own[name])

    def errors(self, x0: torch.Tensor, text: Conditioning, scales: Sequence[float] | None = None,
               seed: int = 0) -> dict[float, tuple[float, float]]:
        """`guidance_errors` of the student against the frozen base's two-pass CFG, at the mixture's scales."""
        return guidance_errors(*self.guided, x0, text, self.alphas_cumprod,
                               scales if scales is not None else self.mixture.eval_scales, seed=seed)

    @torch.no_grad()
    def samples(self, text: Conditioning, scales: Sequence[float], num_steps: int = 10, seed: int = 0):
        """[rows: single-pass at each w, then two-pass at each w] of decoded images in [0, 1], one per caption."""
        teacher, student = self.guided
        shape = (text.text.shape[0], self.student.config.in_channels, self.latent_size, self.latent_size)
        latents = [sample_latents(model, text, w, shape, self.alphas_cumprod, num_steps, seed)
                   for model in (student, teacher) for w in scales]  # under the run's autocast, like training
        with torch.autocast(self.device.type, enabled=False):  # the VAE decodes in its own dtype
            return [to_unit_range(vae_decode(self.vae, x)) for x in latents]

    @torch.no_grad()
    def validate_on(self, batch: Mapping[str, Any]) -> dict[str, float]:
        with self.trainer.precision_plugin.forward_context(), self.exported_weights():
            text = self.encode_text(batch["captions"])
            x0 = self.encode_images(batch["pixels"].to(self.device), sample=False)
            errors = self.errors(x0, text, seed=self.validation_seed)
            shown = sorted({0.0, float(self.mixture.discrete[0]) if self.mixture.discrete else 0.0,
                            float(self.mixture.high)})
            grid = self.samples(text[:4], shown, seed=self.validation_seed)  # 4 captions: a readable grid
        metrics = {f"val/rel_error_w{w:g}": e for w, (e, _) in errors.items()}
        metrics |= {f"val/rel_error_ignored_w{w:g}": b for w, (_, b) in errors.items()}
        metrics["val/rel_error_mean"] = float(np.mean([e for e, _ in errors.values()]))
        self.validation_history.append(metrics | {"iteration": float(self.iteration)})
        labels = [f"{kind} w={w:g}" for kind in ("single-pass", "two-pass CFG") for w in shown]
        self.publish_validation(metrics, labelled_grid(grid, labels),
                                f"val/single_pass_rows_then_two_pass_at_w_{'_'.join(f'{w:g}' for w in shown)}")
        log.info("validation at iteration %d: relative error per w %s (w ignored: %s)", self.iteration,
                 ", ".join(f"{w:g}: {e:.3f}" for w, (e, _) in errors.items()),
                 ", ".join(f"{w:g}: {b:.3f}" for w, (_, b) in errors.items()))
        return metrics

    # -- export ---------------------------------------------------------------------------------------------------
    def teacher_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The distilled teacher as a plain w-embedded UNet state dict (the released layout): LoRA merged in, the
        EMA weights when there are."""
        student = copy.deepcopy(self.student)
        if self.ema:
            named = dict(student.named_parameters())
            for name, value in self.ema.items():
                named[name].data.copy_(value)
        if self.settings.variant == "lora":
            student.fuse_lora(adapter_names=[CFG_ADAPTER])
            student.unload_lora()
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in student.state_dict().items()}

    exported = "the distilled teacher"

    def export(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> list[Path]:
        return [self.export_teacher(directory, dtype)]

    def export_teacher(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / "cfg_distill.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.teacher_state_dict(dtype), str(path),
                  metadata={"time_cond_proj_dim": str(self.settings.embed_dim), "iteration": str(self.iteration),
                            "variant": self.settings.variant, "w_range": f"{self.mixture.low},{self.mixture.high}"})
        return path
