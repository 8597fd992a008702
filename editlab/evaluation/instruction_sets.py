"""What the instruction benchmarks (`evaluation.gedit`, `evaluation.imgedit`) share: instruction-only items, the
selection options every set has, and edit masks read from image files (CoCoEdit's released masks).

An instruction item has an editing instruction and no captions: its ``source_prompt`` and ``target_prompt`` are
empty, so it provides (``ItemSet.provides``) the source image and the instruction. An editor that reads captions
(``Editor.needs``) is refused on such a set before any model loads, and so is a metric that needs a caption (the
PIE CLIP scores) or, without ``dataset.masks``, an edit mask (the unedited-part metrics).

Masks (``dataset.masks=<folder>``): one grey PNG per item. Which colour marks the edited region is not a fact the
files carry: CoCoEdit's training reward scores the white region as the kept one, and the benchmark masks were never
checked here. So ``dataset.mask_polarity`` must say it (``white_is_edited`` | ``white_is_kept``); a mask is read as
1 = edited, the PIE metrics' convention. A mask is refused when it is not binary (more than 1% of its pixels are
neither dark, <= 32, nor light, >= 223: it is an image, a soft matte or a JPEG), when it is all one value (no edited
or no kept region: nothing to score), or when its aspect differs from its image's (one of the same aspect is
resized, nearest neighbour, to the image's size).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from editlab.evaluation.piebench import ItemSet, PieBenchItem

POLARITIES = ("white_is_edited", "white_is_kept")
DARK, LIGHT = 32, 223  # grey levels a binary mask's pixels keep to (anti-aliased edges may lie between)
MAX_GREY_SHARE = 0.01
PROVIDES = frozenset({"source", "instruction"})  # what an instruction item offers editors and metrics


def instruction_item(key: str, image_path: str, instruction: str, edit_type: str, cls: type = PieBenchItem,
                     **extra) -> PieBenchItem:
    """An item with an instruction and no captions (its prompts are empty); ``image_path`` names its edit's file
    under ``annotation_images/``. ``cls``: a subclass with ``extra`` fields."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"item {key}: the instruction is empty or not a string")
    return cls(image_id=key, image_path=image_path, source_prompt="", target_prompt="", instruction=instruction,
               edit_type=edit_type, blend_words=None, mask_rle=[], **extra)


def check_choices(values: Iterable[str] | None, allowed: Sequence[str], key: str) -> set[str] | None:
    """``values`` as a set, each one of ``allowed`` (else a ValueError naming ``dataset.<key>``); None: all."""
    if values is None:
        return None
    wanted = {str(v) for v in values}
    if unknown := sorted(wanted - set(allowed)):
        raise ValueError(f"dataset.{key}: {', '.join(unknown)} not known; the benchmark's are {', '.join(allowed)}")
    return wanted


def select(items: list[PieBenchItem], ids: Iterable[str] | None, limit: int | None, shard: int, num_shards: int,
           where: str) -> list[PieBenchItem]:
    """``ids`` (each must exist), then the first ``limit``, then every ``num_shards``-th from ``shard``, as the
    PIE-Bench reader selects; an empty selection is refused (a filter that matches nothing is a mistake)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
    if ids is not None:
        wanted = {str(i) for i in ids}
        if unknown := sorted(wanted - {item.image_id for item in items}):
            raise ValueError(f"dataset.ids: {', '.join(unknown)} not among the selected items of {where}")
        items = [item for item in items if item.image_id in wanted]
    if not items:
        raise ValueError(f"no item of {where} matches the selection (language, subset, types): widen it")
    return (items[:limit] if limit is not None else items)[shard::num_shards]


@dataclass(frozen=True)
class MaskFolder:
    """Where an item's mask file is (``path_of``, a benchmark's own layout under ``folder``) and how to read it."""

    folder: Path
    polarity: str

    @classmethod
    def from_config(cls, folder: str | Path | None, polarity: str | None) -> MaskFolder | None:
        """None without ``folder``; a folder without a valid ``polarity`` is refused, saying how to find it."""
        if not folder:
            return None
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"dataset.masks={folder} is not a folder (the downloaded CoCoEdit masks, "
                                    "wyh6666/GEditBench_ImgEditBench_with_mask)")
        if polarity not in POLARITIES:
            given = " is not set" if polarity is None else f"={polarity!r}"
            raise ValueError(f"dataset.mask_polarity{given}: say which colour of the masks in {folder} marks "
                             f"the edited region ({' or '.join(POLARITIES)}); the files do not say it. Open one "
                             "mask beside its source image: if white covers the edited object, white_is_edited")
        return cls(Path(folder), polarity)

    def load(self, path: Path, item_id: str, height: int | None = None, width: int | None = None) -> np.ndarray:
        """The (height, width) 0/1 mask of ``item_id`` in ``path`` (1 = edited; default: the file's own size)."""
        if not path.is_file():
            raise FileNotFoundError(f"mask of {item_id} not found: {path} (dataset.masks={self.folder})")
        try:
            with Image.open(path) as opened:
                grey = np.asarray(opened.convert("L"))
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"mask of {item_id}: cannot read {path}: {err}") from None
        if (grey_share := float(((grey > DARK) & (grey < LIGHT)).mean())) > MAX_GREY_SHARE:
            raise ValueError(f"mask of {item_id} ({path}) is not binary: {grey_share:.0%} of its pixels are grey "
                             f"({DARK + 1}..{LIGHT - 1}); a mask is black and white")
        white = grey >= 128
        if white.all() or not white.any():
            raise ValueError(f"mask of {item_id} ({path}) is all {'white' if white.all() else 'black'}: it marks no "
                             "edited or no kept region, so the unedited part cannot be scored")
        mask = (white if self.polarity == "white_is_edited" else ~white).astype(np.float64)
        return fit_mask(mask, height, width, f"mask of {item_id} ({path})")


def fit_mask(mask: np.ndarray, height: int | None, width: int | None, what: str) -> np.ndarray:
    """``mask`` at (height, width): unchanged, or resized (nearest) when its aspect is the image's (within 1%)."""
    if height is None or mask.shape == (height, width or height):
        return mask
    width = width or height
    if abs((mask.shape[1] / mask.shape[0]) / (width / height) - 1) > 0.01:
        raise ValueError(f"{what} is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}: another "
                         "aspect, so it is not this image's mask")
    resized = Image.fromarray((mask * 255).astype(np.uint8)).resize((width, height), Image.NEAREST)
    return (np.asarray(resized) > 127).astype(np.float64)


class InstructionSet(ItemSet):
    """An `ItemSet` of instruction items; with a `MaskFolder` its items also have edit masks (``mask_file``)."""

    root: Path
    masks: MaskFolder | None = None

    @property
    def provides(self) -> frozenset[str]:
        return PROVIDES | ({"mask"} if self.masks else set())

    def mask_file(self, item: PieBenchItem) -> Path:
        raise NotImplementedError

    def load_mask(self, item: PieBenchItem, height: int | None = None, width: int | None = None) -> np.ndarray | None:
        """The item's mask (1 = edited) at (height, width), or None without ``dataset.masks``."""
        return None if self.masks is None else self.masks.load(self.mask_file(item), item.image_id, height, width)
