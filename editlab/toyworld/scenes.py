"""A deterministic miniature PIE-Bench: rendered shape scenes, their captions and exact edits.

Every scene is one or two coloured shapes on a background, rendered with numpy/PIL only, and described by a
caption in a small fixed grammar::

    [<style> ]a[n] [<size> ][<texture> ]<colour> <shape>[ and a ...] on a <colour> background

e.g. "a sketch of a large striped red circle and a blue square on a gray background". Default attribute values
(medium size, plain texture, no style) are not named. The vocabulary is deliberately small (3 shapes, 6 colours,
3 backgrounds, 3 textures, 3 sizes, 2 styles): the toy models that draw it train on two CPU cores in about an
hour (`scripts/build_toy_world.py`), at the toy model's 32² resolution. An edit renders
both sides, so every entry has its ground-truth target and an exact mask. `evaluation.toyset` stores them in
the PIE-Bench layout, `icd.data` as a captioned training folder. numpy and PIL only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# The tiny test model's tokenizer is character-level with 75 usable positions; keep a margin.
MAX_PROMPT_CHARS = 70

# The edit types of PIE-Bench (ids "1".."9"; "0" = any of them) that the toy world draws, each with its exact target.
EDIT_KINDS = tuple("0123456789")
TOYSET_VERSION = 2  # 2: the 32²-sized vocabulary (3 shapes, 6 colours, 3 backgrounds)

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "white": (245, 245, 245),
}
BG_COLOURS = {"gray": (128, 128, 128), "white": (232, 232, 232), "black": (28, 28, 28)}
# Background patterns are supported by the renderer and the grammar but left out of the world: at 32² they cost
# the toy VAE more than they teach. Add e.g. "striped" here to bring them back (edit type 8 then changes them too).
BG_PATTERNS = ("plain",)
PATTERNS = ("plain", "striped")  # surface pattern: edit type 4 ("content")
MATERIALS = ("plain", "hollow")  # surface material: edit type 7 ("material")
TEXTURES = PATTERNS + MATERIALS[1:]
SIZES = {"small": 0.13, "medium": 0.18, "large": 0.24}  # half-extent as a fraction of the image side
STYLES = {"none": "", "sketch": "a sketch of", "pixel": "pixel art of"}
STYLE_INSTRUCTIONS = {"sketch": "turn it into a sketch", "pixel": "turn it into pixel art"}

_SUPERSAMPLE = 4  # silhouettes are drawn 4x larger and box-filtered down: cheap anti-aliasing


class Obj(NamedTuple):
    shape: str
    colour: str
    texture: str = "plain"
    size: str = "medium"
    pos: tuple[float, float] = (0.5, 0.5)  # centre (x, y) as fractions of the image side

    def phrase(self) -> str:
        words = [w for w in (self.size, self.texture) if w not in ("medium", "plain")] + [self.colour, self.shape]
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "gray"
    bg_pattern: str = "plain"
    style: str = "none"

    def __post_init__(self):  # accept any sequence of plain (shape, colour, ...) tuples; store Obj tuples
        object.__setattr__(self, "objects", tuple(Obj(*o) for o in self.objects))

    def caption(self) -> str:
        bg = " ".join(w for w in (self.bg_pattern, self.background) if w != "plain")
        text = " and ".join(o.phrase() for o in self.objects) + f" on a {bg} background"
        return f"{STYLES[self.style]} {text}".strip()

    def object_mask(self, i: int, size: int) -> np.ndarray:
        """Filled silhouette of object i (a hollow object's region includes its hole), ignoring occlusion."""
        return _coverage(self.objects[i], size) > 0

    def render(self, size: int = 64) -> np.ndarray:
        img = _background(self.background, self.bg_pattern, size)
        for obj in self.objects:  # later objects are drawn on top
            alpha = _coverage(obj, size)[..., None] / 255.0
            if obj.texture == "hollow":  # a ring: the silhouette minus a shrunken copy of itself
                alpha = alpha * (1 - _coverage(obj, size, scale=0.55)[..., None] / 255.0)
            img = img * (1 - alpha) + _fill(obj, size) * alpha
        return _stylise(np.clip(np.rint(img), 0, 255).astype(np.uint8), self.style)


def _shade(rgb, strength: float) -> np.ndarray:
    """A contrasting tone of the same hue: darker for light colours, lighter for dark ones."""
    c = np.asarray(rgb, dtype=np.float64)
    return c * (1 - strength) if c @ (0.299, 0.587, 0.114) > 100 else c + (255 - c) * strength


def _pattern(kind: str, size: int, period: float, diagonal: bool) -> np.ndarray:
    """(size, size, 1) weight of the pattern's second tone (stripes `period` px apart along x + y or y),
    supersampled for anti-aliased edges."""
    if kind != "striped":
        return np.zeros((size, size, 1))
    s = size * _SUPERSAMPLE
    y, x = (np.mgrid[0:s, 0:s] + 0.5) / _SUPERSAMPLE
    on = ((x + y if diagonal else y) // period) % 2 == 1
    return on.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]


def _background(colour: str, pattern: str, size: int) -> np.ndarray:
    base = np.asarray(BG_COLOURS[colour], dtype=np.float64)
    # Straight stripes with a coarser period than object fills, so the two never read as one pattern.
    w = _pattern(pattern, size, size / 6, diagonal=False)
    return base * (1 - w) + _shade(base, 0.25) * w


def _fill(obj: Obj, size: int) -> np.ndarray:
    base = np.asarray(COLOURS[obj.colour], dtype=np.float64)
    # diagonal stripes about 3 px wide at 32²: coarse enough for the toy VAE's 4-pixel latent cells
    w = _pattern(obj.texture, size, size / 8, diagonal=True)
    return base * (1 - w) + _shade(base, 0.55) * w


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.9  # equal visual weight with the circle
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(obj: Obj, size: int, scale: float = 1.0) -> np.ndarray:
    """Anti-aliased silhouette of obj, uint8 0..255 at (size, size)."""
    s = size * _SUPERSAMPLE
    cx, cy, r = obj.pos[0] * s, obj.pos[1] * s, SIZES[obj.size] * s * scale
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_outline(obj.shape, cx, cy, r), fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


def _stylise(img: np.ndarray, style: str) -> np.ndarray:
    size = img.shape[0]
    if style == "pixel":  # coarse blocks, as in low-resolution pixel art
        cells = max(4, size // 3)
        small = Image.fromarray(img).resize((cells, cells), Image.Resampling.BOX)
        return np.asarray(small.resize((size, size), Image.Resampling.NEAREST))
    if style == "sketch":  # a pale wash of the colours on paper, dark strokes wherever luminance changes
        lum = img.astype(np.float64) @ (0.299, 0.587, 0.114)
        gx = np.abs(np.diff(lum, axis=1, append=lum[:, -1:]))
        gy = np.abs(np.diff(lum, axis=0, append=lum[-1:, :]))
        ink = np.clip(2.0 * np.maximum(gx, gy), 0, 255)[..., None] / 255
        wash = 0.45 * img + 0.55 * np.asarray((250, 247, 238), dtype=np.float64)
        return np.clip(np.rint(wash * (1 - ink) + 30 * ink), 0, 255).astype(np.uint8)
    return img


# ------------------------------------------------------------------------------------------------ sampling
def _pick(rng: np.random.Generator, options):
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def _fits(size: str, pos, others) -> bool:
    """Inside the image and clear of every other object's bounding box (so no edit touches a neighbour)."""
    r, gap = SIZES[size], 0.03
    if not all(r + 0.02 <= p <= 1 - r - 0.02 for p in pos):
        return False
    return all(max(abs(pos[0] - o.pos[0]), abs(pos[1] - o.pos[1])) >= r + SIZES[o.size] + gap for o in others)


def _place(rng: np.random.Generator, size: str, others, tries: int = 40):
    r = SIZES[size] + 0.02
    for _ in range(tries):
        pos = tuple(round(float(v), 3) for v in rng.uniform(r, 1 - r, size=2))
        if _fits(size, pos, others):
            return pos
    return None


def random_object(rng: np.random.Generator, others=(), background: str = "gray") -> Obj | None:
    """A new object that is distinguishable from `others` (shape or colour differs), visible on the background
    and placed clear of them; None when no free spot was found."""
    taken = {(o.shape, o.colour) for o in others}
    pairs = [(s, c) for s in SHAPES for c in COLOURS if c != background and (s, c) not in taken]
    shape, colour = _pick(rng, pairs)
    texture = "plain" if rng.random() < 0.5 else _pick(rng, TEXTURES[1:])
    size = _pick(rng, SIZES)
    pos = _place(rng, size, others)
    return None if pos is None else Obj(shape, colour, texture, size, pos)


def random_scene(rng: np.random.Generator, n_objects: int | None = None, style: str | None = None,
                 max_chars: int = MAX_PROMPT_CHARS) -> Scene:
    """A random scene, deterministic given the generator's state. Defaults are favoured (plain background,
    no style, plain texture) so captions stay short; scenes with a caption over `max_chars` are redrawn."""
    while True:
        background = _pick(rng, BG_COLOURS)
        pattern = "plain" if rng.random() < 0.5 or len(BG_PATTERNS) == 1 else _pick(rng, BG_PATTERNS[1:])
        sty = style or ("none" if rng.random() < 0.7 else _pick(rng, tuple(STYLES)[1:]))
        objects: list[Obj] = []
        for _ in range(n_objects or int(rng.integers(1, 3))):
            obj = random_object(rng, objects, background)
            if obj is None:
                break
            objects.append(obj)
        scene = Scene(tuple(objects), background, pattern, sty)
        if len(objects) == (n_objects or len(objects)) and len(scene.caption()) <= max_chars:
            return scene


# ------------------------------------------------------------------------------------------------- edits
@dataclass(frozen=True)
class Edit:
    type_id: str  # PIE-Bench editing_type_id, "0".."9"
    source: Scene
    target: Scene
    source_prompt: str  # captions with the differing word span in [brackets]
    target_prompt: str
    instruction: str
    blended_word: str  # "<src_word> <tgt_word>", or "" for style edits
    source_objects: tuple[int, ...] = ()  # indices of edited objects: their silhouettes join the mask
    target_objects: tuple[int, ...] = ()
    full_mask: bool = False  # background and style edits touch every pixel


def bracket(source: str, target: str) -> tuple[str, str]:
    """Bracket the word span that differs, PIE-Bench style: an addition leaves the source unbracketed. When
    repeated words allow several equally short spans, prefer one that starts a phrase ("a"/"an"/"and"), so a
    prefix reads "[a sketch of] a ..." and an added object "... [and a blue square] on ..."."""
    a, b = source.split(), target.split()
    n = min(len(a), len(b))
    max_prefix = next((i for i in range(n) if a[i] != b[i]), n)
    max_suffix = next((i for i in range(n) if a[-1 - i] != b[-1 - i]), n)
    splits = [(p, min(max_suffix, n - p)) for p in range(max_prefix + 1)]
    best = max(p + s for p, s in splits)
    splits = [(p, s) for p, s in splits if p + s == best]

    def middle(words, p, s):
        return words[p : len(words) - s]

    def starts_phrase(p, s):
        return (middle(a, p, s) or middle(b, p, s) or [""])[0] in ("a", "an", "and")

    p, s = ([split for split in splits if starts_phrase(*split)] or splits)[0]

    def wrap(words):
        mid = middle(words, p, s)
        return " ".join(words[:p] + ([f"[{' '.join(mid)}]"] if mid else []) + words[len(words) - s :])

    return wrap(a), wrap(b)


def _ref(scene: Scene, i: int) -> str:
    """Shortest unambiguous name of object i ("the circle", or "the red circle" if two are circles)."""
    obj = scene.objects[i]
    unique = sum(o.shape == obj.shape for o in scene.objects) == 1
    return f"the {obj.shape}" if unique else f"the {obj.colour} {obj.shape}"


def _swap(scene: Scene, i: int, obj: Obj) -> Scene:
    return replace(scene, objects=scene.objects[:i] + (obj,) + scene.objects[i + 1 :])


def _edit_object(rng, kind: str):
    """Edits of one object's attribute (types 1, 4, 5, 6, 7); None asks the caller to draw again."""
    src = random_scene(rng)
    i = int(rng.integers(len(src.objects)))
    obj, others = src.objects[i], src.objects[:i] + src.objects[i + 1 :]
    taken = {(o.shape, o.colour) for o in others}
    if kind == "1":
        new = obj._replace(shape=_pick(rng, [s for s in SHAPES if s != obj.shape and (s, obj.colour) not in taken]))
        return src, _swap(src, i, new), f"turn {_ref(src, i)} into a {new.shape}", f"{obj.shape} {new.shape}", i
    if kind == "6":
        options = [c for c in COLOURS if c not in (obj.colour, src.background) and (obj.shape, c) not in taken]
        new = obj._replace(colour=_pick(rng, options))
        return src, _swap(src, i, new), f"make {_ref(src, i)} {new.colour}", f"{obj.shape} {obj.shape}", i
    if kind in "47":  # 4: surface pattern ("content"), 7: material; the source is moved into the same family
        family = PATTERNS if kind == "4" else MATERIALS
        if obj.texture not in family:
            obj = obj._replace(texture=_pick(rng, family))
            src = _swap(src, i, obj)
        new = obj._replace(texture=_pick(rng, [t for t in family if t != obj.texture]))
        return src, _swap(src, i, new), f"make {_ref(src, i)} {new.texture}", f"{obj.shape} {obj.shape}", i
    if kind == "5":  # "pose": resize in place; only sizes that still fit are allowed
        options = [s for s in SIZES if s != obj.size and _fits(s, obj.pos, others)]
        if not options:
            return None
        new = obj._replace(size=_pick(rng, options))
        word = "bigger" if SIZES[new.size] > SIZES[obj.size] else "smaller"
        return src, _swap(src, i, new), f"make {_ref(src, i)} {word}", f"{obj.shape} {obj.shape}", i
    raise ValueError(kind)


def _draw_edit(kind: str, rng: np.random.Generator) -> Edit | None:
    if kind in "14567":
        out = _edit_object(rng, kind)
        if out is None:
            return None
        src, tgt, instruction, blend, i = out
        return Edit(kind, src, tgt, "", "", instruction, blend, (i,), (i,))
    if kind == "2":
        src = random_scene(rng, n_objects=1)
        new = random_object(rng, src.objects, src.background)
        if new is None:
            return None
        tgt = replace(src, objects=src.objects + (new,))
        return Edit(kind, src, tgt, "", "", f"add {new.phrase()}", f"background {new.shape}", (), (1,))
    if kind == "3":
        src = random_scene(rng, n_objects=2)
        i = int(rng.integers(2))
        tgt = replace(src, objects=src.objects[:i] + src.objects[i + 1 :])
        return Edit(kind, src, tgt, "", "", f"remove {_ref(src, i)}", f"{src.objects[i].shape} background", (i,))
    if kind == "8":
        src = random_scene(rng)
        colour, pattern = src.background, src.bg_pattern
        change = _pick(rng, ("colour", "pattern", "both") if len(BG_PATTERNS) > 1 else ("colour",))
        if change != "pattern":  # never the colour of an object, which would then vanish
            used = {o.colour for o in src.objects}
            colour = _pick(rng, [c for c in BG_COLOURS if c != colour and c not in used])
        if change != "colour":
            pattern = _pick(rng, [p for p in BG_PATTERNS if p != pattern])
        tgt = replace(src, background=colour, bg_pattern=pattern)
        words = " ".join(w for w, old in ((pattern, src.bg_pattern), (colour, src.background)) if w != old)
        return Edit(kind, src, tgt, "", "", f"make the background {words}", "background background", full_mask=True)
    if kind == "9":  # PIE-Bench style edits start from a photo and have no blend words
        src = random_scene(rng, style="none")
        style = _pick(rng, tuple(STYLES)[1:])
        return Edit(kind, src, replace(src, style=style), "", "", STYLE_INSTRUCTIONS[style], "", full_mask=True)
    raise ValueError(f"unknown edit type {kind!r}")


def make_edit(type_id: str, rng: np.random.Generator, size: int = 64, tries: int = 100) -> Edit:
    """One edit of PIE-Bench type `type_id` ("0" = any of the others). Draws are repeated until both prompts
    fit in MAX_PROMPT_CHARS and the two renders differ at `size`."""
    if type_id not in EDIT_KINDS:
        raise ValueError(f"unknown PIE-Bench edit type {type_id!r}; expected one of {', '.join(EDIT_KINDS)}")
    for _ in range(tries):
        kind = type_id if type_id != "0" else _pick(rng, "123456789")
        edit = _draw_edit(kind, rng)
        if edit is None:
            continue
        src_prompt, tgt_prompt = bracket(edit.source.caption(), edit.target.caption())
        if max(len(src_prompt), len(tgt_prompt), len(edit.instruction)) > MAX_PROMPT_CHARS:
            continue
        edit = replace(edit, type_id=type_id, source_prompt=src_prompt, target_prompt=tgt_prompt)
        if (edit.source.render(size) != edit.target.render(size)).any():
            return edit
    raise RuntimeError(f"no valid edit of type {type_id} in {tries} draws")


def edit_mask(edit: Edit, size: int = 64, frame: bool = True) -> np.ndarray:
    """Boolean (size, size) mask of the edit: every pixel whose render changes, plus the edited objects'
    silhouettes on both sides; the whole image for background/style edits. The one-pixel frame is set as
    in the stored PIE-Bench masks."""
    if edit.full_mask:
        return np.ones((size, size), dtype=bool)
    mask = (edit.source.render(size) != edit.target.render(size)).any(axis=-1)
    for i in edit.source_objects:
        mask |= edit.source.object_mask(i, size)
    for i in edit.target_objects:
        mask |= edit.target.object_mask(i, size)
    if frame:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def toy_edits(n_per_type: int = 2, seed: int = 0, edit_types=tuple(EDIT_KINDS), size: int = 64) -> dict[str, Edit]:
    """Edits keyed by 12-digit PIE-Bench-style ids (first digit = type). Each entry has its own generator
    seeded by (seed, type, index), so adding types or entries never changes the existing ones."""
    return {
        f"{t}{k:011d}": make_edit(str(t), np.random.default_rng([seed, int(t), k]), size)
        for t in edit_types for k in range(n_per_type)
    }


# ------------------------------------------------------------------------------------------------ vocabulary
GRAMMAR_WORDS = ("a", "an", "and", "on", "background", "the", "it", "make", "turn", "into", "add", "remove",
                 "bigger", "smaller")


def vocabulary() -> list[str]:
    """Every word a caption or an editing instruction of the toy world can contain, sorted: the toy models'
    tokenizer gives each one a single token."""
    phrases = (*SHAPES, *COLOURS, *BG_COLOURS, *BG_PATTERNS, *TEXTURES, *SIZES, *STYLES.values(),
               *STYLE_INSTRUCTIONS.values(), *GRAMMAR_WORDS)
    return sorted({word for phrase in phrases for word in phrase.split()})
