"""The training loop every stage shares (`fit`: AdamW, warmup + cosine, time caps), its EMA and how the trained
modules are saved."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from editlab.experiments.toy_build.world import Log
from editlab.models.images import uint8_to_model_pixels

WARMUP = 200  # linear warmup steps (at most a tenth of a run)
WEIGHT_DECAY = 1e-2  # AdamW's default
CLIP_NORM = 1.0  # gradient norm clipping
LOG_EVERY = 25  # steps between logged losses (each one syncs the device)
TIMED_FROM, TIMED_TO = 20, 70  # the first steps pay for kernel selection: a time cap measures speed in between


def to_pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] on ``device``, as `Components.encode_image` feeds it."""
    return uint8_to_model_pixels(images.to(device))


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def fit(stage: str, params: list[torch.nn.Parameter] | list[dict], loss_fn: Callable[[int], torch.Tensor], steps: int,
        lr: float, log: Log, emas: Iterable[tuple[EMAModel, torch.nn.Module]] = (), warmup: int = WARMUP,
        max_seconds: float | None = None, weight_decay: float = WEIGHT_DECAY) -> int:
    """AdamW with linear warmup and cosine decay on `loss_fn(step)`; each (EMA, module) pair updated every step.

    `params` may be optimiser parameter groups (dicts with their own "lr"); the schedule scales every group alike.
    `max_seconds` (a safety for time-limited machines) shortens the run, schedule included, when the measured
    speed says `steps` would not fit; the number of steps taken is logged and returned.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    params = [q for group in optimizer.param_groups for q in group["params"]]  # for gradient clipping
    plan = {"total": steps, "warmup": min(warmup, max(1, steps // 10))}

    def lr_factor(step: int) -> float:
        if step < plan["warmup"]:
            return (step + 1) / plan["warmup"]
        progress = min(1.0, (step - plan["warmup"]) / max(1, plan["total"] - plan["warmup"]))
        return 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start, step, running = time.perf_counter(), 0, None
    bar = tqdm(total=steps, desc=stage, unit="step")
    while step < plan["total"]:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        optimizer.step()
        schedule.step()
        for ema, module in emas:
            ema.step(module.parameters())
        step += 1
        value = loss.item() if step % LOG_EVERY == 0 or step == plan["total"] else None
        if value is not None:
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.4f}")
            log.write(stage=stage, step=step, loss=value, lr=schedule.get_last_lr()[0],
                      seconds=round(time.perf_counter() - start, 1))
        if step == TIMED_FROM:
            warm_start = time.perf_counter()
        if max_seconds and step == TIMED_TO:
            per_step = (time.perf_counter() - warm_start) / (TIMED_TO - TIMED_FROM)
            fits = int((max_seconds - (time.perf_counter() - start)) / per_step) + step
            if fits < plan["total"]:
                plan["total"] = max(fits, step + 1)
                bar.total = plan["total"]
                log.write(stage=stage, note=f"time cap {max_seconds:.0f}s: {plan['total']} of {steps} steps")
        bar.update(1)
    bar.close()
    log.write(stage=stage, done=True, steps=step, seconds=round(time.perf_counter() - start, 1))
    return step


def ema_of(module: torch.nn.Module, decay: float) -> tuple[EMAModel, torch.nn.Module]:
    """An exponential moving average of `module`'s parameters, paired with the module it follows. diffusers' EMA
    ramps its decay up ((1 + n) / (10 + n) until `decay`): a plain 0.999 average kept 10 % of the random start in
    the first shipped teacher, whose 300-second cap cut 10,000 planned steps to 2,296."""
    return EMAModel(module.parameters(), decay=decay), module


def save_half(module: torch.nn.Module, path: Path) -> None:
    """`module` in float16 (half the bytes; the loaders cast back) in diffusers / transformers layout."""
    module.eval().to(torch.float16).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    if config.pop("_name_or_path", None) is not None:  # a diffusers model loaded from disk records this machine's path
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_ema(ema: tuple[EMAModel, torch.nn.Module], path: Path) -> None:
    """The averaged weights, as `save_half` writes them (the live module is overwritten)."""
    average, module = ema
    average.copy_to(module.parameters())
    save_half(module, path)
