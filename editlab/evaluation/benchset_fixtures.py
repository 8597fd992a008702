"""Miniature GEdit-Bench and ImgEdit-Bench copies in their real formats, for tests and a demo without a download.

- `write_gedit`: an Arrow IPC stream file with the schema (and the ``huggingface`` schema metadata) `datasets`
  writes for GEdit-Bench's rows, image columns as ``{bytes, path}`` structs of PNG bytes; or the same rows as
  parquet, as the hub's conversion gives; plus the ``editlab_download.json`` revision record;
- `write_imgedit`: a ``basic_edit.json`` and its source JPEGs under ``<folder>/<id>``;
- `write_gedit_masks` / `write_imgedit_masks`: masks in CoCoEdit's layout, white = the edited object.

Each source is a flat background with one coloured rectangle (the object an instruction edits), portrait like
GEdit-Bench's 384x640-ish images; `object_box` says where the rectangle is.

    python -m editlab.evaluation.benchset_fixtures tests/fixtures   # the committed demo sets
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from editlab.evaluation import gedit

SIZE = (48, 80)  # width, height: GEdit-Bench's portrait aspect (about 0.6)
FIXTURE_REVISION = "editlab-fixture-1"  # not a hub commit: these sets are made here
GEDIT_ROWS = (  # task type, English and Chinese instruction, Intersection_exist
    ("color_alter", "Make the box blue.", "把盒子变成蓝色。", True),
    ("subject-remove", "Remove the box.", "移除盒子。", False),
    ("subject-add", "Add a cat beside the box.", "在盒子旁边加一只猫。", True),
    ("material_alter", "Make the box wooden.", "把盒子变成木质的。", False),
    ("style_change", "Turn the picture into a watercolor.", "把图片变成水彩画。", True),
)
IMGEDIT_ROWS = (  # key, id, prompt, edit type
    ("12", "animal/000001.jpg", "Change the box's color to green.", "adjust"),
    ("3", "animal/000001.jpg", "Remove the box.", "remove"),
    ("40", "daily object/000002.jpg", "Replace the box with a ball.", "replace"),
    ("7", "style/000003.jpg", "Transfer the image into a pencil-sketch style.", "style"),
)
GEDIT_FEATURES = {  # `datasets.Features.to_dict()` of GEdit-Bench's columns
    "task_type": {"dtype": "string", "_type": "Value"}, "key": {"dtype": "string", "_type": "Value"},
    "instruction": {"dtype": "string", "_type": "Value"},
    "instruction_language": {"dtype": "string", "_type": "Value"},
    "input_image": {"_type": "Image"}, "input_image_raw": {"_type": "Image"},
    "Intersection_exist": {"dtype": "bool", "_type": "Value"},
}
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def fixture_key(k: int) -> str:
    return hashlib.md5(f"editlab-gedit-fixture-{k}".encode()).hexdigest()


def object_box(k: int, size: tuple[int, int] = SIZE) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) of source ``k``'s rectangle."""
    width, height = size
    left, top = 4 + 3 * (k % 4), 10 + 5 * (k % 3)
    return left, top, left + width // 2, top + height // 3


def source_image(k: int, size: tuple[int, int] = SIZE) -> Image.Image:
    rng = np.random.default_rng(k)
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = rng.integers(60, 200, 3)
    left, top, right, bottom = object_box(k, size)
    pixels[top:bottom, left:right] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def object_mask(k: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """White on the object (the edited region), black elsewhere."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = object_box(k, size)
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def gedit_table(rows: list[dict] | None = None) -> pa.Table:
    """GEdit-Bench's columns (`GEDIT_FEATURES`) for ``rows`` (default: `GEDIT_ROWS` in both languages), with the
    ``huggingface`` schema metadata `datasets` writes."""
    if rows is None:
        rows = [{"task_type": task, "key": fixture_key(k), "instruction": text,
                 "instruction_language": language, "input_image": encoded(source_image(k)),
                 "Intersection_exist": both}
                for language in gedit.LANGUAGES for k, (task, en, cn, both) in enumerate(GEDIT_ROWS)
                for text in [en if language == "en" else cn]]
    columns = {name: [row.get(name) for row in rows] for name in GEDIT_FEATURES if name != "input_image_raw"}
    columns["input_image"] = [{"bytes": b, "path": None} for b in columns["input_image"]]
    columns["input_image_raw"] = columns["input_image"]
    types = {name: IMAGE if spec["_type"] == "Image" else pa.bool_() if spec.get("dtype") == "bool" else pa.string()
             for name, spec in GEDIT_FEATURES.items()}
    schema = pa.schema([(name, types[name]) for name in GEDIT_FEATURES])
    metadata = {"huggingface": json.dumps({"info": {"features": GEDIT_FEATURES}})}
    return pa.table([pa.array(columns[name], types[name]) for name in GEDIT_FEATURES],
                    schema=schema.with_metadata(metadata))


def write_table(path: Path, table: pa.Table) -> None:
    """``table`` as parquet (a ``.parquet`` path) or as an Arrow IPC stream, the format `datasets` writes."""
    if path.suffix == ".parquet":
        pq.write_table(table, path)
        return
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def write_gedit(folder: str | Path, file_format: str = "arrow", rows: list[dict] | None = None,
                revision: str | None = FIXTURE_REVISION) -> Path:
    """``folder/data/train-00000-of-00001.<arrow|parquet>`` (and the revision record unless ``revision`` is None)."""
    folder = Path(folder)
    path = folder / "data" / f"train-00000-of-00001.{file_format}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(path, gedit_table(rows))
    if revision is not None:
        (folder / gedit.REVISION_FILE).write_text(json.dumps({"repo": gedit.REPO, "revision": revision}))
    return folder


def write_gedit_masks(folder: str | Path) -> Path:
    """CoCoEdit's GEdit-Bench layout for `GEDIT_ROWS`: ``geditbench/fullset/<type>/en/<key>_mask.png``."""
    for k, (task, *_) in enumerate(GEDIT_ROWS):
        path = Path(folder) / "geditbench" / "fullset" / task / "en" / f"{fixture_key(k)}_mask.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        object_mask(k).save(path)
    return Path(folder)


def imgedit_sources() -> dict[str, int]:
    """Each source path of `IMGEDIT_ROWS` -> its image's number."""
    return {path: k for k, path in enumerate(dict.fromkeys(row[1] for row in IMGEDIT_ROWS))}


def write_imgedit(folder: str | Path) -> tuple[Path, Path]:
    """``folder/basic_edit.json`` and the JPEG sources under ``folder/images``; returns (json, images)."""
    folder = Path(folder)
    for path, k in imgedit_sources().items():
        (folder / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        source_image(k).save(folder / "images" / path, quality=95)
    mapping = {key: {"id": path, "prompt": prompt, "edit_type": kind} for key, path, prompt, kind in IMGEDIT_ROWS}
    (folder / "basic_edit.json").write_text(json.dumps(mapping, indent=4))
    return folder / "basic_edit.json", folder / "images"


def write_imgedit_masks(folder: str | Path) -> Path:
    """CoCoEdit's ImgEdit layout: ``imgedit/singleturn/<folder>/<file stem>_mask.png``, one per source image."""
    for path, k in imgedit_sources().items():
        target = Path(folder) / "imgedit" / "singleturn" / Path(path).parent / f"{Path(path).stem}_mask.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        object_mask(k).save(target)
    return Path(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="writes gedit_mini/, imgedit_mini/ and cocoedit_masks_mini/ in it")
    out = parser.parse_args(argv).folder
    write_gedit(out / "gedit_mini")
    write_imgedit(out / "imgedit_mini")
    write_gedit_masks(out / "cocoedit_masks_mini")
    write_imgedit_masks(out / "cocoedit_masks_mini")
    print(out)


if __name__ == "__main__":
    main()
