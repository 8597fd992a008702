"""What the stages hand each other (`World`: the rendered data, the tokenizer, the log) and the log itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from editlab.experiments.toy_build.options import BuildOptions, Profile
from editlab.toyworld.scenes import Scene

SEEDS_PER_RUN = 1000  # a stage's generator is seeded seed * 1000 + its number, so stages draw apart


class Log:
    """Losses and notes of every stage, one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


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
        return torch.Generator(self.device).manual_seed(self.options.seed * SEEDS_PER_RUN + stage)

    def batch_index(self, n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, n, (batch,), generator=gen, device=self.device)
