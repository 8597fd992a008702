"""The toy world's guidance-distillation chain, measured: plain toy teacher -> distilled teacher -> iCD on it.

    python train.py train/experiment=toy_guidance hydra.run.dir=outputs/toy_teacher
    python train.py train/experiment=toy train/teacher=distilled hydra.run.dir=outputs/toy_icd_distilled \\
        train.teacher.checkpoint=outputs/toy_teacher/teacher/cfg_distill.safetensors train.icd.lora.rank=8 \\
        train.icd.lora.alpha=8
    python -m editlab.experiments.toy_guidance_chain --teacher outputs/toy_teacher/teacher/cfg_distill.safetensors \\
        --adapters outputs/toy_icd_distilled/lora

prints, on toy scenes that no training run saw (own seed stream):

1. the distilled teacher's single-pass relative error against the plain teacher's two-pass CFG per w, beside the
   error of the plain teacher with w ignored (`icd.guidance_distillation.guidance_errors`);
2. samples (50-step DDIM) at w = 2 code units (classic 3, the toy's best guidance) from the single pass and from the
   two passes, judged by the toy CLIP (`experiments.toy_build.judge.ToyClip`: shape, colour and background right);
3. round trips: the plain and the distilled teacher's 50 + 50-step DDIM (unguided inversion and decoding; the
   distilled one at w = 0), and iCD's 4 + 4 steps
   with the ``--adapters`` trained on the distilled teacher (and, for reference, the shipped ones on the plain one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from editlab.diffusion.solver import noisier_end, solve
from editlab.editors.base import build_editor
from editlab.experiments.console import quiet_libraries
from editlab.experiments.toy_build.judge import ToyClip, accuracy, psnr
from editlab.icd.guidance_distillation import guidance_errors, sample_latents
from editlab.icd.teacher import load_cfg_distilled
from editlab.models.components import Components, vae_decode
from editlab.models.guidance import Guidance, unet_guidance
from editlab.models.images import to_uint8
from editlab.models.loading import load_components
from editlab.toyworld.scenes import random_scene

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "toy"
TOY = {"name": "toy", "kind": "pretrained", "path": str(WEIGHTS), "resolution": 32}
FP32 = {"dtype": "float32", "vae_dtype": "float32"}
SCENE_STREAM = 23  # held-out scenes: default_rng([23, k]); the toy training set is default_rng(0)
BEST_W = 2.0       # code units (classic 3): the toy tour's guidance


def toy_components() -> Components:
    return load_components(TOY, FP32, {"mode": "none"}, "cpu")


def held_out_scenes(n: int) -> list:
    return [random_scene(np.random.default_rng([SCENE_STREAM, k])) for k in range(n)]


def decode(c: Components, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return to_uint8(vae_decode(c.vae, latents))


def ddim_round_trip(c: Components, model: Guidance, z0: torch.Tensor, text, steps: int = 50) -> torch.Tensor:
    """Unguided DDIM inversion of ``z0`` and unguided DDIM back down, ``steps`` each."""
    w = torch.zeros(z0.shape[0])

    def eps(i, x, t):
        return model(x, t, text, w)

    noised = solve(z0, c.schedule.pairs(steps, inverse=True), eps, c.schedule, at=noisier_end, skip_identity=True)
    return solve(noised[-1], c.schedule.pairs(steps), eps, c.schedule)[-1]


def icd_round_trip(images: list[np.ndarray], captions: list[str], adapters: Path | None,
                   teacher: Path | None = None) -> float:
    """Mean PSNR of iCD's 4-step forward then 4-step unguided reverse pass with the adapters in folder ``adapters``
    (None: untrained ones, i.e. the teacher at 4 steps) on ``teacher`` (None: the plain toy teacher)."""
    c = toy_components()
    options = {"name": "icd", "code_guidance_scale": 0.0}
    if adapters is not None:
        options |= {"forward_lora": str(adapters / "forward.safetensors"),
                    "reverse_lora": str(adapters / "reverse.safetensors")}
    if teacher is not None:
        options["teacher_checkpoint"] = str(teacher)
    editor = build_editor(options, c)
    scores = []
    for k, (image, caption) in enumerate(zip(images, captions)):
        z0 = c.encode_image(Image.fromarray(image))
        cond = editor.components.conditioning([caption])
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(k))
        latents = editor.generate_latents(editor.invert(z0, cond, noise), cond)
        scores.append(psnr(np.asarray(c.decode_latents(latents)[0]), image))
    return float(np.mean(scores))


@torch.no_grad()
def measure(teacher: Path, adapters: Path | None, n_images: int = 64, n_round_trip: int = 16) -> dict:
    start = time.perf_counter()
    c = toy_components()
    plain = unet_guidance(c.unet, "cfg", c.conditioning([""]))
    distilled = unet_guidance(load_cfg_distilled(c.unet, teacher), "embedded")
    judge = ToyClip(WEIGHTS / "clip", c.device)
    scenes = held_out_scenes(n_images)
    images = [s.render(c.resolution) for s in scenes]
    captions = [s.caption() for s in scenes]
    text = c.conditioning(captions)
    z0 = torch.cat([c.encode_image(Image.fromarray(image)) for image in images])
    report: dict = {"teacher": str(teacher), "adapters": str(adapters) if adapters else None, "images": n_images}

    # 1. single-pass error per w, against two-pass CFG
    errors = guidance_errors(plain, distilled, z0, text, c.alphas_cumprod, scales=(0.0, 2.0, 4.0, 6.5))
    report["relative_error"] = {f"{w:g}": {"distilled": e, "w_ignored": b} for w, (e, b) in errors.items()}

    # 2. judged samples at the toy's best guidance
    shape = (n_images, c.unet.config.in_channels, c.latent_size, c.latent_size)
    for name, model in (("two_pass", plain), ("distilled", distilled)):
        samples = decode(c, sample_latents(model, text, BEST_W, shape, c.alphas_cumprod, num_steps=50))
        report[f"judged_w{BEST_W:g}_{name}"] = accuracy(judge.checks(torch.from_numpy(samples), scenes))

    # 3. round trips
    k = min(n_round_trip, n_images)
    sub = text[:k]
    report["round_trip_images"] = k
    for name, model in (("", plain), ("_distilled", distilled)):  # the distilled teacher at w = 0
        report[f"ddim50_round_trip_psnr{name}"] = float(np.mean(
            [psnr(a, b) for a, b in zip(decode(c, ddim_round_trip(c, model, z0[:k], sub)), images[:k])]))
    report["icd_round_trip_psnr_shipped_adapters"] = icd_round_trip(images[:k], captions[:k], WEIGHTS / "icd", None)
    if adapters is not None:
        report["icd_round_trip_psnr"] = icd_round_trip(images[:k], captions[:k], adapters, teacher)
    report["seconds"] = time.perf_counter() - start
    return report


def print_report(report: dict) -> None:
    print(f"distilled toy teacher {report['teacher']} on {report['images']} held-out toy scenes")
    print("relative single-pass error against two-pass CFG (code units w; t = 259, 519, 779):")
    print("  w      " + "  ".join(f"{w:>6}" for w in report["relative_error"]))
    for key in ("distilled", "w_ignored"):
        print(f"  {key:<9}" + "  ".join(f"{v[key]:6.3f}" for v in report["relative_error"].values()))
    for name in ("two_pass", "distilled"):
        a = report[f"judged_w{BEST_W:g}_{name}"]
        print(f"samples at w = {BEST_W:g} (50 DDIM steps), {name:>9}: all correct {a['all_correct']:.3f} (shape "
              f"{a['shape']:.3f}, colour {a['colour']:.3f}, background {a['background']:.3f})")
    print(f"round trip PSNR over {report['round_trip_images']} scenes: DDIM 50 + 50 of the plain teacher "
          f"{report['ddim50_round_trip_psnr']:.2f} dB, of the distilled one "
          f"{report['ddim50_round_trip_psnr_distilled']:.2f} dB; iCD 4 + 4, shipped adapters on the plain teacher "
          f"{report['icd_round_trip_psnr_shipped_adapters']:.2f} dB"
          + (f", adapters on the distilled teacher {report['icd_round_trip_psnr']:.2f} dB"
             if "icd_round_trip_psnr" in report else ""))
    print(f"({report['seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="<guidance run>/teacher/cfg_distill.safetensors")
    parser.add_argument("--adapters", type=Path, help="<iCD run on it>/lora (forward / reverse .safetensors)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--round-trip-images", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    quiet_libraries()
    for path in [args.teacher] + ([args.adapters / "forward.safetensors"] if args.adapters else []):
        if not path.is_file():
            parser.error(f"{path} does not exist: train it first (see the commands in this module's help)")
    report = measure(args.teacher, args.adapters, args.images, args.round_trip_images)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
