"""ImgEdit-Bench's Basic set (PKU-YuanGroup/ImgEdit ``Benchmark/Basic``) as a dataset of the harness
(``dataset=imgedit``).

``basic_edit.json`` maps string keys (``"1082"``) to ``{"id": "<folder>/<file>.jpg", "prompt", "edit_type"}``:
737 items of 9 edit types over 171 source images (an image serves several edits). The source is
``<dataset.images>/<id>`` (the images of the dataset's ``Benchmark.tar``); the item's key names its edit,
``<out>/annotation_images/<key>.png``, so ``<out>/annotation_images`` is the flat folder ImgEdit's scorer reads. The
source as the editor saw it (the square crop, for an editor fitted to its model's resolution) is saved in its
subfolder ``sources/<key>.png``, which the judge compares the edit with.

Masks: CoCoEdit's layout is ``[imgedit/]singleturn/<folder>/<file stem>_mask.png``, keyed by the source image, so the
edits of one image share a mask; whether that mask suits each of them was not checked here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from editlab.evaluation.instruction_sets import InstructionSet, MaskFolder, check_choices, instruction_item, select
from editlab.evaluation.piebench import PieBenchItem, edited_image_path, file_inside, read_mapping, relative_image_path

log = logging.getLogger(__name__)

EDIT_TYPES = ("add", "adjust", "extract", "replace", "remove", "background", "style", "action", "compose")
FIELDS = ("id", "prompt", "edit_type")


def _order(key: str) -> tuple:
    """Numeric keys in numeric order ("2" before "10"), others after them."""
    return (0, int(key), key) if key.isdigit() else (1, 0, key)


class ImgEditDataset(InstructionSet):
    """The items of ``json`` in key order, filtered by ``edit_types``, then ``ids``, ``limit`` and the shard."""

    def __init__(self, json: str | Path, images: str | Path, edit_types: list[str] | None = None,
                 ids: list[str] | None = None, limit: int | None = None, shard: int = 0, num_shards: int = 1,
                 masks: MaskFolder | None = None):
        self.json, self.root, self.masks = Path(json), Path(images), masks
        if not self.json.is_file():
            raise FileNotFoundError(f"dataset.json={self.json} not found: the Basic set's basic_edit.json "
                                    "(PKU-YuanGroup/ImgEdit Benchmark/Basic/)")
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset.images={self.root} is not a folder: the source images (Benchmark.tar "
                                    "of the hub dataset sysuyy/ImgEdit, unpacked)")
        types = check_choices(edit_types, EDIT_TYPES, "edit_types")
        mapping = read_mapping(self.json)
        self._sources: dict[str, str] = {}  # key -> the source's path under images/
        items = [self._item(key, mapping[key]) for key in sorted(mapping, key=_order)]
        items = [item for item in items if types is None or item.edit_type in types]
        self.items: list[PieBenchItem] = select(items, ids, limit, shard, num_shards, str(self.json))
        if masks and (shared := sum(n - 1 for n in Counter(self._sources[i.image_id] for i in self.items).values())):
            log.warning("%d of the %d items share their source image, hence their mask, with another edit (the "
                        "masks are keyed by image): check that a shared mask suits each edit", shared, len(self))

    def _item(self, key: str, entry: object) -> PieBenchItem:
        where = f"{self.json}, item {key!r}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} is a {type(entry).__name__}, expected an object with {', '.join(FIELDS)}")
        if missing := [f for f in FIELDS if f not in entry]:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        if "/" in key or "\\" in key or key in (".", ".."):
            raise ValueError(f"{where}: a key names the edit's file <key>.png; it cannot hold a path separator")
        if entry["edit_type"] not in EDIT_TYPES:
            raise ValueError(f"{where}: edit_type {entry['edit_type']!r} is not one of {', '.join(EDIT_TYPES)}")
        try:
            self._sources[key] = relative_image_path(entry["id"], key) if isinstance(entry["id"], str) else ""
        except ValueError:
            self._sources[key] = ""
        if not self._sources[key]:
            raise ValueError(f"{where}: id {entry['id']!r} must be a path relative to dataset.images that stays "
                             "inside it")
        try:
            return instruction_item(key, f"{key}.png", entry["prompt"], entry["edit_type"])
        except ValueError as err:
            raise ValueError(f"{self.json}: {err}") from None

    def image_file(self, item: PieBenchItem) -> Path:
        return file_inside(self.root, self._sources[item.image_id], item.image_id)

    def source_beside_edit(self, output_dir: Path, item: PieBenchItem) -> Path:
        return edited_image_path(output_dir, item).parent / "sources" / f"{item.image_id}.png"

    def mask_file(self, item: PieBenchItem) -> Path:
        base = self.masks.folder / "imgedit" if (self.masks.folder / "imgedit").is_dir() else self.masks.folder
        source = PurePosixPath(self._sources[item.image_id])
        return base / "singleturn" / source.parent / f"{source.stem}_mask.png"
