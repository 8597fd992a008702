"""iCD cost: seconds per edit, UNet evaluations and peak memory of the editor, and training throughput.

    python benchmarks/icd_bench.py --model tiny                       # CPU
    python benchmarks/icd_bench.py --model sd15_arch --dtype bfloat16  # GPU: full SD1.5 size, random weights

The UNet gets a w-embedding (``time_cond_proj_dim = 512``) like the CFG-distilled teacher, so one UNet call per
step covers the guided target row; the adapters are rank 64 (untrained: cost is what matters here). Training
throughput runs the full four-loss iteration on random latents (the VAE is not in the loop, as with precomputed
latents) and reports images per second. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from editors.base import EditRequest, build_editor
from editors.models import load_components
from icd.data import collate
from icd.guidance import GuidancePolicy
from icd.schedule import BoundarySchedule
from icd.teacher import add_guidance_embedding
from icd.training import ICDModule

MODELS = {
    "tiny": {"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64},
    "sd15_arch": {"name": "sd15_arch", "kind": "random_arch", "arch": "sd15", "seed": 0, "resolution": 512},
}
SOURCE, TARGET = "a photo of a cat sitting on a wooden table", "a photo of a dog sitting on a wooden table"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def components_for(model: str, dtype: str, device: str):
    components = load_components(MODELS[model], {"dtype": dtype, "vae_dtype": "float32"}, {"mode": "none"}, device)
    components.unet = add_guidance_embedding(components.unet)  # the CFG-distilled layout: w in one pass
    return components


def bench_edit(args) -> dict:
    c = components_for(args.model, args.dtype, args.device)
    editor = build_editor({"name": "icd", "method": args.method}, c)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (c.resolution, c.resolution, 3), dtype=np.uint8))
    request = EditRequest(image, SOURCE, TARGET, blend_words=("cat", "dog"), seed=0)
    for _ in range(args.warmup):
        editor.edit(request)
    if c.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(c.device)
    seconds, nfe = [], 0
    for _ in range(args.repeats):
        result = editor.edit(request)
        seconds.append(result.seconds)
        nfe = result.nfe
    peak = torch.cuda.max_memory_allocated(c.device) / 2**20 if c.device.type == "cuda" else float("nan")
    return {"bench": "edit", "model": args.model, "dtype": args.dtype, "method": args.method, "nfe": nfe,
            "seconds_median": statistics.median(seconds), "seconds_mean": statistics.mean(seconds),
            "peak_mem_mb": peak, "device": str(c.device)}


class RandomLatents(Dataset):
    def __init__(self, n: int, size: int):
        self.latents = torch.randn(n, 4, size, size)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "caption": SOURCE}


class Throughput(pl.Callback):
    def __init__(self, skip: int):
        self.skip, self.times, self.images = skip, [], 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        sync(module.device)
        self.times.append(time.perf_counter())
        if len(self.times) > self.skip + 1:
            self.images += len(batch["captions"])


def bench_train(args) -> dict:
    c = components_for(args.model, args.dtype, "cpu")
    module = ICDModule(c, BoundarySchedule(4), GuidancePolicy(), lora_rank=64, topology=args.topology,
                       gradient_checkpointing=args.checkpointing)
    precision = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}[args.dtype]
    meter = Throughput(skip=args.warmup)
    iterations = args.warmup + args.repeats + 1
    trainer = pl.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                         precision=precision, max_steps=iterations * module.steps_per_iteration, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[meter])
    loader = DataLoader(RandomLatents(iterations * args.batch_size, c.latent_size), batch_size=args.batch_size,
                        collate_fn=collate)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    seconds = meter.times[-1] - meter.times[args.warmup]
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return {"bench": "train", "model": args.model, "dtype": args.dtype, "topology": args.topology,
            "batch_size": args.batch_size, "gradient_checkpointing": args.checkpointing,
            "images_per_sec": meter.images / seconds, "seconds_per_iteration": seconds / args.repeats,
            "peak_mem_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--method", choices=["p2p", "prompt_switch"], default="p2p")
    parser.add_argument("--what", choices=["edit", "train", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--topology", choices=["sequential", "joint"], default="sequential")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.what in ("edit", "both"):
        print(json.dumps(bench_edit(args)), flush=True)
    if args.what in ("train", "both"):
        print(json.dumps(bench_train(args)), flush=True)


if __name__ == "__main__":
    main()
