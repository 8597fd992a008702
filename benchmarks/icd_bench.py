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

from editlab.editors.base import EditRequest, build_editor
from editlab.icd.data import collate
from editlab.icd.guidance import GuidancePolicy
from editlab.icd.schedule import BoundarySchedule
from editlab.icd.teacher import add_guidance_embedding
from editlab.icd.training import ICDModule, OptimSettings
from editlab.models.loading import load_components, to_channels_last

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


# Speed-ups, applied cumulatively in this order by --variants (one process, one set of weights):
#   fused: the students as merged weights (editor.fuse_adapters), half_vae: the VAE in the UNet's dtype,
#   channels_last: NHWC memory format for the UNet and VAE convolutions.
VARIANTS = ("baseline", "fused", "half_vae", "channels_last")


def time_edits(editor, request, c, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        editor.edit(request)
    if c.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(c.device)
    results = [editor.edit(request) for _ in range(repeats)]
    seconds = [r.seconds for r in results]
    peak = torch.cuda.max_memory_allocated(c.device) / 2**20 if c.device.type == "cuda" else float("nan")
    return {"nfe": results[-1].nfe, "seconds_median": statistics.median(seconds), "seconds_min": min(seconds),
            "peak_mem_mb": peak}


def profile_edit(editor, request, c, rows: int) -> dict:
    """One edit under torch.profiler: the CPU time spent launching vs the device time, and the top device ops."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if c.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        editor.edit(request)
        sync(c.device)
    events = prof.key_averages()
    if c.device.type == "cuda":  # the kernels themselves (operator rows would count their kernels twice)
        key, busy = "self_device_time_total", [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        key, busy = "self_cpu_time_total", list(events)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {"device_ms": sum(getattr(e, key) for e in busy) / 1e3, "kernel_launches": launches,
            "top": [(e.key[:60], round(getattr(e, key) / 1e3, 2), e.count)
                    for e in sorted(busy, key=lambda e: getattr(e, key), reverse=True)[:rows]]}


def bench_edit(args) -> list[dict]:
    c = components_for(args.model, args.dtype, args.device)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (c.resolution, c.resolution, 3), dtype=np.uint8))
    request = EditRequest(image, SOURCE, TARGET, blend_words=("cat", "dog"), seed=0)
    rows, fused = [], False
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
        fused = fused or variant == "fused"
        if variant == "half_vae":
            c.vae.to(c.dtype)
            c.vae_dtype = c.dtype
        if variant == "channels_last":
            to_channels_last(c.unet, c.vae)
        editor = build_editor({"name": "icd", "method": args.method, "fuse_adapters": fused}, c)
        row = {"bench": "edit", "variant": f"+{variant}" if variant != "baseline" else variant, "model": args.model,
               "dtype": args.dtype, "vae_dtype": str(c.vae_dtype).removeprefix("torch."), "method": args.method,
               **time_edits(editor, request, c, args.warmup, args.repeats), "device": str(c.device)}
        if args.profile:
            row["profile"] = profile_edit(editor, request, c, args.profile)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


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
    module = ICDModule(c, BoundarySchedule(4), GuidancePolicy(), optim=OptimSettings(topology=args.topology),
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
            "peak_mem_mb": peak,
            "last_logged": {k: round(float(v), 5) for k, v in trainer.callback_metrics.items()}}


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
    parser.add_argument("--variants", default="baseline",
                        help=f"comma-separated edit variants, applied cumulatively in order, from {VARIANTS}")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also profile one edit per variant and print its top ROWS device ops")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.what in ("edit", "both"):
        bench_edit(args)
    if args.what in ("train", "both"):
        print(json.dumps(bench_train(args)), flush=True)


if __name__ == "__main__":
    main()
