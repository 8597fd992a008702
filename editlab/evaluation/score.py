"""Score a folder of PIE-Bench edits produced by any method, with the reference evaluator's conventions.

    python -m editlab.evaluation.score --data /path/PIE-Bench_v1 --edits /path/to/outputs/annotation_images

The edits folder mirrors `annotation_images/`: the edit of item `<image_path>` is `edits/<image_path>`, or the
same stem with another common extension. An edit larger than its source (e.g. the reference runners' 2048x512
[text | source | reconstruction | edit] panel) is cropped to its right-most-bottom source-sized window, like the
reference evaluator; a smaller one is resized to the source size and noted. Missing or unreadable edits become
error rows. Where the benchmark ships the true edits (`ground_truth/`, the toy sets) the ground-truth metrics are
scored too. Writes a per-item CSV and `<out stem>_summary.csv`, and prints the summary. `--backbones toy` scores
with the toy world's backbones, offline.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from editlab.evaluation.backbones import CLIP_PATH, failure_notes
from editlab.evaluation.files import atomic_write
from editlab.evaluation.ground_truth import load_ground_truth, with_ground_truth
from editlab.evaluation.piebench import PieBenchDataset, PieBenchItem, load_rgb_image
from editlab.evaluation.protocol import Metric, Sample, build_metrics
from editlab.evaluation.summary import format_summary, summarize
from editlab.evaluation.toyset import sets_in_cache

log = logging.getLogger(__name__)

EDIT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
BACKBONE_PRESETS = {
    "reference": {"structure_backbone": "dino", "structure_path": None, "clip_path": CLIP_PATH, "lpips_net": "squeeze",
                  "on_missing": "error"},
    "toy": {"structure_backbone": "clip_vision", "structure_path": "./weights/toy/clip",
            "clip_path": "./weights/toy/clip", "lpips_net": "none", "on_missing": "warn"},
}
FLAGS = {"structure.path": "--structure-path", "clip.path": "--clip-path", "on_missing": "--on-missing"}


def find_edit(edits: Path, image_path: str) -> Path | None:
    """`edits/<image_path>`, else the same stem with another common extension (either case)."""
    exact = edits / image_path
    if exact.is_file():
        return exact
    stem = exact.with_suffix("")
    for ext in EDIT_EXTENSIONS:
        for candidate in (stem.with_suffix(ext), stem.with_suffix(ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def fit_to_source(edit: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """Crop a larger edit to its right-most-bottom `size` window (reference panel layout); resize a smaller one."""
    (width, height), (src_w, src_h) = edit.size, size
    if (width, height) == size:
        return edit, ""
    if width >= src_w and height >= src_h:
        box = (width - src_w, height - src_h, width, height)
        return edit.crop(box), f"cropped {width}x{height} to box {box}"
    return edit.resize(size, Image.Resampling.BICUBIC), f"resized {width}x{height} to {src_w}x{src_h}"


def columns(metrics: Metric) -> list[str]:
    """The scores CSV's columns: the metrics' own (the ground-truth ones last, `with_ground_truth`)."""
    return ["image_id", "edit_type", *metrics.columns, "error", "note"]


def score_item(item: PieBenchItem, dataset: PieBenchDataset, edits: Path, metrics: Metric) -> dict[str, Any]:
    row: dict[str, Any] = {"image_id": item.image_id, "edit_type": item.edit_type}
    row |= {key: float("nan") for key in metrics.columns}
    notes = []
    try:
        source, note = load_rgb_image(dataset.image_file(item))
        notes.append(f"source {note}" if note else "")
        edit_file = find_edit(edits, item.image_path)
        if edit_file is None:
            raise FileNotFoundError(f"no edit for {item.image_path} under {edits}")
        edit, note = load_rgb_image(edit_file)
        notes.append(f"edit {note}" if note else "")
        edit, note = fit_to_source(edit, source.size)
        notes.append(note)
        mask = dataset.load_mask(item, source.height, source.width)
        edited = np.asarray(edit)
        sample = Sample(edited, np.asarray(source), mask, item.source_prompt, item.target_prompt, item.instruction,
                        load_ground_truth(dataset.root, item.image_path, edited), key=item.image_id,
                        edit_type=item.edit_type)
        row |= metrics.score([sample])[0]
        notes += failure_notes(sample.failures)
        row["error"] = ""
    except Exception as err:  # one bad item must not end a 700-item run; it is reported in the CSV instead
        row["error"] = f"{type(err).__name__}: {err}"
        log.warning("item %s: %s", item.image_id, row["error"])
    row["note"] = "; ".join(n for n in notes if n)
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m editlab.evaluation.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="PIE-Bench root (mapping_file.json)")
    parser.add_argument("--edits", required=True, type=Path, help="folder mirroring annotation_images/")
    parser.add_argument("--out", type=Path, help="per-item CSV (default: scores.csv next to the edits folder)")
    parser.add_argument("--name", help="editor name in the summary (default: the edits folder name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--edit-types", nargs="+", help="edit type ids to score, e.g. 1 2")
    parser.add_argument("--limit", type=int, help="score the first N items (after the edit-type filter)")
    parser.add_argument("--mask-size", type=int,
                        help="side of the grid the masks index (default: PIE-Bench's 512, or a generated set's own)")
    parser.add_argument("--backbones", default="reference", choices=sorted(BACKBONE_PRESETS),
                        help="reference: PIE-Bench's DINO ViT-B/8, CLIP ViT-L/14, LPIPS SqueezeNet (hub or cache); "
                             "toy: the toy world's CLIP (weights/toy/clip), LPIPS unavailable; the flags below "
                             "override single backbones")
    parser.add_argument("--structure-backbone", choices=["dino", "clip_vision", "none"])
    parser.add_argument("--structure-path", help="local directory or hub id (default: facebook/dino-vitb8)")
    parser.add_argument("--clip-path", help=f"local directory or hub id (default: {CLIP_PATH}); 'none' skips CLIP")
    parser.add_argument("--lpips-net", choices=["squeeze", "none"])
    parser.add_argument("--on-missing", choices=["error", "warn"],
                        help="a backbone that cannot be loaded: stop (error) or score without its metric (warn)")
    args = parser.parse_args(argv)
    for key, value in BACKBONE_PRESETS[args.backbones].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def default_name(edits: Path) -> str:
    # runners write <method>/annotation_images/...; the method's folder is the informative name
    edits = edits.resolve()
    return edits.parent.name if edits.name == "annotation_images" else edits.name


def main(argv: Sequence[str] | None = None, metrics: Metric | None = None) -> pd.DataFrame:
    """Run the CLI; `metrics` replaces the backbones built from the flags (tests inject tiny ones)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.edits.is_dir():
        raise SystemExit(f"edits folder not found: {args.edits}")
    try:
        dataset = PieBenchDataset(args.data, edit_types=args.edit_types, limit=args.limit, mask_size=args.mask_size)
    except FileNotFoundError as err:
        if sets := sets_in_cache(args.data):  # the built-in set's cache: its sets are in subfolders
            raise SystemExit(f"{args.data} is the built-in toy set's cache; pass one of its sets as --data: "
                             f"{', '.join(map(str, sets))} (python -m editlab.evaluation.toyset [run.py overrides] "
                             "prints the one a run reads)") from err
        raise SystemExit(f"{err} Here that is the --data flag.") from err
    except ValueError as err:  # a malformed mapping file: the message names it and the entry
        raise SystemExit(str(err)) from err
    if metrics is None:
        try:
            metrics = build_metrics(
                {
                    "structure": {"backbone": args.structure_backbone, "path": args.structure_path},
                    "clip": {"path": args.clip_path},
                    "lpips": {"net": args.lpips_net},
                    "on_missing": args.on_missing,
                },
                args.device, FLAGS,
            )
        except RuntimeError as err:  # a backbone that cannot be loaded: the message names the flag to set
            raise SystemExit(f"error: {err}") from err
    metrics = with_ground_truth(metrics)
    rows = [score_item(item, dataset, args.edits, metrics) for item in tqdm(dataset, desc="scoring", unit="edit")]
    results = pd.DataFrame(rows, columns=columns(metrics))

    out = args.out or args.edits.resolve().parent / "scores.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: results.to_csv(f, index=False))
    summary = summarize(results.assign(editor=args.name or default_name(args.edits)))
    summary_path = out.with_name(f"{out.stem}_summary.csv")
    atomic_write(summary_path, lambda f: summary.to_csv(f, index=False))

    failed = int((results["error"] != "").sum())
    print(f"scored {len(results) - failed}/{len(results)} edits ({failed} errors) -> {out}, {summary_path}")
    if metrics.unavailable:
        print(f"unavailable metrics (NaN): {', '.join(metrics.unavailable)}")
    print(format_summary(summary))
    return results


def cli() -> None:
    """The ``editlab-score`` command (its exit status is 0 unless scoring stopped)."""
    main()


if __name__ == "__main__":
    cli()
