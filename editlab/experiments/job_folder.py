"""A job's folder on disk: which folders a run may write into, its lock, ``results.csv``, ``job.json`` and the
fingerprints that decide whether the results in a folder belong to this run.

A run writes only into a folder that is new or empty, or that its ``job.json`` proves was made by the same
settings; it never writes into the file-system root, the home folder, the checkout, the benchmark's own folder,
or a folder holding files editlab did not write. One process at a time holds a job folder (`hold_folder`). Each
row of ``results.csv`` records a hash of its item's inputs (`item_inputs`), so an item whose prompts, mask or image
changed since it was edited is edited again (`finished_items`, `check_inputs`).
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import hashlib
import json
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from editlab.evaluation.files import (
    TMP_PATTERN,
    FolderBusyError,
    FolderLock,
    atomic_write,
    atomic_write_json,
    remove_orphans,
)
from editlab.evaluation.ground_truth import GroundTruthMetrics
from editlab.evaluation.metrics import PieBenchMetrics
from editlab.evaluation.piebench import PieBenchDataset, PieBenchItem, edited_image_path
from editlab.evaluation.summary import read_results
from editlab.evaluation.toyset import dataset_root
from editlab.experiments.cli import path_safe  # noqa: F401 - registers the job folders' resolver

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE.parent  # a checkout holds the package and pyproject.toml; installed: site-packages


class RunError(Exception):
    """A problem with the configuration or the data that stops the job; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# where a run may write

# What a job writes into its folder (Hydra: .hydra/ and <job>.log; the harness: the rest), and what a sweep writes
# into its own (multirun.yaml, the report). Anything else in a folder was put there by someone else.
JOB_ENTRIES = ("results.csv", "summary.csv", "job.json", "set_metrics.json", "annotation_images", "wandb", ".hydra",
               "*.log", "job_error.txt", ".editlab.lock", "superseded_*", "judge_*", "judge.json")
OUTPUTS = ("results.csv", "summary.csv", "set_metrics.json", "annotation_images", "wandb", "judge_calls.jsonl",
           "judge.json")  # a judge metric set's calls log and record (evaluation.judge)


def _foreign(folder: Path, ours: Iterable[str]) -> list[str]:
    ours = tuple(ours)
    return sorted(p.name for p in folder.iterdir()
                  if not TMP_PATTERN.match(p.name) and not any(fnmatch.fnmatchcase(p.name, o) for o in ours))


def check_output_folder(folder: Path, key: str = "hydra.run.dir", sweep: bool = False) -> None:
    """Refuse a folder a run must not write into, before anything is written: the file-system root, the home
    folder, the checkout, a file, or a folder holding files that are not a job's (a sweep folder: not an earlier
    sweep's, i.e. without its ``multirun.yaml``). A `RunError` names the folder, what is in it and the key to set."""
    resolved = folder.expanduser().resolve()
    special = {Path("/"): "the file-system root", Path.home().resolve(): "your home folder",
               PACKAGE: "the editlab package"}
    if (CHECKOUT / "pyproject.toml").is_file():
        special[CHECKOUT] = "the editlab checkout"
    if resolved in special:
        raise RunError(f"{key}={folder} is {special[resolved]}: a run writes results there; name a folder of its "
                       f"own, e.g. {key}=outputs/my_run")
    for parent in (resolved, *resolved.parents):
        if parent.exists() and not parent.is_dir():
            raise RunError(f"{key}={folder}: {parent} is a file, not a folder; choose another folder")
        if parent.exists():
            break
    if not resolved.is_dir():
        return
    try:
        entries = list(resolved.iterdir())
    except OSError as err:
        raise RunError(f"{key}={folder} cannot be read ({err.strerror}); choose another folder") from None
    if sweep:
        if entries and not (resolved / "multirun.yaml").is_file():
            raise RunError(f"{key}={folder} is not empty and holds no earlier sweep (no multirun.yaml; it has "
                           f"{', '.join(sorted(p.name for p in entries)[:5])}): choose an empty or new folder")
        return
    if foreign := _foreign(resolved, JOB_ENTRIES):
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise RunError(f"{key}={folder} holds files editlab did not write ({', '.join(foreign[:5])}{more}): a run "
                       f"writes only into a new or empty folder, or its own earlier one; choose another folder")


def check_writable(folder: Path, key: str = "hydra.run.dir") -> None:
    """Create ``folder`` and write a probe file in it; an OSError (read-only file system, no permission, a full
    disk) becomes one line naming the folder and what to do."""
    probe = folder / f".editlab_probe.{uuid.uuid4().hex[:8]}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
    except OSError as err:
        raise RunError(f"cannot write into {key}={folder}: {err.strerror}; choose a folder on a writable disk with "
                       "free space") from None
    finally:
        probe.unlink(missing_ok=True)


def check_outside_dataset(output_dir: Path, root: Path | None) -> None:
    """Results never go into the benchmark's own folder (its images would be overwritten by the edits)."""
    if root is None:
        return
    out, root_ = output_dir.resolve(), root.resolve()
    if out == root_ or root_ in out.parents:
        raise RunError(f"the output directory {output_dir} is inside dataset.root={root}: edits would be written "
                       "into the benchmark; choose an output directory outside it (hydra.run.dir=...)")


@contextlib.contextmanager
def hold_folder(output_dir: Path):
    """Hold the job folder's lock (a second run into it is a `RunError`) and clean up the temporary files a killed
    run left there."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(FolderLock(output_dir, what="a run's results"))
        except FolderBusyError as err:
            raise RunError(str(err)) from None
        if orphans := remove_orphans(output_dir):
            log.info("removed %d temporary file(s) a stopped run left in %s", len(orphans), output_dir)
        yield


@contextlib.contextmanager
def disk_errors(output_dir: Path):
    """A write that fails (a full disk, a folder made read-only) stops the job with one line; what is on disk stays
    consistent (every write is atomic), so the same command resumes once the disk is fixed."""
    try:
        yield
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise RunError(f"cannot write into {output_dir}: {err.strerror or err}{where}; free space or fix the folder, "
                       "then re-run the same command to resume (the finished items are kept)") from None


class OutputGuard(Callback):
    """Hydra callback: the checks of `check_output_folder` and `check_writable` on the run's (or the sweep's)
    folder before Hydra writes anything there (its ``.hydra/``, the log); a refusal is one line and exit status 1.
    A sweep given ``hydra.run.dir`` is refused too: a sweep's folder is ``hydra.sweep.dir``."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.run.dir), "hydra.run.dir", sweep=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if given := [o for o in config.hydra.overrides.hydra if o.split("=", 1)[0] == "hydra.run.dir"]:
            sys.exit(f"error: {given[0]} names a single run's folder, but this is a sweep (several jobs, or -m): "
                     "name its folder with hydra.sweep.dir=... (each job gets a subfolder)")
        self._check(Path(config.hydra.sweep.dir), "hydra.sweep.dir", sweep=True)

    @staticmethod
    def _check(folder: Path, key: str, sweep: bool) -> None:
        try:
            check_output_folder(folder, key, sweep)
            check_writable(folder, key)
        except RunError as err:
            sys.exit(f"error: {err}")


# ---------------------------------------------------------------------------------------------------------------------
# results.csv

def result_columns(metric_columns: tuple[str, ...] = (*PieBenchMetrics.columns, *GroundTruthMetrics.columns)
                   ) -> tuple[str, ...]:
    """The columns of results.csv for a job's metrics (by default PIE-Bench's and the ground truth's)."""
    return ("run", "editor", "model", "precision", "image_id", "edit_type", *metric_columns,
            "seconds", "nfe", "backward_passes", "peak_mem_mb", "batch_size", "error", "note", "inputs")


RESULT_COLUMNS = result_columns()



class ResultsFile:
    """Append-only results.csv, one physical line per row, flushed as rows arrive. Opening an existing file checks
    its header and drops a last line torn by a kill (logged), so the next row starts on a line of its own."""

    def __init__(self, path: Path, columns: tuple[str, ...] = RESULT_COLUMNS):
        self.path, self.columns = path, columns
        header = ",".join(columns).encode()
        data = path.read_bytes() if path.exists() else b""
        if b"\n" not in data:  # new, or killed while writing the header
            atomic_write(path, lambda f: f.write(header + b"\r\n"), "wb")
            return
        if data.split(b"\n", 1)[0].rstrip(b"\r") != header:
            raise RunError(f"{path} has other columns than this version of editlab writes; move it away or choose "
                           "another output directory (hydra.run.dir=...)")
        if not data.endswith(b"\n"):
            cut = data.rindex(b"\n") + 1
            log.warning("%s: dropped a torn last line (the previous run was stopped while writing it): %r",
                        path, data[cut:][:120].decode(errors="replace"))
            with path.open("r+b") as f:
                f.truncate(cut)

    def append(self, row: Mapping[str, Any]) -> None:
        values = [row.get(column, "") for column in self.columns]
        values = [" ".join(v.split()) if isinstance(v, str) else v for v in values]  # no line breaks inside a row
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(values)

    def read(self) -> pd.DataFrame:
        """The latest row per item (a retried item's success replaces its earlier error)."""
        return read_results(self.path).drop_duplicates("image_id", keep="last").reset_index(drop=True)


def save_image_atomic(image: Image.Image, path: Path) -> None:
    """Write to a private name and rename: a kill leaves the old file or the new one, never half an image."""
    atomic_write(path, lambda f: image.save(f, format="PNG"), "wb")


def item_inputs(item: PieBenchItem, image_file: Path | None) -> str:
    """A hash of everything an item's row depends on besides the settings: its prompts, instruction, blend words,
    edit type, mask and the bytes of its image (none for a caption without one)."""
    digest = hashlib.sha256(json.dumps([item.source_prompt, item.target_prompt, item.instruction, item.blend_words,
                                        item.edit_type, item.mask_rle]).encode())
    if image_file is not None and image_file.is_file():
        digest.update(hashlib.sha256(image_file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def finished_items(frame: pd.DataFrame, dataset: PieBenchDataset, output_dir: Path, images: bool,
                   inputs: Mapping[str, str]) -> set[str]:
    """Ids of the dataset's items whose latest row succeeded on the item's current inputs (``inputs``: id -> hash,
    `item_inputs`) and, when images are saved, whose image exists."""
    succeeded = dict(zip(frame.loc[frame["error"] == "", "image_id"], frame.loc[frame["error"] == "", "inputs"]))
    return {item.image_id for item in dataset if succeeded.get(item.image_id) == inputs[item.image_id]
            and (not images or edited_image_path(output_dir, item).is_file())}


def changed_items(frame: pd.DataFrame, inputs: Mapping[str, str]) -> list[str]:
    """Ids whose latest row was made from other inputs than the item has now (its prompts, mask or image changed)."""
    return sorted(i for i, h in zip(frame["image_id"], frame["inputs"].fillna("")) if i in inputs and h != inputs[i])


def inputs_of(dataset: PieBenchDataset, task: str) -> dict[str, str]:
    def image_file(item: PieBenchItem) -> Path | None:
        if task == "generation":
            return None
        with contextlib.suppress(FileNotFoundError, ValueError):  # a missing or refused image fails its item
            return dataset.image_file(item)
        return None

    return {item.image_id: item_inputs(item, image_file(item)) for item in dataset}


def check_inputs(cfg: DictConfig, output_dir: Path, inputs: Mapping[str, str]) -> None:
    """Items whose inputs changed since their rows are edited again; when every item the folder's rows share with
    the dataset changed, the benchmark is another one: a `RunError`, or with ``restart=true`` a fresh start."""
    path = output_dir / "results.csv"
    try:
        previous = read_results(path).drop_duplicates("image_id", keep="last") if path.is_file() else None
    except (ValueError, KeyError):  # empty or of another version: ResultsFile says so
        return
    if previous is None or "inputs" not in previous or not (shared := set(previous["image_id"]) & inputs.keys()):
        return
    changed = changed_items(previous, inputs)
    if len(changed) < len(shared):
        if changed:
            log.warning("%d item(s) changed since they were edited (prompts, mask or image): editing them again: %s",
                        len(changed), ", ".join(changed[:10]))
        return
    if not cfg.get("restart"):
        raise RunError(f"{output_dir} holds results of another benchmark: all {len(shared)} of its items that share "
                       "an id with this dataset have other prompts, masks or images now; choose another output "
                       "directory (hydra.run.dir=...), or add restart=true to move those results aside")
    supersede(output_dir, "from the benchmark's earlier inputs")


# ---------------------------------------------------------------------------------------------------------------------
# job.json: what the results in a directory were made with

# Keys that pick items or only change how a run reports (not what its rows hold): resuming with others is fine.
NOT_FINGERPRINTED = ("dataset.limit", "dataset.ids", "dataset.edit_types", "dataset.shard", "dataset.num_shards",
                     "dataset.task_types", "dataset.subset", "dataset.cache")


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """A nested mapping as ``{"prefix.key.sub": value}``."""
    if isinstance(value, Mapping):
        return {k: v for key, sub in value.items() for k, v in flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings a job's rows depend on, flattened to dotted keys."""
    groups = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
              for key in ("editor", "model", "precision", "offload", "metrics", "dataset", "seed", "task")
              if key in cfg}
    if groups["dataset"].get("kind") == "toyset":  # the built-in set is named by its parameters, not by its cache
        groups["dataset"].pop("root", None)
    if groups.get("task", {}).get("name", "edit") == "edit":  # results made before tasks existed are edits
        groups.pop("task", None)
    flat = {k: v for key, value in groups.items() for k, v in flatten(value, key).items()}
    return {k: v for k, v in flat.items() if k not in NOT_FINGERPRINTED}


def _changed_settings(current: dict[str, Any], job: dict[str, Any], output_dir: Path) -> list[str]:
    """``"key: old -> new"`` for each setting that differs from those the directory's results were made with."""
    if "config" in job and "wandb_id" in job:
        before = job["config"]
        keys = before.keys() | current.keys()
    else:  # results written before job.json existed: their rows record the editor, model and precision
        rows = pd.read_csv(output_dir / "results.csv", usecols=["editor", "model", "precision"], dtype=str)
        before = {f"{k}.name": "/".join(sorted(set(rows[k].dropna()))) for k in rows}
        keys = before.keys()
    return [f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in sorted(keys) if before.get(k) != current.get(k)]


def _has_rows(results: Path) -> bool:
    return results.is_file() and results.read_bytes().count(b"\n") > 1


def present_results(output_dir: Path) -> list[str]:
    """The results a folder holds: rows, a summary, set metrics, edited images (a W&B run alone is none: a job that
    stopped before its first item logs its error there)."""
    held = ["results.csv"] if _has_rows(output_dir / "results.csv") else []
    held += [name for name in ("summary.csv", "set_metrics.json") if (output_dir / name).is_file()]
    images = output_dir / "annotation_images"
    return held + (["annotation_images"] if images.is_dir() and any(images.rglob("*.png")) else [])


def supersede(output_dir: Path, reason: str) -> Path:
    """Move the folder's results aside into ``superseded_<time>/`` (``restart=true``)."""
    aside = Path(tempfile.mkdtemp(prefix=time.strftime("superseded_%Y%m%d-%H%M%S_"), dir=output_dir))
    for name in (*OUTPUTS, "job.json"):
        if (output_dir / name).exists():
            (output_dir / name).rename(aside / name)
    log.warning("restart=true: the results made %s moved to %s", reason, aside)
    return aside


def check_job(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """The folder's job record (``job.json``) when it is this run's; {} for a new folder, or one whose record holds
    no results yet (a job stopped before its first item: its settings may be fixed). Results must have been made
    with the same settings (their ``job.json``, or for results older than job.json their rows): otherwise a
    `RunError` naming what differs, or with ``restart=true`` the old results move to ``superseded_<time>/``."""
    job = read_job(output_dir / "job.json")
    proven = "config" in job and "wandb_id" in job  # a stub (a job stopped by a missing key) records no run
    held, problem = present_results(output_dir), None
    legacy = not proven and "results.csv" in held  # rows older than job.json: they name editor, model, precision
    changed = _changed_settings(fingerprint(cfg), job, output_dir) if proven or legacy else []
    if held and not proven and not legacy:
        problem = f"holds results ({', '.join(held)}) without a job.json that says how they were made"
    elif held and changed:
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        problem = f"holds results made with other settings ({'; '.join(changed[:6])}{more})"
    if not problem:
        return job if proven and not changed else {}
    if not cfg.get("restart"):
        raise RunError(f"{output_dir} {problem}: choose another output directory (hydra.run.dir=...), or add "
                       "restart=true to move those results aside and start over")
    supersede(output_dir, "with the previous settings")
    return {}


def record_job(cfg: DictConfig, output_dir: Path, previous: dict[str, Any], group: str | None,
               provenance: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write ``job.json`` once the job has started: the fingerprint, the job's W&B run id (the previous record's,
    so a resumed job logs into the same run) and group, the benchmark's folder, which `evaluation.aggregate` draws
    its grid from, what identifies its copy (``provenance``, e.g. a hub dataset's revision: ``dataset_source``),
    and the paper table row the job produces, which `evaluation.tables` lays out."""
    root = dataset_root(cfg.dataset)
    job = {"config": fingerprint(cfg), "wandb_id": previous.get("wandb_id") or uuid.uuid4().hex[:12],
           "dataset_root": str(root.resolve()) if root else None, "paper_row": cfg.get("paper_row"),
           "wandb_group": group}
    if provenance:
        job["dataset_source"] = dict(provenance)
    write_json(output_dir / "job.json", job)
    return job


def record_stopped_job(cfg: DictConfig, output_dir: Path) -> None:
    """A job stopped before it started leaves, in a folder without a record, a stub ``job.json`` with what is
    known (the task, the metric set, the paper row), so a paper table shows the row as failed rather than as not
    run; a stub proves no results."""
    if not (output_dir / "job.json").exists():
        known = {"task.name": OmegaConf.select(cfg, "task.name", default="edit"),
                 "metrics.kind": OmegaConf.select(cfg, "metrics.kind", default="piebench")}
        write_json(output_dir / "job.json", {"config": known, "paper_row": cfg.get("paper_row")})


def read_job(path: Path) -> dict[str, Any]:
    """A job.json ({} when there is none); one that cannot be read stops the job with what to do."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} cannot be read ({err}): move it away to start the directory's record afresh "
                       "(the results stay; they are checked again by their rows)") from None


def write_json(path: Path, value: dict[str, Any]) -> None:
    """A JSON record (job.json, set_metrics.json): a kill leaves the old record or the new one."""
    atomic_write_json(path, value)
