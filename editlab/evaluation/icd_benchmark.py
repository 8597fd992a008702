"""The iCD repository's benchmark files (``running/benchmarks/instructions/*.csv``) as a dataset of the harness.

Two shapes, told apart by their columns (read by name, in any order; an unnamed index column is ignored):
- editing pairs, ``file_name, old_caption, edited_caption, blended_words`` (``editing_pie_bench_140.csv``,
  ``editing_coco.csv``): source prompt, target prompt and blend words. ``blended_words`` is ``"src tgt"``, blank,
  or, in the COCO file, a Python tuple string ``"('child', 'lion')"``; all three are read;
- captions, ``caption`` with an optional ``file_name`` (``generation_coco.csv``; ``generation_parti-prompts.csv``
  has ``id, caption`` and no images): the caption is the item's prompt, for the inversion and generation tasks.

Images are ``<images>/<file_name>``; outputs are saved as ``<id>.png`` (the file's stem, made unique where
several captions share an image). Items carry no edit mask (the iCD metrics do not use one): `load_mask` is all
background, so PIE-Bench's masked metrics become whole-image ones. Items are sorted as the file lists them.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from editlab.evaluation.piebench import ItemSet, PieBenchItem, file_inside, relative_image_path, strip_brackets

log = logging.getLogger(__name__)

EDITING_COLUMNS = ("file_name", "old_caption", "edited_caption")


def parse_blend_words(value: object, where: str) -> tuple[str, str] | None:
    """``"src tgt"`` / ``"('src', 'tgt')"`` -> (src, tgt); blank or NaN -> None."""
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
    if not text:
        return None
    if text.startswith("("):
        try:
            words = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: blended_words {text!r} is not a tuple of two words") from None
    else:
        words = text.split()
    if len(words) != 2 or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"{where}: blended_words {text!r} is not two words ('<source> <target>')")
    return (words[0], words[1])


class IcdCsvDataset(ItemSet):
    """Items of one iCD benchmark CSV, filtered by ``limit`` and sharded like `PieBenchDataset`."""

    provides = ItemSet.provides - {"instruction"}  # captions only: an instruction editor is refused up front

    def __init__(self, csv: str | Path, images: str | Path | None = None, limit: int | None = None,
                 shard: int = 0, num_shards: int = 1) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
        self.csv = Path(csv)
        if not self.csv.is_file():
            raise FileNotFoundError(f"benchmark file not found: {self.csv} (dataset.csv=...)")
        self.root = Path(images) if images else self.csv.parent  # where the images are
        try:
            frame = pd.read_csv(self.csv, dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as err:
            raise ValueError(f"{self.csv} is not a readable CSV: {err}") from None
        self._files: dict[str, str] = {}  # image id -> file name under root
        items = [self._item(k, row) for k, row in enumerate(frame.to_dict("records"))]
        if limit is not None:
            items = items[:limit]
        self.items: list[PieBenchItem] = items[shard::num_shards]

    def _item(self, k: int, row: dict[str, str]) -> PieBenchItem:
        where = f"{self.csv} line {k + 2}"
        file_name = row.get("file_name", "").strip()
        image_id = Path(file_name).stem if file_name else (row.get("id") or str(k)).strip()
        if image_id in self._files:  # several captions of one image: one item each
            image_id = f"{image_id}_{k}"
        try:
            relative_image_path(f"{image_id}.png", image_id)  # the output's name stays inside the output folder
            self._files[image_id] = relative_image_path(file_name, image_id) if file_name else ""
        except ValueError as err:
            raise ValueError(f"{where}: {err}".replace("PIE-Bench entry ", "item ")) from None
        if all(c in row for c in EDITING_COLUMNS):
            source, target = strip_brackets(row["old_caption"]), strip_brackets(row["edited_caption"])
            try:
                blend = parse_blend_words(row.get("blended_words"), where)
            except ValueError as err:  # e.g. the three-word entry of editing_pie_bench_all.csv: edit without a blend
                log.warning("%s; the item is edited without LocalBlend", err)
                blend = None
        elif "caption" in row:
            source = target = " ".join(row["caption"].split())  # some COCO captions span lines
            blend = None
        else:
            raise ValueError(f"{self.csv}: expected the columns {', '.join(EDITING_COLUMNS)} (editing pairs) or "
                             f"caption (captions); it has {', '.join(row)}")
        # image_path names the output (<id>.png): unique even where captions share an image
        return PieBenchItem(image_id=image_id, image_path=f"{image_id}.png", source_prompt=source,
                            target_prompt=target, instruction="", edit_type="0", blend_words=blend, mask_rle=[])

    def image_file(self, item: PieBenchItem) -> Path:
        if not self._files[item.image_id]:
            raise FileNotFoundError(f"{self.csv}: item {item.image_id} has no file_name (a captions-only file serves "
                                    "the generation task)")
        return file_inside(self.root, self._files[item.image_id], item.image_id)

    def load_mask(self, item: PieBenchItem, height: int | None = None, width: int | None = None) -> np.ndarray:
        height = height or 512
        return np.zeros((height, width or height))
