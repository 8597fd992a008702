"""iCD training with Lightning: both students as LoRA adapters on the teacher's UNet, four losses per batch.

Per batch (one image latent x0, one noise, shared by the four losses; `icd.losses` has the math):

1. reverse CD  -> reverse adapter, w drawn from the discrete training set (teacher and student see the same w)
2. forward CD  -> forward adapter, w = 0
3. L_f (forward preservation, x lambda_f)  -> forward adapter, w = 0
4. L_r (reverse preservation, x lambda_r)  -> reverse adapter, w = 0

``topology="sequential"`` (the reference): four backward + optimizer steps in that order, each model with its own
AdamW, so later losses see the already-updated other model. ``"joint"`` (the paper's eq. 5): one backward of the
weighted sum and one step of a single AdamW over both adapters.

Manual optimisation: Lightning counts every ``optimizer.step()`` as a global step, so one sequential iteration is
4 global steps (`steps_per_iteration`); ``train.py`` converts iterations to ``max_steps`` for the Trainer.
Gradient clipping runs in `on_before_optimizer_step`, after the AMP scaler has unscaled the gradients.
Checkpoints hold the adapters only (plus optimizer state); `export_adapters` writes the two ``.safetensors`` files
the iCD editor and diffusers' ``load_lora_weights`` read.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchmetrics.functional.image import peak_signal_noise_ratio

from editlab.diffusion.ddim import add_noise
from editlab.diffusion.schedules import VPSchedule
from editlab.icd.guidance import GuidancePolicy
from editlab.icd.lora import (
    ADAPTERS,
    FORWARD,
    REVERSE,
    TARGET_MODULES,
    AdapterSwitch,
    add_icd_adapters,
    add_named_adapter,
    lora_config,
    lora_parameters,
    save_adapter,
)
from editlab.icd.losses import (
    forward_consistency,
    forward_preservation,
    pseudo_huber,
    reverse_consistency,
    reverse_preservation,
)
from editlab.icd.schedule import BoundarySchedule, consistency_jumps
from editlab.icd.teacher import add_guidance_embedding, load_cfg_distilled
from editlab.models.components import Components, vae_decode, vae_encode
from editlab.models.conditioning import Conditioning, encode_conditioning, unconditional
from editlab.models.guidance import Guidance, embedded_kind, unet_guidance
from editlab.models.images import to_unit_range
from editlab.models.loading import load_components
from editlab.models.safe_load import safe_loading

log = logging.getLogger(__name__)

LOSSES = ("reverse_cd", "forward_cd", "forward_preservation", "reverse_preservation")
ADAPTER_OF = {"reverse_cd": REVERSE, "forward_cd": FORWARD, "forward_preservation": FORWARD,
              "reverse_preservation": REVERSE}
EMA_SUFFIX = "_ema"
TILE_PIXELS = 256  # validation images are enlarged (nearest) to about this height: toy ones are 32-64 px


class SettingError(ValueError):
    """A setting that cannot work; the message names the key and what to do (train.py prints it as one line)."""


@safe_loading
def load_teacher(model: Mapping[str, Any], precision: Mapping[str, Any], teacher: Mapping[str, Any]) -> Components:
    """The base model (frozen parts in the compute dtype, VAE in its own) with the teacher's UNet:
    ``guidance: embedded`` loads ``checkpoint`` (a CFG-distilled state dict) into a w-embedded UNet, or adds a
    random w-embedding when there is none (only sensible for the tiny test teacher); ``cfg`` keeps the plain UNet."""
    components = load_components(model, precision, {"mode": "none"}, "cpu")
    mode = teacher.get("guidance", "embedded")
    if mode == "embedded" and teacher.get("checkpoint"):
        unet = load_cfg_distilled(components.unet, teacher["checkpoint"], teacher.get("embed_dim", 512))
        return components.derive(unet=unet)
    elif mode == "embedded" and embedded_kind(components.unet) != "embedded":
        if model.get("kind") != "tiny":
            raise ValueError("teacher.guidance=embedded needs teacher.checkpoint (sd15_cfg_distill.pt / "
                             "sdxl_cfg_distill.pt) for a real model; use teacher=cfg for a plain SD UNet")
        return components.derive(unet=add_guidance_embedding(components.unet, teacher.get("embed_dim", 512)))
    elif mode not in ("embedded", "cfg"):
        raise ValueError(f"unknown teacher.guidance={mode!r}; expected embedded or cfg")
    return components


def rng_states() -> dict[str, Any]:
    """The global random states a training step draws from (python, numpy, torch CPU and the current CUDA device).
    Under DDP every rank is seeded alike and draws alike, so rank 0's states (the ones a checkpoint holds) are
    every rank's."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),  # plain types:
              "torch": torch.get_rng_state()}  # checkpoints load with weights_only
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device's, without waking the others
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def labelled_grid(rows: Sequence[torch.Tensor], labels: Sequence[str]) -> Image.Image:
    """Rows of images in [0, 1] ([B, 3, H, W] each) side by side, enlarged (nearest: no smoothing that would hide
    what the model drew) to about `TILE_PIXELS` high, each row's label in a margin on the left."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # [3, rows * H, B * W]
    tiles = Image.fromarray((grid.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8))
    height = rows[0].shape[-2] * max(1, round(TILE_PIXELS / rows[0].shape[-2]))
    tiles = tiles.resize((tiles.width * height // rows[0].shape[-2], height * len(rows)), Image.NEAREST)
    font = ImageFont.load_default(size=max(12, height // 12))
    margin = max(round(font.getlength(label)) for label in labels) + height // 8
    picture = Image.new("RGB", (margin + tiles.width, tiles.height), "white")
    picture.paste(tiles, (margin, 0))
    draw = ImageDraw.Draw(picture)
    for row, label in enumerate(labels):
        draw.text((height // 16, (row + 0.5) * height), label, fill="black", font=font, anchor="lm")
    return picture


@dataclass(frozen=True)
class LoraSettings:
    """The students' adapters (``train.icd.lora``)."""

    rank: int = 64
    alpha: float = 8
    target_modules: Sequence[str] = TARGET_MODULES


@dataclass(frozen=True)
class LossSettings:
    """The objectives (``train.icd.loss``): pseudo-Huber c, preservation weights, EMA of target networks."""

    huber_c: float = 0.001
    lambda_f: float = 1.5
    lambda_r: float = 1.5
    ema_decay: float = 0.0


@dataclass(frozen=True)
class OptimSettings:
    """AdamW and its schedule (``train.optim``)."""

    topology: str = "sequential"  # sequential (one step per loss, in order) | joint (one step on the sum)
    lr: float = 8e-6
    betas: Sequence[float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: str = "constant"  # after the warm-up: constant | cosine (to 0 at the run's last optimizer step)
    max_grad_norm: float = 1.0


class FrozenPartsModule(pl.LightningModule):
    """What iCD's and guidance distillation's trainers share: the frozen VAE and text encoders of ``components``
    (never in train mode), caption and image encoding, the noise schedule, the optimizer step and gradient clipping
    after the AMP scaler unscaled the gradients, the run's counters (kept in checkpoints with the random states,
    which a loaded checkpoint restores at the next batch) and validation: the subclass's `validate_on` the
    datamodule's validation batch, before the first iteration and every ``validation_every`` iterations (0: never)."""

    def __init__(self, components: Components, optim: OptimSettings, validation_every: int = 0,
                 validation_seed: int = 0):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trained weights only, not the frozen parts
        self.vae, self.text_encoder = components.vae, components.text_encoder
        self.text_encoder_2 = components.modules.get("text_encoder_2")  # SDXL family; None for SD
        self.tokenizers = [components.tokenizer] + ([components.tokenizer_2] if self.text_encoder_2 else [])
        self.resolution = components.resolution
        self.force_zeros_for_empty_prompt = components.force_zeros_for_empty_prompt
        self.register_buffer("alphas_cumprod", components.alphas_cumprod.clone(), persistent=False)
        self.optim = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)
        if optim.decay not in ("constant", "cosine"):
            raise ValueError(f"train.optim.decay={optim.decay!r}: expected constant or cosine")
        self.warmup_steps, self.decay, self.max_grad_norm = optim.warmup_steps, optim.decay, optim.max_grad_norm
        self._resumed_rng: dict[str, Any] | None = None  # random states of a loaded checkpoint, set at the next batch
        self._batch_start: float | None = None
        self.validation_every, self.validation_seed = validation_every, validation_seed
        self.iteration, self.skipped, self.batches_seen = 0, 0, 0  # iterations done, samples skipped, batches drawn
        self.validation_history: list[dict[str, float]] = []

    def frozen_modules(self) -> tuple[torch.nn.Module | None, ...]:
        return self.vae, self.text_encoder, self.text_encoder_2

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in self.frozen_modules():  # frozen parts never run in train mode
            if frozen is not None:
                frozen.eval()
        return self

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Conditioning:
        """Captions -> their conditioning (SD: text [B, 77, D]; SDXL: also pooled and size embeddings)."""
        encoders = list(zip(self.tokenizers, [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]))
        return encode_conditioning(captions, encoders, self.resolution, self.device, self.text_encoder.dtype)

    def unconditional(self) -> Conditioning:
        """CFG's unconditional branch, as `Components.unconditional` gives it, on this module's device."""
        return unconditional(self.encode_text, self.force_zeros_for_empty_prompt)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> fp32 latents; the VAE runs outside autocast in its own dtype (fp32)."""
        with torch.autocast(self.device.type, enabled=False):
            return vae_encode(self.vae, pixels.to(self.device), sample)

    def make_optimizer(self, params) -> dict[str, Any]:
        """AdamW over ``params`` with a linear warm-up, then constant or cosine decay, stepped per optimizer step."""
        optimizer = torch.optim.AdamW(params, **self.optim)
        warmup = max(self.warmup_steps, 1)
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 0
        if self.decay == "cosine" and total <= warmup:
            raise SettingError(f"train.optim.decay=cosine decays after the warm-up, but train.optim.warmup_steps="
                               f"{warmup} is not below the run's {total} optimizer steps ({self.steps_per_iteration} "
                               "per iteration): raise train.trainer.iterations or lower train.optim.warmup_steps")

        def factor(step: int) -> float:
            if step + 1 < warmup or self.decay == "constant":
                return min(1.0, (step + 1) / warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step + 1 - warmup) / (total - warmup))))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _step(self, loss: torch.Tensor, optimizer, scheduler) -> None:
        """One optimizer step on ``loss`` (manual optimization), and one step of its learning-rate schedule."""
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.max_grad_norm > 0:  # called after the AMP scaler unscaled the gradients
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def publish_validation(self, metrics: Mapping[str, float], picture: Image.Image, name: str) -> None:
        """``validation/iteration_N.png`` in the run directory, and the metrics and picture to the loggers."""
        folder = Path(self.trainer.default_root_dir) / "validation"  # not trainer.log_dir: it broadcasts (DDP)
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"iteration_{self.iteration:06d}.png")
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped  # the axis Lightning logs train/* on
        for logger in self.loggers:
            logger.log_metrics(dict(metrics), step=step)
            if hasattr(logger, "log_image"):
                logger.log_image(name, [picture], step=step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resumed_rng is not None:  # here, after the loader started: the draws go on as in an unstopped run
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None
        self._batch_start = time.perf_counter()

    def on_train_start(self) -> None:
        if self.validation_every and self.iteration == 0:
            self.validate()  # the baseline: the students are still the teacher they start from

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is not None and batch["captions"]:
            self.log("train/images_per_sec", len(batch["captions"]) / (time.perf_counter() - self._batch_start))
        if batch["captions"] and self.validation_every and self.iteration % self.validation_every == 0:
            self.validate()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """`validate_on` the datamodule's validation batch, on the process that validates (rank zero); {} without a
        batch or without captions in it."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        batch = getattr(datamodule, "validation", None)
        if not batch or not batch["captions"] or not self.trainer.is_global_zero:
            return {}
        return self.validate_on(batch)

    def validate_on(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """The validation metrics of ``batch`` (also published with a picture, `publish_validation`)."""
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        """The run's progress as a checkpoint keeps it: iterations, skipped samples, batches drawn, random states."""
        return {"iteration": self.iteration, "skipped": self.skipped, "batches_seen": self.batches_seen,
                "rng": rng_states()}

    def restore_counters(self, saved: Mapping[str, Any]) -> None:
        """`counters` of a loaded checkpoint (none: a new run); the random states are set at the next batch."""
        self.iteration, self.skipped = saved.get("iteration", 0), saved.get("skipped", 0)
        self.batches_seen = saved.get("batches_seen", self.iteration)
        self._resumed_rng = saved.get("rng")


class ICDModule(FrozenPartsModule):
    def __init__(
        self,
        components: Components,
        schedule: BoundarySchedule,
        policy: GuidancePolicy,
        guidance: str = "auto",
        lora: LoraSettings = LoraSettings(),
        loss: LossSettings = LossSettings(),
        optim: OptimSettings = OptimSettings(),
        gradient_checkpointing: bool = False,
        validation_every: int = 0,
        validation_seed: int = 0,
    ):
        if optim.topology not in ("sequential", "joint"):
            raise ValueError(f"unknown optim.topology={optim.topology!r}; expected sequential or joint")
        super().__init__(components, optim, validation_every, validation_seed)
        self.unet = components.unet
        self.schedule, self.policy = schedule, policy
        self.guidance = embedded_kind(self.unet) if guidance == "auto" else guidance
        self.loss_weights = {"reverse_cd": 1.0, "forward_cd": 1.0, "forward_preservation": loss.lambda_f,
                             "reverse_preservation": loss.lambda_r}
        self.huber_c, self.topology, self.ema_decay = loss.huber_c, optim.topology, loss.ema_decay

        # Students: two adapters on the teacher's UNet, trainable params in fp32 whatever the frozen dtype.
        add_icd_adapters(self.unet, lora.rank, lora.alpha, lora.target_modules)
        for name in ADAPTERS:
            for p in lora_parameters(self.unet, name):
                p.data = p.data.float()
        self.switch = AdapterSwitch(self.unet, trainable=True)
        if loss.ema_decay > 0:  # optional target networks: frozen copies of both adapters, moved by EMA
            for name in ADAPTERS:
                add_named_adapter(self.unet, lora_config(lora.rank, lora.alpha, lora.target_modules),
                                  name + EMA_SUFFIX)
                for ema, p in zip(lora_parameters(self.unet, name + EMA_SUFFIX), lora_parameters(self.unet, name)):
                    ema.data = p.data.clone()
                    ema.requires_grad_(False)
            self.switch = AdapterSwitch(self.unet, trainable=True)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._guided: Guidance | None = None
        self.current_loss: str | None = None

    # -- networks -------------------------------------------------------------------------------------------------
    @property
    def guided(self) -> Guidance:
        if self._guided is None:
            uncond = self.unconditional() if self.guidance == "cfg" else None
            self._guided = unet_guidance(self.unet, self.guidance, uncond)
        return self._guided

    def eps_fn(self, adapter: str | None):
        """EpsFn of one student (adapter name) or of the teacher (None)."""

        def eps(x: torch.Tensor, t: torch.Tensor, cond: Conditioning, w: torch.Tensor) -> torch.Tensor:
            self.switch.activate(adapter)
            return self.guided(x, t, cond, w)

        return eps

    def target_fn(self, adapter: str):
        return self.eps_fn(adapter + EMA_SUFFIX if self.ema_decay > 0 else adapter)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """fp32 latents -> images in [0, 1] [B, 3, H, W]."""
        with torch.autocast(self.device.type, enabled=False):
            return to_unit_range(vae_decode(self.vae, latents))

    # -- losses ---------------------------------------------------------------------------------------------------
    def draw(self, batch: int) -> dict[str, torch.Tensor]:
        """Per-sample random choices of one iteration (global RNG, seeded by seed_everything)."""
        n, m = len(self.schedule.grid), self.schedule.num_segments
        return {
            "w": self.policy.sample_train(batch).to(self.device),
            "reverse_index": torch.randint(0, n, (batch,), device=self.device),
            "forward_index": torch.randint(0, n - 1, (batch,), device=self.device),
            "segment": torch.randint(0, m, (batch,), device=self.device),
        }

    def loss(self, name: str, x0: torch.Tensor, noise: torch.Tensor, text: torch.Tensor,
             draws: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fwd, rev, teacher = self.eps_fn(FORWARD), self.eps_fn(REVERSE), self.eps_fn(None)
        s, abar = self.schedule, self.alphas_cumprod
        if name == "reverse_cd":
            pred, target = reverse_consistency(x0, noise, draws["reverse_index"], text, draws["w"], rev, teacher, s,
                                               abar, self.target_fn(REVERSE))
        elif name == "forward_cd":
            pred, target = forward_consistency(x0, noise, draws["forward_index"], text, fwd, teacher, s, abar,
                                               self.target_fn(FORWARD))
        elif name == "forward_preservation":
            pred, target = forward_preservation(x0, noise, draws["segment"], text, fwd, rev, s, abar)
        else:
            pred, target = reverse_preservation(x0, noise, draws["segment"], text, fwd, rev, s, abar)
        return pseudo_huber(pred, target, self.huber_c)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.batches_seen += 1  # every batch drawn, also an empty one: where a resumed data stream goes on
        self.skipped += int(batch["skipped"])
        self.log("data/skipped", float(self.skipped))
        if not batch["captions"]:
            return None  # every sample of the batch was unreadable
        x0 = batch["latents"].float() if "latents" in batch else self.encode_images(batch["pixels"])
        text = self.encode_text(batch["captions"])
        noise = torch.randn_like(x0)
        draws = self.draw(x0.shape[0])
        optimizers, schedulers = self._optimizers()
        values = {}
        if self.topology == "sequential":
            for name in LOSSES:
                self.current_loss = name
                loss = self.loss(name, x0, noise, text, draws)
                self._step(loss * self.loss_weights[name], optimizers[ADAPTER_OF[name]],
                           schedulers[ADAPTER_OF[name]])
                values[name] = loss.detach()
        else:
            self.current_loss = "total"
            losses = {name: self.loss(name, x0, noise, text, draws) for name in LOSSES}
            self._step(sum(losses[n] * self.loss_weights[n] for n in LOSSES), optimizers["joint"],
                       schedulers["joint"])
            values = {n: v.detach() for n, v in losses.items()}
        self.current_loss = None
        if self.ema_decay > 0:
            self._update_ema()
        self.log_dict({f"train/{n}": v for n, v in values.items()}, prog_bar=True)
        self.iteration += 1  # here, not in on_train_batch_end: checkpoint callbacks run before the module's hooks
        self.log("train/lr", schedulers[next(iter(schedulers))].get_last_lr()[0])
        self.log("train/iteration", float(self.iteration))
        return None

    def _optimizers(self) -> tuple[dict[str, Any], dict[str, Any]]:
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        if self.topology == "joint":
            return {"joint": optimizers}, {"joint": schedulers}
        return dict(zip((REVERSE, FORWARD), optimizers)), dict(zip((REVERSE, FORWARD), schedulers))

    @torch.no_grad()
    def _update_ema(self) -> None:
        for name in ADAPTERS:
            for ema, p in zip(lora_parameters(self.unet, name + EMA_SUFFIX), lora_parameters(self.unet, name)):
                ema.lerp_(p, 1 - self.ema_decay)

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps (Lightning global steps) per batch."""
        return len(LOSSES) if self.topology == "sequential" else 1

    def configure_optimizers(self):
        reverse, forward = lora_parameters(self.unet, REVERSE), lora_parameters(self.unet, FORWARD)
        if self.topology == "joint":
            return self.make_optimizer([{"params": reverse}, {"params": forward}])
        return [self.make_optimizer(reverse), self.make_optimizer(forward)]

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".lora_" in k}
        checkpoint["icd"] = {**self.counters(), "reverse": list(self.schedule.reverse),
                             "forward": list(self.schedule.forward)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("icd", {})
        if saved and (tuple(saved["reverse"]), tuple(saved["forward"])) != (self.schedule.reverse,
                                                                           self.schedule.forward):
            raise ValueError(f"checkpoint boundaries E={saved['reverse']} F={saved['forward']} differ from "
                             f"the configured {self.schedule}")
        self.restore_counters(saved)

    # -- validation: round trip and samples -----------------------------------------------------------------------
    @torch.no_grad()
    def round_trip(self, x0: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward (w = 0, from x_19 with a seeded noise) then reverse (w = 0) down to the clean latent, and a
        generation from seeded noise with the evaluation guidance. x0 [B, 4, h, w], text: B rows' conditioning."""
        generator = torch.Generator().manual_seed(self.validation_seed)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        noise_T = torch.randn(x0.shape, generator=generator).to(self.device)
        zeros = torch.zeros(x0.shape[0], device=self.device)
        fwd, rev, vp = self.eps_fn(FORWARD), self.eps_fn(REVERSE), VPSchedule(self.alphas_cumprod)
        x = add_noise(x0, noise, self.schedule.start, self.alphas_cumprod)
        x_T = consistency_jumps(x, self.schedule.forward_pairs(), lambda i, x, t: fwd(x, t, text, zeros), vp)
        reconstruction = consistency_jumps(x_T, self.schedule.reverse_pairs(),
                                           lambda i, x, t: rev(x, t, text, zeros), vp)

        def guided(i: int, x: torch.Tensor, t: int) -> torch.Tensor:
            return rev(x, t, text, self.policy.rows(t, x.shape[0]).to(self.device))

        generation = consistency_jumps(noise_T, self.schedule.reverse_pairs(), guided, vp)
        self.switch.activate(REVERSE)
        return {"reconstruction": reconstruction, "generation": generation,
                "latent_mse": (reconstruction - x0).pow(2).mean()}

    @torch.no_grad()
    def validate_on(self, batch: Mapping[str, Any]) -> dict[str, float]:
        pixels = batch["pixels"].to(self.device)
        with self.trainer.precision_plugin.forward_context():
            out = self.round_trip(self.encode_images(pixels, sample=False), self.encode_text(batch["captions"]))
        images = (pixels.float() + 1) / 2
        reconstructed = self.decode_latents(out["reconstruction"])
        psnr = peak_signal_noise_ratio(reconstructed.float(), images, data_range=1.0, dim=(1, 2, 3))  # image mean
        metrics = {"val/latent_mse": out["latent_mse"].item(), "val/psnr": psnr.item(),
                   "iteration": float(self.iteration)}
        self.validation_history.append(metrics)
        picture = labelled_grid([images, reconstructed, self.decode_latents(out["generation"])],
                                ["originals", "reconstructions", "generations"])
        self.publish_validation({k: v for k, v in metrics.items() if k != "iteration"}, picture,
                                "val/originals_reconstructions_generations")
        log.info("validation at iteration %d: latent MSE %.5f, PSNR %.2f dB", self.iteration,
                 metrics["val/latent_mse"], metrics["val/psnr"])
        return metrics

    # -- export ---------------------------------------------------------------------------------------------------
    exported = "the iCD adapters"

    def export(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> list[Path]:
        return [*self.export_adapters(directory, dtype).values(), Path(directory) / "schedule.json"]

    def export_adapters(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
        """``forward.safetensors`` / ``reverse.safetensors`` (diffusers style, in ``dtype``) + ``schedule.json``."""
        directory = Path(directory)
        paths = {name: save_adapter(self.unet, adapter, directory / f"{name}.safetensors", dtype=dtype)
                 for name, adapter in (("forward", FORWARD), ("reverse", REVERSE))}
        info = {"reverse_steps": self.schedule.reverse_steps, "forward_steps": self.schedule.forward_steps,
                "guidance": self.guidance, "train_scales": list(self.policy.train_scales),
                "iteration": self.iteration}
        (directory / "schedule.json").write_text(json.dumps(info, indent=2) + "\n")
        return paths


class IterationProgressBar(TQDMProgressBar):
    """Lightning's bar counting iterations of the whole run (the loader is endless, so there are no epochs):
    ``iCD 12/60 [.., 1.9 it/s]`` (``guidance ...`` for guidance distillation), starting where a resumed run
    starts. It is made whole at ``on_train_start``: Lightning skips ``on_train_epoch_start`` when it resumes inside
    an epoch, and a bar shown before it is set up would show ``Training 0/?``."""

    def init_train_tqdm(self) -> Tqdm:
        module = self.trainer.lightning_module
        return Tqdm(desc=getattr(module, "progress_name", "iCD"), total=self.trainer.max_steps //
                    module.steps_per_iteration, initial=module.iteration, position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, *_: Any) -> None:
        """Nothing: the bar counts the run's iterations, not an epoch's batches."""

    def get_metrics(self, trainer, module) -> dict[str, Any]:
        """The losses under short names (``reverse_cd=...``), without Lightning's version number."""
        return {k.removeprefix("train/"): v for k, v in super().get_metrics(trainer, module).items() if k != "v_num"}

    def on_train_batch_end(self, trainer, module: ICDModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        bar.n = module.iteration
        bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
        bar.refresh()


class OnTrainStart(pl.Callback):
    """Calls ``action()`` on the global-zero process once training has started (after setup and any resume)."""

    def __init__(self, action) -> None:
        self.action = action

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.action()


class PeriodicExport(pl.Callback):
    """Write what the module trains (its ``export(directory, dtype)``: iCD's adapters, a distilled teacher) every
    ``every_n_iterations`` (to ``<dir>/iteration_N``) and at the end (to ``<dir>``), in ``dtype``."""

    def __init__(self, directory: str | Path, every_n_iterations: int = 0, dtype: torch.dtype = torch.float32):
        self.directory, self.every, self.dtype = Path(directory), every_n_iterations, dtype

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every and module.iteration % self.every == 0 and trainer.is_global_zero:
            module.export(self.directory / f"iteration_{module.iteration:06d}", self.dtype)

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            paths = module.export(self.directory, self.dtype)
            log.info("exported %s: %s", module.exported, ", ".join(str(p) for p in paths))
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    self.log_artifact(logger.experiment, paths, module.iteration)

    def log_artifact(self, run, paths: Sequence[Path], iteration: int) -> None:
        """The exported files as the W&B model artifact ``<export folder>-<run id>``, the run's config its
        metadata."""
        import wandb

        artifact = wandb.Artifact(f"{self.directory.name}-{run.id}", type="model",
                                  metadata={"iteration": iteration, "config": dict(run.config)})
        for path in paths:
            artifact.add_file(str(path))
        run.log_artifact(artifact)


class IterationCheckpoint(ModelCheckpoint):
    """Lightning's checkpoints every ``every`` iterations: ``iteration_000040.ckpt``, the last ``keep`` of them (-1:
    all) and ``last.ckpt``. On SIGTERM (what Slurm sends before a kill) or SIGINT (Ctrl-C) the running iteration
    finishes and is saved too: Lightning then stops with a `SIGTERMException`, and ``stopped_by`` names the signal.
    A second Ctrl-C stops at once, without a checkpoint."""

    def __init__(self, directory: str | Path, every: int, steps_per_iteration: int, keep: int = -1):
        super().__init__(dirpath=directory, filename="iteration_{train/iteration:06.0f}", monitor="train/iteration",
                         mode="max", save_top_k=keep, save_last=True, auto_insert_metric_name=False,
                         every_n_train_steps=every * steps_per_iteration)  # Lightning counts optimizer steps
        self.stopped_by: str | None = None
        self._sigint = None

    def setup(self, trainer, module, stage: str) -> None:
        # at setup, before any callback's on_train_start: Lightning runs checkpoint callbacks last, and a Ctrl-C
        # after another callback announced the start (job.json) must already find this handler
        super().setup(trainer, module, stage)
        self._sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum, frame) -> None:
        if self.stopped_by:
            raise KeyboardInterrupt
        self.stopped_by = "SIGINT"
        log.warning("Ctrl-C: stopping at the end of this iteration with a checkpoint (Ctrl-C again: at once, "
                    "without one)")
        signal.raise_signal(signal.SIGTERM)  # Lightning's own graceful stop, which also tells the other ranks

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):  # only this one comes between iterations
            return
        self.stopped_by = self.stopped_by or "SIGTERM"
        if not self._should_skip_saving_checkpoint(trainer):  # unless this iteration's checkpoint is written
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def teardown(self, trainer, module, stage: str) -> None:
        super().teardown(trainer, module, stage)
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None
