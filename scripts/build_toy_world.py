"""Build the toy world's models from seed: the command line of `experiments.toy_build` (the stages).

    python scripts/build_toy_world.py                      # profile "cpu" (default): about 80 min on 2 CPU cores
    python scripts/build_toy_world.py --device cuda --profile gpu   # the shipped weights' start (one GPU)
    python scripts/build_toy_world.py --profile finetune --resume --stages teacher --max-seconds teacher=2100
    python scripts/build_toy_world.py --profile quick      # seconds: a smoke test of every stage

``--stages`` runs a subset (the data stage always runs; it is deterministic), ``--resume`` continues the teacher,
CLIP and IP2P UNet saved in ``--out`` with a new warmup + cosine cycle. Losses and timings go to
``<out>/build_log.jsonl``, the quality bars to ``<out>/quality.json``. How the shipped weights in weights/toy were
built: the README's toy-world section.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from editlab.experiments.toy_build import ALL_STAGES, PROFILES, BuildOptions, build  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "editlab" / "weights" / "toy")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--quick", action="store_const", const="quick", dest="profile", help="= --profile quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(ALL_STAGES), help=f"comma-separated subset of {ALL_STAGES}")
    parser.add_argument("--workers", type=int, default=max(1, min(16, multiprocessing.cpu_count())),
                        help="processes rendering the data")
    parser.add_argument("--max-seconds", default="", type=lambda s: {k: float(v) for k, v in
                                                                      (kv.split("=") for kv in s.split(",") if kv)},
                        help="time caps per training stage, e.g. teacher=200,vae=60 (shortens the schedule)")
    parser.add_argument("--keep-going", action="store_true", help="log a failing stage and go on with the next")
    parser.add_argument("--resume", action="store_true",
                        help="continue training the teacher, CLIP and IP2P UNet saved in --out (new optimiser, "
                             "new warmup + cosine cycle) instead of starting from random weights")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    if unknown := set(stages) - set(ALL_STAGES):
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {ALL_STAGES}")
    return build(BuildOptions(out=args.out, profile=args.profile, device=args.device, seed=args.seed, stages=stages,
                              workers=args.workers, max_seconds=args.max_seconds, keep_going=args.keep_going,
                              resume=args.resume))


if __name__ == "__main__":
    main()
