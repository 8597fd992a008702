"""Stage 1, data: the training scenes (captions plus hard-negative captions that differ in one attribute), held-out
scenes and (source, instruction, target) edit triples. Every item has its own generator, seeded by (seed, stream,
index), so the data does not depend on the number of worker processes."""

from __future__ import annotations

import multiprocessing
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from editlab.experiments.toy_build.options import SIZE
from editlab.experiments.toy_build.text_encoder import MAX_LENGTH
from editlab.experiments.toy_build.world import Edits, Scenes, World
from editlab.models.tokenizers import word_tokenizer
from editlab.toyworld.scenes import BG_COLOURS, COLOURS, SHAPES, Scene, make_edit, random_scene, vocabulary

# the streams of `item_rng`: one per kind of item, so no two draw the same numbers
TRAIN_STREAM, HELDOUT_STREAM, EDIT_STREAM = 0, 1, 2
EVAL_EDIT_STREAM = 3  # the quality bars' edit triples, which IP2P's training never saw
BUILD_TAG = 0x70F  # a 4-entry seed, so no stream collides with the benchmark set's default_rng([seed, type, k])
NEGATIVES = 4  # hard-negative captions per training scene
CHUNK = 64  # items a worker process renders per task


def item_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, BUILD_TAG, stream, index])


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
    rng = item_rng(seed, stream, index)
    scene = random_scene(rng)
    negatives = [perturb(scene, rng).caption() for _ in range(NEGATIVES)]
    image = scene.render(SIZE) if render else np.zeros((SIZE, SIZE, 3), np.uint8)  # captions alone are cheap
    return image, scene, scene.caption(), negatives


def _edit_item(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    seed, stream, index = args
    edit = make_edit("0", item_rng(seed, stream, index), SIZE)
    return edit.source.render(SIZE), edit.target.render(SIZE), edit.instruction


def _parallel_map(fn: Callable, jobs: list, workers: int, desc: str) -> list:
    if workers <= 1:
        return [fn(job) for job in tqdm(jobs, desc=desc, unit="img")]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=CHUNK), total=len(jobs), desc=desc, unit="img"))


def render_scenes(n: int, seed: int, stream: int, workers: int, desc: str, render: bool = True) -> Scenes:
    items = _parallel_map(_scene_item, [(seed, stream, i, render) for i in range(n)], workers, desc)
    images, scenes, captions, negatives = zip(*items)
    return Scenes(torch.from_numpy(np.stack(images)), list(scenes), list(captions), list(negatives))


def render_edits(n: int, seed: int, workers: int) -> Edits:
    items = _parallel_map(_edit_item, [(seed, EDIT_STREAM, i) for i in range(n)], workers, "render edit triples")
    if not items:
        empty = torch.zeros(0, SIZE, SIZE, 3, dtype=torch.uint8)
        return Edits(empty, empty, [])
    sources, targets, instructions = zip(*items)
    return Edits(torch.from_numpy(np.stack(sources)), torch.from_numpy(np.stack(targets)), list(instructions))


def stage_data(w: World) -> None:
    """Render what the requested stages use (evaluation alone needs only the training captions)."""
    p, workers, stages = w.profile, w.options.workers, set(w.options.stages)
    w.train = render_scenes(p.train_scenes, w.options.seed, TRAIN_STREAM, workers, "render training scenes",
                            render=bool(stages & {"vae", "decoder", "teacher", "clip", "flow"}))
    w.heldout = render_scenes(p.heldout_scenes, w.options.seed, HELDOUT_STREAM, workers, "render held-out scenes")
    w.edits = render_edits(p.edits if "ip2p" in stages else 0, w.options.seed, workers)
    w.tokenizer = word_tokenizer(vocabulary(), MAX_LENGTH)
    words = {word for text in w.train.captions + w.edits.instructions for word in text.split()}
    unknown = words - set(vocabulary())
    if unknown:
        raise ValueError(f"captions or instructions use words outside the toy vocabulary: {sorted(unknown)}")
    seen = set(w.train.captions)
    w.log.write(stage="data", train_scenes=p.train_scenes, distinct_captions=len(seen), edits=p.edits,
                heldout_captions_unseen=float(np.mean([c not in seen for c in w.heldout.captions])))
