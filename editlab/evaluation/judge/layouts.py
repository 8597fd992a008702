"""Where the edits to judge are, and what each was asked: three folder layouts -> `JudgeItem`s.

- an editlab job folder (``results.csv``, ``job.json``, ``annotation_images/``): the items of the job's benchmark
  (rebuilt from ``job.json``: PIE-Bench or the built-in set, GEdit-Bench, ImgEdit; its folder is ``dataset_root``,
  or ``--data``) that have a row; an item whose row is an error is an ``input_error`` (its edit failed);
- the official GEdit-Bench tree ``<model>/fullset/<task_type>/<language>/<key>.png`` with the source beside it as
  ``<key>_SRCIMG.png``; instructions, types, languages and the intersection flag come from a metadata file (JSON list
  or ``{key: entry}``, JSONL or CSV with the dataset's fields ``key, task_type, instruction, instruction_language,
  Intersection_exist``);
- ImgEdit-Bench's flat folder of ``<key>.png`` with the benchmark's ``basic_edit.json`` (``{key: {id, prompt,
  edit_type}}``) and the original images' root (``<root>/<id>``).
A metadata file that cannot be read, or an entry without a field the judge needs, stops the pass naming the file and
the entry; a missing or unreadable image, or a type the protocol does not know, is that item's failure.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from editlab.conf import group_config
from editlab.evaluation.gedit import LANGUAGES as GEDIT_LANGUAGES
from editlab.evaluation.gedit import TASK_TYPES as GEDIT_TASK_TYPES
from editlab.evaluation.judge.scoring import JudgeItem
from editlab.evaluation.piebench import edited_image_path
from editlab.evaluation.summary import read_results


def is_job_folder(folder: Path) -> bool:
    return (folder / "results.csv").is_file() and (folder / "job.json").is_file()


def job_dataset(folder: Path, data: Path | None = None):
    """The benchmark a job ran on, rebuilt from its ``job.json`` (the dataset config's defaults under the keys the
    job recorded; ``data``: another copy of it). Rows select the items, so limits and shards need not be known."""
    from editlab.evaluation.datasets import build_dataset

    job = json.loads((folder / "job.json").read_text())
    recorded = {key.split(".", 1)[1]: value for key, value in job.get("config", {}).items()
                if key.startswith("dataset.")}
    name = recorded.get("name") or "pie_bench"
    try:
        cfg = group_config("dataset", name)
    except FileNotFoundError:  # a dataset config of the user's own: a PIE-Bench-format folder
        cfg = {"kind": "piebench"}
    cfg |= {key: value for key, value in recorded.items() if key not in ("limit", "ids", "shard", "num_shards")}
    root = data or (Path(job["dataset_root"]) if job.get("dataset_root") else None)
    if root is None:
        raise ValueError(f"{folder / 'job.json'} names no benchmark folder (dataset_root): give --data")
    cfg["images" if cfg.get("kind") == "imgedit" else "root"] = str(root)
    if cfg.get("kind") == "toyset":
        cfg["kind"] = "piebench"  # the generated set is on disk already: read it as it is
    return build_dataset(cfg)


def editlab_items(folder: Path, data: Path | None = None, benchmark: str | None = None) -> Iterator[JudgeItem]:
    """The job's items that have a row, with their source, instruction and edit type. The source of an item whose
    edit has its source beside it (GEdit's ``<key>_SRCIMG.png``: the image the editor saw) is that file. A job run
    on one judged benchmark is not judged by the other's protocol (``benchmark``)."""
    rows = read_results(folder / "results.csv").drop_duplicates("image_id", keep="last").set_index("image_id")
    dataset = job_dataset(folder, data)
    ran_on = next((kind for kind, cls in (("gedit", "GEditDataset"), ("imgedit", "ImgEditDataset"))
                   if type(dataset).__name__ == cls), None)
    if benchmark and ran_on and ran_on != benchmark:
        raise ValueError(f"{folder} holds edits of {ran_on}; judge them with --benchmark {ran_on}")
    for item in dataset:
        if item.image_id not in rows.index:
            continue  # not edited (yet)
        error = f"the run's edit failed: {rows.loc[item.image_id, 'error']}" if rows.loc[item.image_id, "error"] \
            else "" if item.instruction else f"no editing instruction for {item.image_id} in {dataset.root}"
        beside = dataset.source_beside_edit(folder, item)
        try:
            source = beside if beside is not None and beside.is_file() else dataset.image_file(item)
        except ValueError as err:  # an image path leading outside the benchmark, an unreadable image
            source, error = None, error or str(err)
        yield JudgeItem(item.image_id, item.edit_type, item.instruction, source, edited_image_path(folder, item),
                        getattr(item, "language", ""), getattr(item, "intersection", None), error=error)


def _entries(path: Path) -> list[dict[str, Any]]:
    """A metadata file's entries: JSON (a list, or ``{key: entry}``), JSONL or CSV."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the metadata file {path}: {err}") from None
    if isinstance(data, Mapping):
        return [{"key": key, **entry} if isinstance(entry, Mapping) else entry for key, entry in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries or an object {{key: entry}}")
    return data


def _flag(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes")


def _field(entry: Any, names: tuple[str, ...], path: Path, number: int) -> str:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{path} entry {number}: is a {type(entry).__name__}, expected an object")
    for name in names:
        if entry.get(name) not in (None, ""):
            return str(entry[name])
    raise ValueError(f"{path} entry {number} ({entry.get('key', 'no key')}): no {' or '.join(names)}")


def _relative(value: str, what: str) -> str:
    """``value`` unchanged if it is a plain relative path. Not `piebench.relative_image_path`: that one normalises
    (``./``, backslashes) and speaks of PIE-Bench entries, while a metadata key must stay verbatim (it names
    ``<key>.png`` and the item in the calls log)."""
    parts = PurePosixPath(value).parts
    if not parts or PurePosixPath(value).is_absolute() or ".." in parts or "\\" in value:
        raise ValueError(f"{what} {value!r} is not a plain relative path")
    return value


def gedit_items(model_folder: Path, metadata: Path, language: str | None = None) -> Iterator[JudgeItem]:
    """The items of a GEdit metadata file, in its order, with their images in the official tree."""
    if language not in (None, *GEDIT_LANGUAGES):
        raise ValueError(f"language {language!r}: GEdit-Bench's instruction_language is 'en' or 'cn' (not 'zh')")
    if not (model_folder / "fullset").is_dir():
        raise ValueError(f"{model_folder} has no fullset/ folder: give the model's folder of the official GEdit tree "
                         "<model>/fullset/<task_type>/<language>/<key>.png (sources: <key>_SRCIMG.png)")
    for number, entry in enumerate(_entries(metadata), 1):
        key = _relative(_field(entry, ("key",), metadata, number), "key")
        lang = _field(entry, ("instruction_language", "language"), metadata, number)
        if language and lang != language:
            continue
        task_type = _field(entry, ("task_type",), metadata, number)
        instruction = _field(entry, ("instruction",), metadata, number)
        folder = model_folder / "fullset" / task_type / lang
        error = "" if task_type in GEDIT_TASK_TYPES else \
            f"unknown GEdit task type {task_type!r}; expected one of {', '.join(GEDIT_TASK_TYPES)}"
        yield JudgeItem(key, task_type, instruction, folder / f"{key}_SRCIMG.png", folder / f"{key}.png", lang,
                        _flag(entry.get("Intersection_exist", entry.get("intersection"))), error)


def imgedit_items(folder: Path, metadata: Path, images: Path) -> Iterator[JudgeItem]:
    """The items of ImgEdit's basic_edit.json: source ``<images>/<id>``, edit ``<folder>/<key>.png``."""
    for number, entry in enumerate(_entries(metadata), 1):
        key = _relative(_field(entry, ("key",), metadata, number), "key")
        source = _relative(_field(entry, ("id",), metadata, number), f"entry {key}: id")
        yield JudgeItem(key, _field(entry, ("edit_type",), metadata, number),
                        _field(entry, ("prompt",), metadata, number), images / source, folder / f"{key}.png")
