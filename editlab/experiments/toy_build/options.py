"""What a build is asked for (`BuildOptions`: the command line's flags) and how big it is (`Profile`), with the
image size every stage shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SIZE = 32  # image side; latents are 8²
LATENT_SIZE = SIZE // 4  # the VAE downsamples by 4, like the tiny test model
ALL_STAGES = ("data", "vae", "decoder", "teacher", "clip", "ip2p", "flow", "eval")


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
    flow_steps: int = 6_000  # the SD3-shaped flow teacher (stage flow)
    flow_batch: int = 64
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
    "quick": Profile(64, 16, 32, 3, 4, 3, 4, 3, 8, 3, 4, flow_steps=3, flow_batch=4, decoder_steps=3, eval_steps=4,
                     eval_images=4, teacher_images=4, nti_images=1),
}
