"""GEdit-Bench (hub dataset ``stepfun-ai/GEdit-Bench``) read from a local copy of its files, as a dataset of the
harness (``dataset=gedit``).

The copy is the hub repository's files: Arrow IPC stream files as `datasets` writes them (image columns are structs
``{bytes, path}``), or the hub's parquet conversion of them; every ``*.arrow`` (or every ``*.parquet``) under
``dataset.root`` is read. Its rows (GEdit-Bench's ``generate_image_example.py`` lists the fields) are ``key`` (32 hex
digits, the same in both languages), ``task_type`` (one of the 11 `TASK_TYPES`), ``instruction``,
``instruction_language`` (``en`` | ``cn``), ``input_image`` (the source the official scorer compares with),
``input_image_raw`` (not read) and ``Intersection_exist`` (the published "intersection" subset; what selects it is
not documented). An item is one row of the chosen language; its source is ``input_image``, whose bytes are copied
unchanged into ``dataset.cache`` (``<cache>/<revision>/<language>/<key>.<format>``), never into the data folder.

Sizes: ``input_image`` is a portrait of about 384x640. An editor fitted to its model's square resolution (every
editor by default, `harness.fit_to_resolution`) gets the short side scaled to it and the middle square: at 512 the
top and bottom fifths of the picture are cut off, and the edit and the ``_SRCIMG`` beside it are that square. An
editor that keeps the aspect (``Editor.native_size``) gets the whole image at its own size and sizes it itself; an
edit of another size is resized (bicubic) to the source's for the metrics, as GEdit-Bench's scorer does.

The revision: the copy's own, from ``editlab_download.json`` (written by ``python -m editlab.evaluation.benchsets
download gedit``) or from the hub cache's ``snapshots/<sha>`` folder name; recorded in job.json, and refused when
``dataset.revision`` names another.

Edits are saved in the official tree, ``<out>/annotation_images/fullset/<task_type>/<language>/<key>.png``, with
the source beside each (``<key>_SRCIMG.png``, `GEditDataset.source_beside_edit`): ``<out>/annotation_images`` is the
``<save_path>/<model>`` folder GEdit-Bench's scorer reads.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from editlab.evaluation.files import atomic_write
from editlab.evaluation.instruction_sets import InstructionSet, MaskFolder, check_choices, instruction_item, select
from editlab.evaluation.piebench import PieBenchItem, edited_image_path

REPO = "stepfun-ai/GEdit-Bench"
TASK_TYPES = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
              "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")
LANGUAGES = ("en", "cn")
SUBSETS = ("full", "intersection")
COLUMNS = ("key", "task_type", "instruction", "instruction_language", "input_image", "Intersection_exist")
REVISION_FILE = "editlab_download.json"  # {"repo": ..., "revision": <sha>}, written by `benchsets download`
KEY = re.compile(r"[0-9a-f]{32}")
SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class GEditItem(PieBenchItem):
    language: str = "en"
    intersection: bool = False  # the row's Intersection_exist

    @property
    def key(self) -> str:
        return self.image_id

    @property
    def task_type(self) -> str:
        return self.edit_type


def local_revision(root: Path) -> str | None:
    """The revision a copy holds: its ``editlab_download.json``'s, or its hub-cache folder name; None: unknown."""
    record = root / REVISION_FILE
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
            repo, revision = recorded["repo"], recorded["revision"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{record} cannot be read ({err}); download the copy again") from None
        if repo != REPO:
            raise ValueError(f"{record} says the folder holds {repo}, not {REPO}: set dataset.root to GEdit-Bench")
        if recorded.get("complete") is False:
            raise ValueError(f"{root} is an unfinished download: run `python -m editlab.evaluation.benchsets download "
                             f"gedit --revision {revision} --to {root}` again to complete it")
        return str(revision)
    if root.parent.name == "snapshots" and SHA.fullmatch(root.name):
        return root.name
    return None


def data_files(root: Path) -> list[Path]:
    """The copy's ``*.arrow`` files, or else its ``*.parquet`` files (not both: one copy, one format)."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.root={root} is not a folder; download GEdit-Bench first: python -m "
                                f"editlab.evaluation.benchsets download gedit --revision <sha> --to {root}")
    found = {suffix: sorted(p for p in root.rglob(f"*{suffix}") if ".cache" not in p.relative_to(root).parts)
             for suffix in (".arrow", ".parquet")}
    if found[".arrow"] and found[".parquet"]:
        raise ValueError(f"{root} holds both .arrow and .parquet files (two copies?): point dataset.root at one")
    if not (files := found[".arrow"] or found[".parquet"]):
        raise FileNotFoundError(f"no .arrow or .parquet file under dataset.root={root}: it is not a GEdit-Bench copy")
    return files


def read_rows(path: Path) -> list[dict]:
    """The `COLUMNS` of every row of one arrow stream (or arrow file, or parquet) file, as Python values."""
    try:
        if path.suffix == ".parquet":
            schema = pq.read_schema(path)
            _check_columns(schema, path)
            return pq.read_table(path, columns=list(COLUMNS)).to_pylist()
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:  # an arrow *file* (random-access format) rather than a stream
                source.seek(0)
                reader = pa.ipc.open_file(source)
            _check_columns(reader.schema, path)
            batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else \
                (reader.get_batch(k) for k in range(reader.num_record_batches))
            return [row for batch in batches for row in batch.select(list(COLUMNS)).to_pylist()]
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable arrow/parquet file ({err}); download the copy again") from None


def _check_columns(schema: pa.Schema, path: Path) -> None:
    if missing := [c for c in COLUMNS if c not in schema.names]:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} of GEdit-Bench (it has "
                         f"{', '.join(schema.names)}): is dataset.root a GEdit-Bench copy?")
    image = schema.field("input_image").type
    if not (pa.types.is_struct(image) and {image.field(k).name for k in range(image.num_fields)} >= {"bytes"}):
        raise ValueError(f"{path}: input_image is {image}, not an image column (a struct of bytes and path)")


class GEditDataset(InstructionSet):
    """The rows of ``language`` (and the ``intersection`` subset, and ``task_types``) sorted by key, then ``ids``,
    ``limit`` and the shard, as for PIE-Bench."""

    def __init__(self, root: str | Path, cache: str | Path, revision: str | None = None, language: str = "en",
                 subset: str = "full", task_types: list[str] | None = None, ids: list[str] | None = None,
                 limit: int | None = None, shard: int = 0, num_shards: int = 1, masks: MaskFolder | None = None):
        if language == "zh":
            raise ValueError("dataset.language=zh: GEdit-Bench marks its Chinese instructions cn; set "
                             "dataset.language=cn (the official scorer's zh matches no row)")
        check_choices([language], LANGUAGES, "language")
        check_choices([subset], SUBSETS, "subset")
        types = check_choices(task_types, TASK_TYPES, "task_types")
        self.root, self.language, self.subset, self.masks = Path(root), language, subset, masks
        files = data_files(self.root)
        self.revision = local_revision(self.root)
        if self.revision is None:
            raise ValueError(f"cannot tell which revision of {REPO} {self.root} holds: download it with python -m "
                             "editlab.evaluation.benchsets download gedit --revision <sha> --to <folder> (which "
                             f"records it in {REVISION_FILE}), or set dataset.root to the hub cache's "
                             "snapshots/<sha> folder")
        if revision is not None and str(revision) != self.revision:
            raise ValueError(f"dataset.revision={revision} but {self.root} holds revision {self.revision}: download "
                             f"{revision} (python -m editlab.evaluation.benchsets download gedit --revision "
                             f"{revision} --to <folder>) or set dataset.revision={self.revision}")
        self.cache = Path(cache) / self.revision / language
        self._images: dict[str, tuple[bytes, Path]] = {}  # key -> the source's bytes and the file they came from
        items = [item for item in self._items(files) if types is None or item.edit_type in types]
        if subset == "intersection":
            items = [item for item in items if item.intersection]
        where = f"{REPO} ({language}, {subset} set) in {self.root}"
        self.items: list[GEditItem] = select(items, ids, limit, shard, num_shards, where)
        chosen = {item.image_id for item in self.items}
        self._images = {key: value for key, value in self._images.items() if key in chosen}
        self._files: dict[str, Path] = {}

    def _items(self, files: list[Path]) -> list[GEditItem]:
        items: dict[str, GEditItem] = {}
        for path in files:
            for k, row in enumerate(read_rows(path)):
                where = f"{path} row {k}"
                if row["instruction_language"] not in LANGUAGES:
                    raise ValueError(f"{where}: instruction_language {row['instruction_language']!r} is not one of "
                                     f"{', '.join(LANGUAGES)}")
                if row["instruction_language"] != self.language:
                    continue
                key = row["key"]
                if not isinstance(key, str) or not KEY.fullmatch(key):
                    raise ValueError(f"{where}: key {key!r} is not 32 lower-case hex digits")
                if key in items:
                    raise ValueError(f"{where}: key {key} ({self.language}) appears twice (also in "
                                     f"{self._images[key][1]}): is a second copy under {self.root}?")
                if row["task_type"] not in TASK_TYPES:
                    raise ValueError(f"{where} ({key}): task_type {row['task_type']!r} is not one of GEdit-Bench's: "
                                     f"{', '.join(TASK_TYPES)}")
                if not isinstance(row["Intersection_exist"], bool):
                    raise ValueError(f"{where} ({key}): Intersection_exist {row['Intersection_exist']!r} is not "
                                     "true or false")
                image = row["input_image"] or {}
                if not image.get("bytes"):
                    raise ValueError(f"{where} ({key}): input_image holds no bytes (path {image.get('path')!r}); "
                                     "the copy must embed its images, as the hub's files do")
                try:
                    items[key] = instruction_item(
                        key, f"fullset/{row['task_type']}/{self.language}/{key}.png", row["instruction"],
                        row["task_type"], GEditItem, language=self.language, intersection=row["Intersection_exist"])
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
                self._images[key] = (image["bytes"], path)
        return sorted(items.values(), key=lambda item: item.image_id)

    @property
    def provenance(self) -> dict[str, str]:
        return {"repo": REPO, "revision": self.revision}

    def image_file(self, item: PieBenchItem) -> Path:
        """``input_image``'s bytes as a file of the cache (written once, checked to be an image)."""
        if item.image_id in self._files:
            return self._files[item.image_id]
        data, source = self._images[item.image_id]
        try:
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
                image.verify()
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"input_image of {item.image_id} in {source} is not a readable image ({err}); download "
                             "the benchmark again") from None
        path = self.cache / f"{item.image_id}.{image_format.lower()}"
        if not (path.is_file() and path.read_bytes() == data):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(data), "wb")
        self._files[item.image_id] = path
        return path

    def source_beside_edit(self, output_dir: Path, item: PieBenchItem) -> Path:
        """``<key>_SRCIMG.png`` beside the edit, as in the official tree: the source the scorer compares the edit
        with (and resizes it to). It is the source as the editor saw it: ``input_image`` itself for an editor that
        takes images at their own size, the square crop for one fitted to a square resolution."""
        return edited_image_path(output_dir, item).with_name(f"{item.image_id}_SRCIMG.png")

    def mask_file(self, item: PieBenchItem) -> Path:
        """CoCoEdit's layout, ``[geditbench/]fullset/<task_type>/en/<key>_mask.png``. It has English rows only; a cn
        item takes its key's mask, on the assumption (unchecked) that a key has one source image in both languages
        (a mask of another aspect than the image is refused)."""
        base = self.masks.folder / "geditbench" if (self.masks.folder / "geditbench").is_dir() else self.masks.folder
        return base / "fullset" / item.edit_type / "en" / f"{item.image_id}_mask.png"
