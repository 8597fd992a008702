"""Build the toy world's models from seed, with the project's own code (the command line:
``python scripts/build_toy_world.py --help``; `build` here).

The world is `toyworld.scenes`: 32² scenes of one or two coloured shapes on a background, captioned in a fixed
35-word grammar. The stages, one module each, each with a progress bar and its losses logged to
``<out>/build_log.jsonl``:

1. data (`data`): training scenes with hard-negative captions, held-out scenes and edit triples. It always runs
   (it is deterministic) and renders only what the requested stages use.
2. vae, 3. decoder (`vae`): an `AutoencoderKL`, 32² RGB <-> 4 x 8² latents, then its decoder fine-tuned on the
   frozen encoder's latents.
4. teacher (`teacher`, over `text_encoder`): a word-level `CLIPTokenizer`, a 2-layer `CLIPTextModel` and an
   SD-shaped `UNet2DConditionModel` trained jointly on epsilon prediction with caption dropout. EMA weights are kept.
5. clip (`clip`): a small contrastive `CLIPModel` that scores toy runs and judges the quality bars (`judge`).
6. ip2p (`ip2p`): an InstructPix2Pix-style UNet initialised from the teacher and fine-tuned on edit triples.
7. flow (`flow`): an SD3-shaped flow-matching transformer on the teacher's frozen text encoder, trained with the
   rectified-flow velocity loss (``<out>/flow``, ``model=toy_flow``).
8. eval (`quality`): the quality bars, measured on the saved files, written to ``<out>/quality.json``.

`training` holds the loop they share, `world` what they hand each other, `options` the flags and profiles.
``resume`` continues the teacher, CLIP and IP2P UNet saved in the output folder with a new warmup + cosine cycle;
``max_seconds`` caps a training stage's time (shortening its schedule). The iCD adapters are distilled afterwards by
``python train.py train/experiment=toy`` (see conf/train/experiment).

Output (diffusers layout, loadable as ``model.kind: pretrained``): ``<out>/{unet,vae,text_encoder,tokenizer,
scheduler}`` plus ``<out>/clip`` (CLIPModel + tokenizer + image processor) and ``<out>/ip2p_unet``. Diffusion
weights are stored in float16 (the loaders cast them to the run's precision; the CLIP metric to float32), so that
the whole world, iCD adapters included, fits in 30 MB.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Callable

import torch
from diffusers.utils import logging as diffusers_logging

from editlab.experiments.toy_build.clip import stage_clip
from editlab.experiments.toy_build.data import stage_data
from editlab.experiments.toy_build.flow import stage_flow
from editlab.experiments.toy_build.ip2p import stage_ip2p
from editlab.experiments.toy_build.options import ALL_STAGES, PROFILES, BuildOptions, Profile
from editlab.experiments.toy_build.quality import stage_eval
from editlab.experiments.toy_build.teacher import stage_teacher
from editlab.experiments.toy_build.vae import stage_decoder, stage_vae
from editlab.experiments.toy_build.world import Log, World

__all__ = ["ALL_STAGES", "PROFILES", "STAGES", "BuildOptions", "Profile", "build"]

STAGES: dict[str, Callable[[World], dict | None]] = {
    "data": stage_data, "vae": stage_vae, "decoder": stage_decoder, "teacher": stage_teacher, "clip": stage_clip,
    "ip2p": stage_ip2p, "flow": stage_flow, "eval": stage_eval,
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
