"""The toy world's edits (`toyworld.scenes`) written as a miniature PIE-Bench: `write_piebench` stores them in the
PIE-Bench layout (`mapping_file.json` + `annotation_images/`, see `evaluation.piebench`), with the rendered targets
under `ground_truth/`, so `python run.py` and the tests have data without a download.

    python -m editlab.evaluation.toyset [run.py overrides ...] [--out DIR]

writes the set a ``python run.py`` with the same overrides reads (default: the toy tour's) and prints its folder:
the cache's own (``dataset.root``, a folder named by the set's parameters) or ``DIR``; that folder is what
``python -m editlab.evaluation.score --data`` takes."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from editlab.evaluation.files import waiting_lock
from editlab.evaluation.piebench import EDIT_TYPES, rle_encode
from editlab.toyworld.scenes import MAX_PROMPT_CHARS, TOYSET_VERSION, edit_mask, toy_edits


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _is_complete(root: Path, params: dict) -> bool:
    try:
        if json.loads((root / "toyset.json").read_text()) != params:
            return False
        mapping = json.loads((root / "mapping_file.json").read_text())
    except (OSError, ValueError):
        return False
    return all((root / d / e["image_path"]).is_file() for e in mapping.values() for d in ("annotation_images",
                                                                                        "ground_truth"))


def builtin_folder(cache: str | Path, n_per_type: int, size: int, seed: int) -> Path:
    """The cache folder of one built-in set, named by every parameter and the toy-world version: sets of other
    sizes or seeds never share (or rewrite) each other's files, also while a run reads one."""
    return Path(cache) / f"v{TOYSET_VERSION}_n{n_per_type}_size{size}_seed{seed}"


def dataset_root(cfg: Mapping[str, Any]) -> Path | None:
    """The folder a ``dataset`` config reads: for the built-in toy set (``kind: toyset``, ``root`` = the cache) its
    parameter-keyed folder, else ``root`` itself; None when no root is set."""
    if not cfg.get("root"):
        return None
    if cfg.get("kind") == "toyset":
        return builtin_folder(cfg["root"], cfg["n_per_type"], cfg["size"], cfg["seed"])
    return Path(cfg["root"])


def sets_in_cache(folder: str | Path) -> list[Path]:
    """The complete built-in sets in a cache folder (``dataset.root`` of ``dataset=builtin``)."""
    return sorted(marker.parent for marker in Path(folder).glob("*/toyset.json"))


SET_PARTS = ("annotation_images", "ground_truth", "mapping_file.json", "toyset.json")  # the marker last


def write_piebench(root, n_per_type: int = 2, size: int = 64, seed: int = 0, edit_types=tuple(EDIT_TYPES)) -> Path:
    """Write the toy set in PIE-Bench layout under `root` and return `root`:

    - `mapping_file.json`: the PIE-Bench fields, the mask RLE-encoded at size x size with the frame set;
    - `annotation_images/<t>_<type name>_<n>/<id>.png`: source renders (PNG: lossless);
    - `ground_truth/<same path>`: the rendered targets;
    - `toyset.json`: the parameters, the completion marker.

    Deterministic (same arguments, byte-identical files) and idempotent: a complete set with the same
    parameters is left untouched. The set is written in a private staging folder beside `root` and moved in
    whole, so a concurrent reader sees a complete set, never a half-written one.
    """
    root = Path(root)
    edit_types = [str(t) for t in edit_types]
    params = {"version": TOYSET_VERSION, "n_per_type": n_per_type, "size": size, "seed": seed,
              "edit_types": edit_types}
    if _is_complete(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # one writer at a time: two sweeps repairing the same set would take each other's parts away mid-move
    with waiting_lock(root.parent, f".{root.name}.lock", f"the toy set {root.name}"):
        if not _is_complete(root, params):
            _write(root, params, n_per_type, size, seed, edit_types)
    return root


def _write(root: Path, params: dict, n_per_type: int, size: int, seed: int, edit_types: list[str]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        mapping = {}
        for image_id, edit in toy_edits(n_per_type, seed, edit_types, size).items():
            t = edit.type_id
            image_path = f"{t}_{EDIT_TYPES[t]}_{n_per_type}/{image_id}.png"
            for folder, scene in (("annotation_images", edit.source), ("ground_truth", edit.target)):
                (staging / folder / image_path).parent.mkdir(parents=True, exist_ok=True)
                (staging / folder / image_path).write_bytes(_png(scene.render(size)))
            for prompt in (edit.source_prompt, edit.target_prompt):
                assert len(prompt) <= MAX_PROMPT_CHARS, f"{image_id}: prompt too long for the tokenizer: {prompt!r}"
            mapping[image_id] = {
                "image_path": image_path,
                "original_prompt": edit.source_prompt,
                "editing_prompt": edit.target_prompt,
                "editing_instruction": edit.instruction,
                "editing_type_id": t,
                "blended_word": edit.blended_word,
                "mask": rle_encode(edit_mask(edit, size)),
            }
        (staging / "mapping_file.json").write_text(json.dumps(mapping))
        (staging / "toyset.json").write_text(json.dumps(params, indent=2) + "\n")
        _publish(staging, root, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, root: Path, params: dict) -> None:
    """Move a finished set from `staging` to `root`: by one rename when `root` is new (or empty), else, for an older
    or incomplete set of ours, part by part with the completion marker out first and in last."""
    if _is_complete(root, params):  # a concurrent writer finished first
        return
    try:
        staging.rename(root)
        return
    except OSError:
        if _is_complete(root, params):  # another writer's rename won meanwhile: its set is the same
            return
    if not set(os.listdir(root)) <= set(SET_PARTS):
        raise FileExistsError(f"{root} holds files that are not part of a toy set; not writing the toy set over them")
    (root / "toyset.json").unlink(missing_ok=True)
    for part in SET_PARTS:
        old = root / part
        if old.is_dir():
            shutil.rmtree(old)
        old.unlink(missing_ok=True)
        (staging / part).rename(old)




def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m editlab.evaluation.toyset",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("overrides", nargs="*", help="run.py's overrides, e.g. experiment=toy dataset.n_per_type=4")
    parser.add_argument("--out", type=Path, help="write the set here (default: its folder in the cache)")
    args = parser.parse_args(argv)
    from hydra import compose, initialize_config_module  # Hydra composes the dataset exactly as run.py does

    with initialize_config_module("editlab.conf", version_base="1.3"):
        dataset = compose("run", overrides=args.overrides).dataset
    if dataset.get("kind") != "toyset":
        parser.error(f"dataset={dataset.name} is not the built-in toy set; its root is {dataset.get('root')}")
    try:
        root = write_piebench(args.out or dataset_root(dataset), dataset.n_per_type, dataset.size, dataset.seed)
    except FileExistsError as err:
        parser.error(str(err))
    print(f"the toy PIE-Bench set ({dataset.n_per_type} per edit type, {dataset.size} px, seed {dataset.seed}); "
          f"score edits with: python -m editlab.evaluation.score --data {root} --edits <job>/annotation_images "
          "--backbones toy", file=sys.stderr)
    print(root)
    return root


if __name__ == "__main__":
    main()
