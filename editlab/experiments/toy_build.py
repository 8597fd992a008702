"""Build the toy world's models from seed, with the project's own code (the command line:
``python scripts/build_toy_world.py --help``; `build` here).

The world is `toyworld.scenes`: 32² scenes of one or two coloured shapes on a background, captioned in a fixed
35-word grammar. The stages, each with a progress bar and its losses logged to ``<out>/build_log.jsonl``:

1. data: render the training scenes (captions plus hard-negative captions that differ in one attribute), held-out
   scenes and (source, instruction, target) edit triples. Every item has its own generator, seeded by
   (seed, stream, index), so the data does not depend on the number of worker processes. It always runs (it is
   deterministic) and renders only what the requested stages use.
2. vae: an `AutoencoderKL` (block channels 32, 64, 64), 32² RGB <-> 4 x 8² latents (factor 4, like the tiny test
   model), trained on MSE with a tiny KL term; its scaling factor is set to 1 / std of the latents, as SD's 0.18215.
3. decoder: the VAE decoder fine-tuned on the frozen encoder's latents (SD's ft-MSE decoder idea): sharper
   reconstructions, the same latents, so it may run before or after the teacher.
4. teacher: a `CLIPTokenizer` whose vocabulary holds every toy word as one token (24 positions: the longest caption
   has 20 words), a 2-layer `CLIPTextModel` and an SD-shaped `UNet2DConditionModel` (channels 64, 128, cross-attention
   at 8² and 4², 6.1 M parameters), trained jointly on epsilon prediction with SD's noise schedule and 10 % caption
   dropout for classifier-free guidance. EMA weights are kept.
5. clip: a small `CLIPModel` (3-layer ViT, patch 4; 2-layer text tower) trained contrastively, each image also
   against a caption that differs in one attribute, so it can tell "red circle" from "blue circle". It scores
   CLIP similarity on toy runs and its vision tower serves the structure distance there.
6. ip2p: an InstructPix2Pix-style UNet (8 input channels: noisy latent + source latent), initialised from the
   teacher and fine-tuned on edit triples with 5 % text and 5 % image dropout (the two guidance terms).
7. eval: the quality bars, measured through `models.loading.load_components` on the saved files, written to
   ``<out>/quality.json``: VAE PSNR, CLIP zero-shot accuracy, teacher samples judged by the toy CLIP (next to the
   judge's score on the real scenes of the same captions), DDIM inversion round trips (unguided, CFG 7.5, CFG 7.5
   with Null-Text Inversion), and InstructPix2Pix edits of held-out triples against their ground truth.

``resume`` continues the teacher, CLIP and IP2P UNet saved in the output folder with a new warmup + cosine cycle;
``max_seconds`` caps a training stage's time (shortening its schedule). The iCD adapters are distilled afterwards by
``python train.py train/experiment=toy`` (see conf/train/experiment).

Output (diffusers layout, loadable as ``model.kind: pretrained``): ``<out>/{unet,vae,text_encoder,tokenizer,
scheduler}`` plus ``<out>/clip`` (CLIPModel + tokenizer + image processor) and ``<out>/ip2p_unet``. Diffusion
weights are stored in float16 (the loaders cast them to the run's precision; the CLIP metric to float32), so that
the whole world, iCD adapters included, fits in 30 MB.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from torchmetrics.functional.image import peak_signal_noise_ratio
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from editlab.diffusion.ddim import cfg
from editlab.diffusion.solver import solve
from editlab.evaluation.metrics import CLIP_MEAN, CLIP_STD
from editlab.models.components import vae_decode, vae_encode
from editlab.models.images import to_uint8, uint8_to_model_pixels
from editlab.models.loading import load_components, sd_scheduler
from editlab.models.tokenizers import word_tokenizer
from editlab.toyworld.scenes import BG_COLOURS, COLOURS, SHAPES, Scene, make_edit, random_scene, vocabulary

REPO = Path(__file__).resolve().parents[1]

SIZE = 32  # image side; latents are 8²
MAX_LENGTH = 24  # the longest toy caption has 20 words; SD uses 77
ALL_STAGES = ("data", "vae", "decoder", "teacher", "clip", "ip2p", "eval")


@dataclass
class BuildOptions:
    """What to build, where and how (the command line's flags)."""

    out: Path
    profile: str = "cpu"  # a key of PROFILES
    device: str = "cpu"
    seed: int = 0
    stages: tuple[str, ...] = ALL_STAGES  # the data stage always runs
    workers: int = 1  # processes rendering the data
    max_seconds: dict[str, float] = field(default_factory=dict)  # time caps per training stage
    keep_going: bool = False  # log a failing stage and go on with the next
    resume: bool = False  # continue the saved teacher, CLIP and IP2P UNet (new optimiser and warmup + cosine cycle)


@dataclass(frozen=True)
class Profile:
    """How much data and how many optimiser steps each stage gets."""

    train_scenes: int
    heldout_scenes: int
    edits: int
    vae_steps: int
    vae_batch: int
    teacher_steps: int
    teacher_batch: int
    clip_steps: int
    clip_batch: int
    ip2p_steps: int
    ip2p_batch: int
    decoder_steps: int = 0  # VAE decoder fine-tuning on the frozen encoder's latents (0: none)
    ema_decay: float = 0.995  # of the teacher and IP2P UNet; short runs need a short memory (0.999^2000 = 14 %)
    eval_steps: int = 50  # DDIM steps of the evaluation samples and round trips
    eval_images: int = 64
    teacher_images: int = 256  # 64 samples left the teacher's accuracy uncertain by +-4 %
    nti_images: int = 8


PROFILES = {
    "cpu": Profile(20_000, 500, 4_000, 700, 32, 2_400, 64, 1_000, 128, 400, 32, eval_images=32, teacher_images=64,
                   nti_images=2),
    # the shipped weights: the steps that one H100 ran under --max-seconds vae=110,decoder=60,teacher=300,ip2p=150
    "gpu": Profile(60_000, 1_000, 20_000, 1_894, 64, 2_296, 256, 3_000, 512, 1_227, 256, decoder_steps=1_993,
                   ema_decay=0.999),
    # continuing the shipped teacher and IP2P UNet with --resume on 2 CPU cores (the gpu profile's data)
    "finetune": Profile(60_000, 1_000, 20_000, 1_894, 64, 2_000, 64, 3_000, 512, 2_000, 32, decoder_steps=1_993,
                        ema_decay=0.998),
    "quick": Profile(64, 16, 32, 3, 4, 3, 4, 3, 8, 3, 4, decoder_steps=3, eval_steps=4, eval_images=4,
                     teacher_images=4, nti_images=1),
}


# ------------------------------------------------------------------------------------------------------------ tokens
def token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """[N, 24] int64, padded with the end token as `Components.encode_prompts` does."""
    return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


# -------------------------------------------------------------------------------------------------------------- data
def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    # a 4-entry seed, so no stream collides with the benchmark set's default_rng([seed, type, k])
    return np.random.default_rng([seed, 0x70F, stream, index])


def perturb(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one attribute changed (an object's shape, colour, texture or size, the background's colour or
    pattern, the style): a hard negative caption for the contrastive CLIP."""
    from editlab.toyworld.scenes import BG_PATTERNS, SIZES, STYLES, TEXTURES

    def other(options, current):
        options = [o for o in options if o != current]
        return options[int(rng.integers(len(options)))]

    kinds = ("shape", "colour", "texture", "size", "background", "style") + (("pattern",) if len(BG_PATTERNS) > 1
                                                                               else ())
    kind = kinds[int(rng.integers(len(kinds)))]
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    if kind in ("shape", "colour", "texture", "size"):
        options = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES, "size": SIZES}[kind]
        new = obj._replace(**{kind: other(options, getattr(obj, kind))})
        return replace(scene, objects=scene.objects[:i] + (new,) + scene.objects[i + 1 :])
    if kind == "background":
        return replace(scene, background=other(BG_COLOURS, scene.background))
    if kind == "pattern":
        return replace(scene, bg_pattern=other(BG_PATTERNS, scene.bg_pattern))
    return replace(scene, style=other(STYLES, scene.style))


def alternatives(scene: Scene) -> dict[str, list[str]]:
    """Zero-shot checks of a scene: for every object's shape and colour and for the background colour, the captions
    of the scenes that differ in that attribute only. A model gets a check right when it ranks the scene's own
    caption above all of that check's alternatives."""
    truth = scene.caption()
    checks: dict[str, list[str]] = {}
    for i, obj in enumerate(scene.objects):
        for kind, options in (("shape", SHAPES), ("colour", COLOURS)):
            caps = []
            for value in options:
                new = obj._replace(**{kind: value})
                cap = replace(scene, objects=scene.objects[:i] + (new,) + scene.objects[i + 1 :]).caption()
                if cap != truth:
                    caps.append(cap)
            checks[f"{kind}{i}"] = caps
    checks["background"] = [replace(scene, background=b).caption() for b in BG_COLOURS if b != scene.background]
    return checks


def _scene_item(args: tuple[int, int, int, bool]) -> tuple[np.ndarray, Scene, str, list[str]]:
    seed, stream, index, render = args
    rng = _rng(seed, stream, index)
    scene = random_scene(rng)
    negatives = [perturb(scene, rng).caption() for _ in range(4)]
    image = scene.render(SIZE) if render else np.zeros((SIZE, SIZE, 3), np.uint8)  # captions alone are cheap
    return image, scene, scene.caption(), negatives


def _edit_item(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    seed, stream, index = args
    edit = make_edit("0", _rng(seed, stream, index), SIZE)
    return edit.source.render(SIZE), edit.target.render(SIZE), edit.instruction


def _parallel_map(fn: Callable, jobs: list, workers: int, desc: str) -> list:
    if workers <= 1:
        return [fn(job) for job in tqdm(jobs, desc=desc, unit="img")]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=64), total=len(jobs), desc=desc, unit="img"))


@dataclass
class Scenes:
    images: torch.Tensor  # [N, 32, 32, 3] uint8
    scenes: list[Scene]
    captions: list[str]
    negatives: list[list[str]]  # 4 per scene


@dataclass
class Edits:
    sources: torch.Tensor  # [N, 32, 32, 3] uint8
    targets: torch.Tensor
    instructions: list[str]


def render_scenes(n: int, seed: int, stream: int, workers: int, desc: str, render: bool = True) -> Scenes:
    items = _parallel_map(_scene_item, [(seed, stream, i, render) for i in range(n)], workers, desc)
    images, scenes, captions, negatives = zip(*items)
    return Scenes(torch.from_numpy(np.stack(images)), list(scenes), list(captions), list(negatives))


def render_edits(n: int, seed: int, workers: int) -> Edits:
    items = _parallel_map(_edit_item, [(seed, 2, i) for i in range(n)], workers, "render edit triples")
    if not items:
        empty = torch.zeros(0, SIZE, SIZE, 3, dtype=torch.uint8)
        return Edits(empty, empty, [])
    sources, targets, instructions = zip(*items)
    return Edits(torch.from_numpy(np.stack(sources)), torch.from_numpy(np.stack(targets)), list(instructions))


def to_pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] on ``device``, as `Components.encode_image` feeds it."""
    return uint8_to_model_pixels(images.to(device))


# ------------------------------------------------------------------------------------------------------------ models
def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
        sample_size=SIZE,
    )


def text_config(vocab_size: int, hidden: int, layers: int, heads: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="quick_gelu", **extra,
    )


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def build_clip(vocab_size: int) -> CLIPModel:
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE,
                  patch_size=4, hidden_act="quick_gelu")
    text = text_config(vocab_size, hidden=64, layers=2, heads=4).to_dict()
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


# ---------------------------------------------------------------------------------------------------------- training
class Log:
    """Losses and notes of every stage, one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def fit(stage: str, params: list[torch.nn.Parameter] | list[dict], loss_fn: Callable[[int], torch.Tensor], steps: int,
        lr: float, log: Log, emas: Iterable[tuple[EMAModel, torch.nn.Module]] = (), warmup: int = 200,
        max_seconds: float | None = None, weight_decay: float = 1e-2) -> int:
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
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        for ema, module in emas:
            ema.step(module.parameters())
        step += 1
        value = loss.item() if step % 25 == 0 or step == plan["total"] else None
        if value is not None:
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.4f}")
            log.write(stage=stage, step=step, loss=value, lr=schedule.get_last_lr()[0],
                      seconds=round(time.perf_counter() - start, 1))
        if step == 20:  # the first steps pay for kernel selection: time the speed from here
            warm_start = time.perf_counter()
        if max_seconds and step == 70:
            per_step = (time.perf_counter() - warm_start) / 50
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


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class World:
    """What the stages hand each other."""

    options: BuildOptions
    profile: Profile
    device: torch.device
    log: Log
    train: Scenes | None = None
    heldout: Scenes | None = None
    edits: Edits | None = None
    tokenizer: CLIPTokenizer | None = None

    @property
    def out(self) -> Path:
        return self.options.out

    def generator(self, stage: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.options.seed * 1000 + stage)

    def batch_index(self, n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, n, (batch,), generator=gen, device=self.device)


def stage_data(w: World) -> None:
    """Render what the requested stages use (evaluation alone needs only the training captions)."""
    p, workers, stages = w.profile, w.options.workers, set(w.options.stages)
    w.train = render_scenes(p.train_scenes, w.options.seed, 0, workers, "render training scenes",
                            render=bool(stages & {"vae", "decoder", "teacher", "clip"}))
    w.heldout = render_scenes(p.heldout_scenes, w.options.seed, 1, workers, "render held-out scenes")
    w.edits = render_edits(p.edits if "ip2p" in stages else 0, w.options.seed, workers)
    w.tokenizer = word_tokenizer(vocabulary(), MAX_LENGTH)
    words = {word for text in w.train.captions + w.edits.instructions for word in text.split()}
    unknown = words - set(vocabulary())
    if unknown:
        raise ValueError(f"captions or instructions use words outside the toy vocabulary: {sorted(unknown)}")
    seen = set(w.train.captions)
    w.log.write(stage="data", train_scenes=p.train_scenes, distinct_captions=len(seen), edits=p.edits,
                heldout_captions_unseen=float(np.mean([c not in seen for c in w.heldout.captions])))


def stage_vae(w: World) -> None:
    torch.manual_seed(w.options.seed)
    vae = build_vae().to(w.device).train()
    gen, images, p = w.generator(1), w.train.images.to(w.device), w.profile

    def loss_fn(step: int) -> torch.Tensor:
        x = to_pixels(images[w.batch_index(len(images), p.vae_batch, gen)], w.device)
        with autocast(w.device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(gen)).sample
        # MSE is what PSNR measures; the KL term only keeps the latents bounded (SD's VAE uses 1e-6 too)
        return F.mse_loss(recon.float(), x) + 1e-6 * posterior.kl().mean()

    fit("vae", list(vae.parameters()), loss_fn, p.vae_steps, lr=1e-3, log=w.log, weight_decay=0.0,
        max_seconds=w.options.max_seconds.get("vae"))
    vae.eval()
    with torch.no_grad():  # SD's 0.18215 plays this role: unit-variance latents for the diffusion model
        sample = images[: min(len(images), 2048)]
        means = torch.cat([vae.encode(to_pixels(chunk, w.device)).latent_dist.mean for chunk in sample.split(256)])
    vae.register_to_config(scaling_factor=round(1.0 / means.std().item(), 5))
    w.log.write(stage="vae", scaling_factor=vae.config.scaling_factor)
    save_half(vae, w.out / "vae")


def stage_decoder(w: World) -> None:
    """Fine-tune the VAE decoder on the frozen encoder's latents (as SD's ft-MSE decoder): the latents the teacher
    learned stay exactly the same, so this can run before or after the teacher."""
    vae, p = load_vae(w), w.profile
    vae.decoder.train().requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    gen, images = w.generator(5), w.train.images.to(w.device)

    def loss_fn(step: int) -> torch.Tensor:
        x = to_pixels(images[w.batch_index(len(images), p.vae_batch, gen)], w.device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        with autocast(w.device):
            recon = vae.decode(z).sample
        return F.mse_loss(recon.float(), x)

    fit("decoder", params, loss_fn, p.decoder_steps, lr=3e-4, log=w.log, weight_decay=0.0,
        max_seconds=w.options.max_seconds.get("decoder"))
    save_half(vae, w.out / "vae")


def load_vae(w: World) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(w.out / "vae", dtype=torch.float32).to(w.device).eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, device: torch.device,
                   scaled: bool = True) -> torch.Tensor:
    """Posterior means [N, 4, 8, 8] (times the scaling factor unless `scaled` is False, as IP2P's image input and
    as `InstructPix2PixEditor` divides it out again)."""
    latents = torch.cat([vae_encode(vae, to_pixels(c, device)) for c in images.split(512)])
    return latents if scaled else latents / vae.config.scaling_factor


def denoising_loss(unet, text_encoder, latents, ids, alphas_cumprod, gen, extra=None,
                   high_t_fraction: float = 0.0) -> torch.Tensor:
    """Epsilon-prediction MSE at a uniform random timestep (SD's objective); the first `high_t_fraction` of the
    batch draws its timestep from the upper half of the schedule instead."""
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    steps = len(alphas_cumprod)
    t = torch.randint(0, steps, (len(latents),), generator=gen, device=latents.device)
    if high := int(len(t) * high_t_fraction):
        t[:high] = torch.randint(steps // 2, steps, (high,), generator=gen, device=latents.device)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    if extra is not None:  # InstructPix2Pix: the source latent joins on channels
        noisy = torch.cat([noisy, extra], dim=1)
    with autocast(latents.device):
        text = text_encoder(ids)[0]
        eps = unet(noisy, t, encoder_hidden_states=text).sample
    return F.mse_loss(eps.float(), noise)


def stage_teacher(w: World) -> None:
    p, device = w.profile, w.device
    vae = load_vae(w)
    latents = encode_latents(vae, w.train.images, device)  # [N, 4, 8, 8]
    ids = token_ids(w.tokenizer, w.train.captions).to(device)
    empty = token_ids(w.tokenizer, [""]).to(device)  # the unconditional input, as encode_prompts([""]) gives
    torch.manual_seed(w.options.seed + 1)
    if w.options.resume and (w.out / "unet").is_dir():
        text_encoder = CLIPTextModel.from_pretrained(w.out / "text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(w.out / "unet", dtype=torch.float32)
        w.log.write(stage="teacher", note="continued from the saved teacher")
    else:
        text_encoder = CLIPTextModel(text_config(len(w.tokenizer), hidden=64, layers=2, heads=4))
        unet = build_unet(cross_attention_dim=64)
    text_encoder, unet = text_encoder.to(device).train(), unet.to(device).train()
    scheduler = sd_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    emas = [ema_of(unet, p.ema_decay), ema_of(text_encoder, p.ema_decay)]
    gen = w.generator(2)

    def loss_fn(step: int) -> torch.Tensor:
        idx = w.batch_index(len(latents), p.teacher_batch, gen)
        batch_ids = ids[idx].clone()
        dropped = torch.rand(len(idx), generator=gen, device=device) < 0.1  # caption dropout: learns eps(x, "")
        batch_ids[dropped] = empty
        return denoising_loss(unet, text_encoder, latents[idx], batch_ids, alphas_cumprod, gen)

    fit("teacher", [*unet.parameters(), *text_encoder.parameters()], loss_fn, p.teacher_steps, lr=5e-4, log=w.log,
        emas=emas, max_seconds=w.options.max_seconds.get("teacher"))
    save_ema(emas[0], w.out / "unet")
    save_ema(emas[1], w.out / "text_encoder")
    w.tokenizer.save_pretrained(w.out / "tokenizer")
    scheduler.save_pretrained(w.out / "scheduler")
    (w.out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2) + "\n")


def clip_pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 32, 32, 3] -> CLIP inputs: what the saved `CLIPImageProcessor` gives a 32² image."""
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return (images.to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features, with the projection in pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def stage_clip(w: World) -> None:
    p, device = w.profile, w.device
    torch.manual_seed(w.options.seed + 2)
    if w.options.resume and (w.out / "clip").is_dir():
        model = CLIPModel.from_pretrained(w.out / "clip", dtype=torch.float32)
        w.log.write(stage="clip", note="continued from the saved CLIP")
    else:
        model = build_clip(len(w.tokenizer))
    model = model.to(device).train()
    ids = token_ids(w.tokenizer, w.train.captions).to(device)  # [N, 24]
    negatives = [token_ids(w.tokenizer, [neg[k] for neg in w.train.negatives]) for k in range(4)]
    negatives = torch.stack(negatives, dim=1).to(device)  # [N, 4, 24]
    images, gen = w.train.images.to(device), w.generator(3)

    def loss_fn(step: int) -> torch.Tensor:
        idx = w.batch_index(len(ids), p.clip_batch, gen)
        k = torch.randint(0, 4, (len(idx),), generator=gen, device=device)
        texts = torch.cat([ids[idx], negatives[idx, k]])  # [2B, 24]: captions, then one hard negative each
        with autocast(device):
            image = F.normalize(_pooled(model.get_image_features(
                pixel_values=clip_pixels(images[idx], device))).float(), dim=-1)
            text = F.normalize(_pooled(model.get_text_features(input_ids=texts)).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T  # [B, 2B]
        target = torch.arange(len(idx), device=device)
        # images pick their caption among all 2B texts; captions pick their image among the B images
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(idx)].T, target)) / 2

    fit("clip", list(model.parameters()), loss_fn, p.clip_steps, lr=5e-4, log=w.log,
        max_seconds=w.options.max_seconds.get("clip"))
    save_half(model, w.out / "clip")
    w.tokenizer.save_pretrained(w.out / "clip")
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": SIZE}, do_center_crop=True, crop_size={"height": SIZE, "width": SIZE},
        do_rescale=True, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(w.out / "clip")


def stage_ip2p(w: World) -> None:
    p, device = w.profile, w.device
    vae = load_vae(w)
    target = encode_latents(vae, w.edits.targets, device)  # scaled, the denoising target
    source = encode_latents(vae, w.edits.sources, device, scaled=False)  # posterior mode, unscaled, as IP2P
    text_encoder = CLIPTextModel.from_pretrained(w.out / "text_encoder", dtype=torch.float32).to(device)
    text_encoder.eval().requires_grad_(False)
    if w.options.resume and (w.out / "ip2p_unet").is_dir():
        unet = UNet2DConditionModel.from_pretrained(w.out / "ip2p_unet", dtype=torch.float32)
        w.log.write(stage="ip2p", note="continued from the saved IP2P UNet")
    else:
        teacher = UNet2DConditionModel.from_pretrained(w.out / "unet", dtype=torch.float32)
        unet = UNet2DConditionModel.from_config({**teacher.config, "in_channels": 8})
        state = teacher.state_dict()
        conv_in = state.pop("conv_in.weight")  # [C, 4, 3, 3]: the source-latent channels start at zero
        unet.load_state_dict(state, strict=False)
        with torch.no_grad():
            unet.conv_in.weight.zero_()
            unet.conv_in.weight[:, :4] = conv_in
    unet.to(device).train()
    ids = token_ids(w.tokenizer, w.edits.instructions).to(device)
    empty = token_ids(w.tokenizer, [""]).to(device)
    alphas_cumprod = sd_scheduler().alphas_cumprod.to(device)
    ema, gen = ema_of(unet, p.ema_decay), w.generator(4)

    def loss_fn(step: int) -> torch.Tensor:
        idx = w.batch_index(len(target), p.ip2p_batch, gen)
        batch_ids, image = ids[idx].clone(), source[idx].clone()
        # 5 % without the instruction, 5 % without the image: the two unconditional terms of IP2P's guidance
        batch_ids[torch.rand(len(idx), generator=gen, device=device) < 0.05] = empty
        image[torch.rand(len(idx), generator=gen, device=device) < 0.05] = 0
        # half of the batch at t >= 500, where the noisy latent no longer shows the layout and only the source
        # image can: the uniform draw left the edits blurred and shifted (8,000 such steps on CPU: toy-CLIP gain on
        # 32 held-out edits -17.4 -> +16.4, PSNR to the true edit 17.2 -> 23.3 dB)
        return denoising_loss(unet, text_encoder, target[idx], batch_ids, alphas_cumprod, gen, extra=image,
                              high_t_fraction=0.5)

    # 5e-4, not SD-IP2P's 1e-4, and ten times that on conv_in: Adam moves a weight about lr per step, and the
    # zero-initialised image channels of conv_in must grow to the size of the others (after 1,227 steps at 1e-4 and
    # 399 at 5e-4 they were at 10 % of it, and the edits did not keep the source).
    conv_in = list(unet.conv_in.parameters())
    rest = [q for name, q in unet.named_parameters() if not name.startswith("conv_in.")]
    fit("ip2p", [{"params": rest}, {"params": conv_in, "lr": 5e-3}], loss_fn, p.ip2p_steps, lr=5e-4, log=w.log,
        emas=[ema], max_seconds=w.options.max_seconds.get("ip2p"))
    save_ema(ema, w.out / "ip2p_unet")


# -------------------------------------------------------------------------------------------------------- evaluation
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (float64; +inf for identical ones)."""
    return peak_signal_noise_ratio(*(torch.tensor(x, dtype=torch.float64) for x in (a, b)), data_range=255.0).item()


class ToyClip:
    """The saved toy CLIP as a zero-shot judge: does an image rank its own caption above captions that differ in
    one attribute?"""

    def __init__(self, path: Path, device: torch.device):
        self.model = CLIPModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        ids = token_ids(self.tokenizer, captions).to(self.device)
        return F.normalize(_pooled(self.model.get_text_features(input_ids=ids)), dim=-1)

    @torch.no_grad()
    def image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_pixels(images, self.device)
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def checks(self, images: torch.Tensor, scenes: list[Scene]) -> list[dict[str, bool]]:
        """Per image, {check name: correct} for every check of `alternatives`."""
        embeds = self.image(images)
        results = []
        for embed, scene in zip(embeds, scenes):
            checks = alternatives(scene)
            captions = [scene.caption(), *{cap for others in checks.values() for cap in others}]
            score = dict(zip(captions, (self.text(captions) @ embed).tolist()))  # one text batch per scene
            truth = score[scene.caption()]
            results.append({name: all(truth > score[cap] for cap in others) for name, others in checks.items()})
        return results


def accuracy(checks: list[dict[str, bool]]) -> dict[str, float]:
    """Accuracy per attribute kind (shape, colour, background) and the fraction of images with every check right."""
    by_kind: dict[str, list[bool]] = {}
    for outcome in checks:
        for name, ok in outcome.items():
            by_kind.setdefault(name.rstrip("0123456789"), []).append(ok)
    result = {kind: float(np.mean(v)) for kind, v in by_kind.items()}
    result["all_correct"] = float(np.mean([all(o.values()) for o in checks]))
    return result


@torch.no_grad()
def guided_denoise(c, x_t: torch.Tensor, cond: torch.Tensor, uncond_steps: list[torch.Tensor], scale: float,
                   num_steps: int) -> torch.Tensor:
    """Plain DDIM sampling from x_t [B, 4, h, w] with CFG `scale` (1 = conditional only, no unconditional pass);
    `uncond_steps[i]` is the unconditional embedding of step i ([1 or B, L, D])."""

    def eps(i: int, latents: torch.Tensor, t: int) -> torch.Tensor:
        if scale == 1.0:
            return c.predict(latents, t, cond)
        uncond = uncond_steps[i].expand(len(latents), -1, -1)
        eps_u, eps_c = c.predict(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).chunk(2)
        return cfg(eps_u, eps_c, scale)

    return solve(x_t, c.schedule.pairs(num_steps), eps, c.schedule)[-1]


def decode(c, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return to_uint8(vae_decode(c.vae, latents))


def stage_eval(w: World) -> dict:
    from editlab.editors.ddim_p2p import DDIMP2PEditor
    from editlab.editors.null_text import NullTextEditor

    p, device = w.profile, w.device
    model = {"name": "toy", "kind": "pretrained", "path": str(w.out.resolve()), "resolution": SIZE}
    c = load_components(model, {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}, str(device))
    judge = ToyClip(w.out / "clip", device)
    held, n = w.heldout, min(p.eval_images, len(w.heldout.captions))
    report: dict = {"profile": w.options.profile, "eval_images": n, "ddim_steps": p.eval_steps}

    # 1. VAE reconstruction on held-out scenes (the ceiling of every edit)
    images = held.images[:n]
    z0 = encode_latents(c.vae, images, device)
    recon = decode(c, z0)
    report["vae_psnr"] = float(np.mean([psnr(a, b) for a, b in zip(recon, images.numpy())]))

    # 2. toy CLIP zero-shot: shape, colour and background of held-out scenes
    report["clip_zero_shot"] = accuracy(judge.checks(held.images, held.scenes))

    # 3. teacher: held-out captions sampled with 50-step DDIM + CFG, judged by the toy CLIP
    m = min(p.teacher_images, len(held.captions))
    report["teacher_images"] = m
    uncond = c.encode_prompts([""])
    cond = c.encode_prompts(held.captions[:m])
    gen = torch.Generator(device).manual_seed(w.options.seed)
    noise = torch.randn((m, 4, SIZE // 4, SIZE // 4), generator=gen, device=device)
    for scale in (3.0, 5.0, 7.5):  # 3: the toy tour's guidance
        samples = decode(c, guided_denoise(c, noise, cond, [uncond] * p.eval_steps, scale, p.eval_steps))
        report[f"teacher_cfg{scale:g}"] = accuracy(judge.checks(torch.from_numpy(samples), held.scenes[:m]))
    # the judge's own score on the real scenes of those captions, and on their VAE reconstructions: every sample is
    # decoded by this VAE, so a teacher that drew the exact latents of the real scenes would score the latter
    report["teacher_judge_on_real_scenes"] = accuracy(judge.checks(held.images[:m], held.scenes[:m]))
    reconstructions = torch.from_numpy(decode(c, encode_latents(c.vae, held.images[:m], device)))
    report["teacher_judge_on_vae_reconstructions"] = accuracy(judge.checks(reconstructions, held.scenes[:m]))
    seen = set(w.train.captions) if w.train else set()
    report["teacher_captions_unseen_in_training"] = float(np.mean([cap not in seen for cap in held.captions[:m]]))
    cond = cond[:n]

    # 4. DDIM inversion round trips: unguided, and under CFG 7.5 with the "" embedding or Null-Text Inversion's
    ddim = DDIMP2PEditor(c, num_steps=p.eval_steps)
    trajectory = ddim.invert(z0, cond)
    sources = images.numpy()

    def round_trip(latents: torch.Tensor, k: int | None = None) -> float:
        out = decode(c, latents)
        return float(np.mean([psnr(a, b) for a, b in zip(out, sources[: k or n])]))

    report["ddim_round_trip_psnr"] = round_trip(guided_denoise(c, trajectory[-1], cond, [], 1.0, p.eval_steps))
    report["ddim_cfg7.5_round_trip_psnr"] = round_trip(
        guided_denoise(c, trajectory[-1], cond, [uncond] * p.eval_steps, 7.5, p.eval_steps))
    k = min(p.nti_images, n)
    nti = NullTextEditor(c, num_steps=p.eval_steps)
    nti_latents, plain_latents = [], []
    for i in range(k):
        traj = nti.invert(z0[i : i + 1], cond[i : i + 1])
        nulls, _ = nti.null_embeddings(traj, cond[i : i + 1], uncond)
        nti_latents.append(guided_denoise(c, traj[-1], cond[i : i + 1], nulls, 7.5, p.eval_steps))
        plain_latents.append(guided_denoise(c, traj[-1], cond[i : i + 1], [uncond] * p.eval_steps, 7.5, p.eval_steps))
    report["nti_images"] = k
    report["ddim_cfg7.5_round_trip_psnr_nti_subset"] = round_trip(torch.cat(plain_latents), k)
    report["nti_cfg7.5_round_trip_psnr"] = round_trip(torch.cat(nti_latents), k)
    report["vae_psnr_nti_subset"] = float(np.mean([psnr(a, b) for a, b in zip(recon[:k], sources[:k])]))

    # 5. the InstructPix2Pix UNet on held-out edit triples
    if (w.out / "ip2p_unet").is_dir():
        report["ip2p"] = ip2p_report(w, model, judge, n=max(1, n // 2), steps=p.eval_steps)
    return report


def ip2p_settings(steps: int) -> dict[str, DictConfig]:
    """The InstructPix2Pix editor's settings as `python run.py` composes them: "piebench", its own
    (conf/editor/instruct_pix2pix.yaml) at `steps` steps (PIE-Bench: 50), and "tour", the toy tour's
    (conf/editor_settings/toy over them, settings=toy)."""
    single_job = ["~experiment", "editor=instruct_pix2pix"]
    with contextlib.ExitStack() as stack:
        if not GlobalHydra.instance().is_initialized():  # inside a Hydra app (or test) its own config search applies
            stack.enter_context(initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"))
        return {"piebench": compose(config_name="run", overrides=[*single_job, f"editor.num_steps={steps}"]).editor,
                "tour": compose(config_name="run", overrides=[*single_job, "settings=toy"]).editor}


def ip2p_report(w: World, model: dict, judge: ToyClip, n: int, steps: int) -> dict:
    """InstructPix2Pix edits of `n` edit triples from a stream its training never saw, with the editor's PIE-Bench
    settings and with the toy tour's (`ip2p_settings`): PSNR to the ground-truth target and the toy-CLIP gain of the
    target caption (cosine x 100), next to the unedited source's PSNR to the target (what a do-nothing edit scores)."""
    from editlab.editors.instruct_pix2pix import InstructPix2PixEditor

    settings = ip2p_settings(steps)
    c = load_components({**model, "unet_path": str(w.out / "ip2p_unet")}, {"dtype": "float32", "vae_dtype": "float32"},
                        {"mode": "none"}, str(w.device))
    edits = [make_edit("0", _rng(w.options.seed, 3, i), SIZE) for i in range(n)]
    sources = np.stack([e.source.render(SIZE) for e in edits])
    targets = np.stack([e.target.render(SIZE) for e in edits])
    image_latents = encode_latents(c.vae, torch.from_numpy(sources), w.device, scaled=False)
    target_text = judge.text([e.target.caption() for e in edits])

    def target_score(images: np.ndarray) -> np.ndarray:
        return 100 * (judge.image(torch.from_numpy(images)) * target_text).sum(-1).cpu().numpy()

    report = {"items": n, "source_gt_psnr": float(np.mean([psnr(a, b) for a, b in zip(sources, targets)]))}
    for name, config in settings.items():
        options = {key: config[key] for key in ("num_steps", "guidance_scale", "image_guidance_scale")}
        editor = InstructPix2PixEditor(c, **options)
        edited = np.concatenate([
            decode(c, editor.sample(image_latents[i : i + 1], e.instruction, torch.Generator("cpu").manual_seed(i)))
            for i, e in enumerate(edits)
        ])
        report[name] = {**options, "gt_psnr": float(np.mean([psnr(a, b) for a, b in zip(edited, targets)])),
                        "clip_gain": float(np.mean(target_score(edited) - target_score(sources)))}
    return report


# -------------------------------------------------------------------------------------------------------------- build
STAGES: dict[str, Callable[[World], dict | None]] = {
    "data": stage_data, "vae": stage_vae, "decoder": stage_decoder, "teacher": stage_teacher, "clip": stage_clip,
    "ip2p": stage_ip2p, "eval": stage_eval,
}
assert tuple(STAGES) == ALL_STAGES


def build(options: BuildOptions) -> dict:
    """Run the data stage, then `options.stages` in order; returns the eval stage's report (also written to
    ``<out>/quality.json``), or {} when it did not run."""
    if unknown := set(options.stages) - set(ALL_STAGES):
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {ALL_STAGES}")
    options.out.mkdir(parents=True, exist_ok=True)
    diffusers_logging.set_verbosity_error()  # silences the advice on casting to float16 before saving
    if options.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions once
    profile = PROFILES[options.profile]
    w = World(options, profile, torch.device(options.device), Log(options.out / "build_log.jsonl"))
    w.log.write(stage="start", profile=options.profile, device=options.device, seed=options.seed,
                stages=list(options.stages), config=profile.__dict__)
    report: dict = {}
    for stage in ["data", *[s for s in options.stages if s != "data"]]:  # every stage needs the data
        start = time.perf_counter()
        try:
            result = STAGES[stage](w)
        except Exception:
            w.log.write(stage=stage, error=traceback.format_exc())
            if not options.keep_going:
                raise
            print(f"stage {stage} failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        minutes = (time.perf_counter() - start) / 60
        w.log.write(stage=stage, minutes=round(minutes, 2))
        print(f"[{stage}] done in {minutes:.1f} min", flush=True)
        if stage == "eval":
            report = result
            (options.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report, indent=2))
    return report
