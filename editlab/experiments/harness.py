"""The harness behind ``run.py``: dataset -> editor -> metrics -> results.csv / summary.csv / W&B.

``task`` says what is done to each item: ``edit`` (source image + prompts -> edit), ``inversion`` (source image ->
the method's inversion -> decoded back with the source prompt: the reconstruction), ``generation`` (the item's
caption -> a generated image). The metrics compare the source with the output (none for generation), and an edit
with the benchmark's true edit where it ships one (`with_ground_truth`, NaN otherwise); metric sets with set-level
scores (FID) score the job's saved outputs against the dataset's source images at the end (``set_metrics.json``,
and the ``fid`` column of the summary's ``all`` row).

Items go to the editor ``batch_size`` at a time (`Editor.run_batch`; 1 by default). Every item's row is appended to
``results.csv`` (and flushed) as soon as its batch finishes, after its edited image is on disk: the row is the
commit point, so a killed run loses at most the batch in flight. Re-running into the same output directory skips the
items that already succeeded (a success row whose image is missing is done again), drops a row torn by a kill, and
refuses when the configuration differs from the one the results were made with (``job.json``; ``restart=true`` moves
the old results aside and starts over). A failing item (missing or corrupt image, over-long prompt, bad blend words,
a mask that does not fit its image, NaN, out of memory) gets a row with its ``error`` and the run goes on (a batch
the editor fails is edited again one item at a time, so a bad item fails alone); a job in which every item failed
exits non-zero. The folder's bookkeeping (its lock, ``results.csv``, ``job.json``, which items are done) is
`job_folder`'s; this module runs the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue
from PIL import Image
from tqdm import tqdm

from editlab.conf import group_config
from editlab.editors.base import TASKS, EditRequest, EditResult, build_editor
from editlab.evaluation.backbones import failure_notes
from editlab.evaluation.datasets import build_dataset
from editlab.evaluation.files import atomic_write
from editlab.evaluation.ground_truth import load_ground_truth, with_ground_truth
from editlab.evaluation.piebench import ItemSet, PieBenchDataset, PieBenchItem, edited_image_path, load_rgb_image
from editlab.evaluation.protocol import Sample, build_metrics
from editlab.evaluation.summary import format_summary, metric_gaps, summarize
from editlab.evaluation.toyset import dataset_root
from editlab.experiments.console import details, quiet_libraries
from editlab.experiments.job_folder import (  # noqa: F401 - RunError, ResultsFile, flatten, read_job ...: API
    RESULT_COLUMNS,
    ResultsFile,
    RunError,
    check_inputs,
    check_job,
    check_output_folder,
    check_outside_dataset,
    check_writable,
    disk_errors,
    finished_items,
    flatten,
    hold_folder,
    inputs_of,
    read_job,
    record_job,
    record_stopped_job,
    result_columns,
    save_image_atomic,
    supersede,
    write_json,
)
from editlab.experiments.wandb_logger import RunLogger
from editlab.models.components import ModelLoadError
from editlab.models.hub import HubUnreachableError
from editlab.models.images import fit
from editlab.models.loading import load_components

log = logging.getLogger(__name__)


def fit_to_resolution(image: Image.Image, mask: np.ndarray | None, size: int | None
                      ) -> tuple[Image.Image, np.ndarray | None, str]:
    """Resize the short side to ``size`` and centre-crop (image: bicubic, mask: nearest). Note what was done.
    ``size`` None (an editor that takes images at their own size, `Editor.native_size`): unchanged."""
    width, height = image.size
    if size is None or (width, height) == (size, size):
        return image, mask, ""
    if mask is not None:
        mask = (np.asarray(fit(Image.fromarray((mask * 255).astype(np.uint8)), (size, size), Image.NEAREST)) > 127
                ).astype(np.float64)
    return fit(image, (size, size)), mask, f"resized {width}x{height}->{size}x{size}"


_PROC = Path("/proc/self")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on CPU the process's peak resident set (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        (_PROC / "clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: CUDA peak allocated, or the peak resident set on CPU (where the
    kernel cannot reset it, the process's peak so far)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = (_PROC / "status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Outcome:
    row: dict[str, Any]
    source: Image.Image | None = None
    edited: Image.Image | None = None


def item_seed(seed: int, image_id: str) -> int:
    """A generation's seed: the run's seed mixed with the item's id, so every caption starts from its own noise
    (one shared noise would shrink the set's diversity and bias FID), the same on every shard and rerun."""
    return (seed ^ zlib.crc32(image_id.encode())) & 0x7FFFFFFF


@dataclass
class Prepared:
    """An item ready for the editor: its row so far, its request, and what scoring its output needs."""

    item: PieBenchItem
    row: dict[str, Any]
    request: EditRequest
    image: Image.Image | None
    mask: np.ndarray | None
    notes: list[str]


def prepare_item(task: str, item: PieBenchItem, dataset: ItemSet, resolution: int | None, seed: int,
                 row: dict[str, Any]) -> Prepared:
    """Load ``item``'s image and mask at the model's ``resolution`` (None: at the image's own) and make its request;
    ``row["note"]`` says what was noted. Raises what makes the item fail (a missing or corrupt image, a mask that
    does not fit). Items without captions (an instruction benchmark's) have empty prompts, which no editor that
    runs on them reads (`check_fits_dataset`)."""
    prompts = (("source", item.source_prompt),) if task != "edit" else \
        (("source", item.source_prompt), ("target", item.target_prompt))
    captions = "prompts" in dataset.provides
    notes = [f"empty {name} prompt" for name, prompt in prompts if captions and not prompt.strip()]
    image = mask = None
    if task != "generation":
        image, note = load_rgb_image(dataset.image_file(item))
        mask = dataset.load_mask(item, image.height, image.width)
        image, mask, resize_note = fit_to_resolution(image, mask, resolution)
        notes = [note, resize_note, *notes]
    row["note"] = "; ".join(n for n in notes if n)
    target = item.target_prompt if task == "edit" else item.source_prompt
    request = EditRequest(image, item.source_prompt, target, item.instruction,
                          item.blend_words if task == "edit" else None,
                          item_seed(seed, item.image_id) if task == "generation" else seed)
    return Prepared(item, row, request, image, mask, notes)


def run_editor(task: str, batch: list[Prepared], editor) -> list[tuple[EditResult, float] | Exception]:
    """Each item's result with its batch's peak memory (MiB), from one `Editor.run_batch` call, or the exception
    that failed it. A batch that fails is edited again one item at a time, so an item's error is its own."""
    device = editor.components.device
    try:
        reset_peak_memory(device)
        results = editor.run_batch(task, [prepared.request for prepared in batch])
        peak = peak_memory_mb(device)
        return [(result, peak) for result in results]
    except Exception as err:  # noqa: BLE001 - one bad item must not stop a sweep, nor fail the others of its batch
        if len(batch) == 1:
            return [err]
        log.warning("a batch of %d items failed (%s: %s): editing them one at a time", len(batch),
                    type(err).__name__, err)
    # past the except block the error's traceback, which holds the batch's tensors, is gone: their memory is free
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [outcome for prepared in batch for outcome in run_editor(task, [prepared], editor)]


def score_item(task: str, prepared: Prepared, result: EditResult, peak_mb: float, dataset: PieBenchDataset,
               metrics) -> Outcome:
    """The item's row with its share of the batch's cost, its metrics and ground-truth scores."""
    row, item = prepared.row, prepared.item
    row.update(seconds=result.seconds, nfe=result.nfe, backward_passes=result.extras.get("backward_passes", 0),
               peak_mem_mb=peak_mb, batch_size=result.batch_size)
    edited, notes = result.edited, prepared.notes
    if prepared.image is not None and edited.size != prepared.image.size:  # an editor of its own output size
        notes = [*notes, f"edit {edited.width}x{edited.height} resized to the source's "
                         f"{prepared.image.width}x{prepared.image.height} for the metrics"]
        edited = edited.convert("RGB").resize(prepared.image.size, Image.BICUBIC)  # as GEdit-Bench's scorer does
    output = np.asarray(edited)
    source = None if prepared.image is None else np.asarray(prepared.image)
    truth = load_ground_truth(dataset.root, item.image_path, output) if task == "edit" else None
    sample = Sample(output, source, prepared.mask, item.source_prompt, prepared.request.target_prompt,
                    item.instruction, truth, key=item.image_id, edit_type=item.edit_type)
    row.update(metrics.score([sample])[0])
    row["note"] = "; ".join(n for n in [*notes, *failure_notes(sample.failures)] if n)
    return Outcome(row, prepared.image, result.edited)


def failed_item(row: dict[str, Any], err: Exception) -> Outcome:
    """``err`` as the row's ``error``."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        row["error"] = f"out of GPU memory: {err}. Try precision=fp16, offload=model or offload=sequential"
        log.warning("item %s failed: %s", row["image_id"], row["error"])
    else:
        row["error"] = f"{type(err).__name__}: {err}"
        log.warning("item %s failed: %s", row["image_id"], row["error"], exc_info=err)
    return Outcome(row)


def process_items(task: str, items: list[PieBenchItem], dataset: PieBenchDataset, editor, metrics, seed: int,
                  inputs: Mapping[str, str] | None = None) -> list[Outcome]:
    """Run ``task`` on ``items`` as one batch and score each; any failure becomes its item's row's ``error``, a
    metric whose backbone failed for an item a line of its ``note``, and the others go on. ``inputs``: the items'
    `item_inputs` hashes by id, kept with their rows."""
    outcomes: dict[str, Outcome] = {}
    ready: list[Prepared] = []
    for item in items:
        row = {"image_id": item.image_id, "edit_type": item.edit_type, "error": "", "note": "",
               "inputs": (inputs or {}).get(item.image_id, "")}
        try:
            resolution = None if editor.native_size else editor.components.resolution
            ready.append(prepare_item(task, item, dataset, resolution, seed, row))
        except Exception as err:  # noqa: BLE001 - one bad item must not stop a sweep
            outcomes[item.image_id] = failed_item(row, err)
    for prepared, edited in zip(ready, run_editor(task, ready, editor) if ready else []):
        if isinstance(edited, Exception):
            outcomes[prepared.item.image_id] = failed_item(prepared.row, edited)
            continue
        try:
            outcomes[prepared.item.image_id] = score_item(task, prepared, *edited, dataset, metrics)
        except Exception as err:  # noqa: BLE001 - one bad item must not stop a sweep
            outcomes[prepared.item.image_id] = failed_item(prepared.row, err)
    return [outcomes[item.image_id] for item in items]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def set_scores(metrics, dataset: PieBenchDataset, frame: pd.DataFrame, output_dir: Path, images: bool,
               reference: str | None = None) -> dict[str, float]:
    """The metric set's set-level scores (FID) of the job's saved outputs against ``reference`` (a folder of
    images) or else the items' source images: for edits and reconstructions the images they came from, for
    generation the images whose captions they were made from. {} for metric sets without set-level scores, or when
    images are not saved."""
    if not metrics.set_columns or not images:
        return {}
    done = set(frame.loc[frame["error"] == "", "image_id"])
    outputs = [edited_image_path(output_dir, item) for item in dataset if item.image_id in done]
    if reference:
        folder = Path(reference)  # checked in _setup
        return metrics.finish(outputs, sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
    return metrics.finish(outputs, reference_images(dataset))


def reference_images(dataset: PieBenchDataset) -> list[Path]:
    """The items' own images that exist (captions without an image have none)."""
    references = set()
    for item in dataset:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if (path := dataset.image_file(item)).is_file():
                references.add(path)
    return sorted(references)


def model_for(model: dict[str, Any], editor: str) -> dict[str, Any]:
    """``model`` as ``editor`` runs on it: the model's ``variants`` entry of the editor's name updates the model's keys
    (the toy model's InstructPix2Pix UNet for instruct_pix2pix) or names another model config that replaces it (the
    toy flow teacher for the editors that need a flow model)."""
    model = dict(model)
    variant = (model.pop("variants", None) or {}).get(editor) or {}
    if isinstance(variant, str):  # its Hydra defaults (a default precision) are the configured model's to give
        return group_config("model", variant)
    return {**model, **variant}


def load_editor(cfg: DictConfig, device: str):
    """The configured model (`model_for` the editor) and editor."""
    model = model_for(OmegaConf.to_container(cfg.model, resolve=True), cfg.editor.name)
    return build_editor(OmegaConf.to_container(cfg.editor, resolve=True),
                        load_components(model, cfg.precision, cfg.offload, device))


def _setup_failure(err: Exception) -> RunError:
    log.debug("job setup failed", exc_info=True)
    return RunError(str(err).strip("'\""))


SETUP_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ModelLoadError, HubUnreachableError,
                RuntimeError)  # RuntimeError: a metric backbone that cannot be loaded (metrics.on_missing=error)


def load_dataset(cfg: DictConfig) -> ItemSet:
    """The configured dataset; a configuration or data problem becomes a `RunError`."""
    try:
        return build_dataset(cfg.dataset)
    except SETUP_ERRORS as err:
        raise _setup_failure(err) from err


TEXTS = {"prompts": "source and target captions", "instruction": "an editing instruction",
         "mask": "an edit mask"}  # what an item may hold, for `check_fits_dataset`'s messages
FIXES = {"prompts": "the PIE CLIP scores read the target caption: metrics=preservation scores the unedited part "
                    "without them (with dataset.masks), metrics=none scores nothing",
         "mask": "give dataset.masks=<folder of the benchmark's edit masks> and dataset.mask_polarity=..., or "
                 "metrics=none"}


def check_fits_dataset(cfg: DictConfig, dataset: ItemSet, metrics=None) -> None:
    """The editor (before its model loads), and the metrics when given, read only what the dataset's items hold:
    a caption editor or a CLIP score on an instruction benchmark (its items have no captions) would run on empty
    prompts and report a score of nothing."""
    from editlab.editors.base import EDITORS, _import_editor_modules

    _import_editor_modules()
    name, where = cfg.editor.name, f"dataset={cfg.dataset.name}"
    held = ", ".join(TEXTS[k] for k in TEXTS if k in dataset.provides) or "no text"
    if (cls := EDITORS.get(name)) and (lacking := cls.needs - dataset.provides):
        fit = sorted(other for other, klass in EDITORS.items() if klass.needs <= dataset.provides)
        raise ValueError(f"editor {name} reads {', '.join(TEXTS[k] for k in sorted(lacking))}, which the items of "
                         f"{where} do not have (they hold {held}); editors that run on it: {', '.join(fit)}")
    if metrics is not None and (lacking := sorted(metrics.needs & TEXTS.keys() - dataset.provides)):
        fixes = "; ".join(FIXES.get(k, "choose another metric set") for k in lacking)
        raise ValueError(f"the metrics need {', '.join(TEXTS[k] for k in lacking)}, which the items of {where} do "
                         f"not have: {fixes}")


def _setup(cfg: DictConfig, dataset: ItemSet, job_num: int | None):
    """Editor (parameters validated) and metrics; a configuration or data problem becomes a `RunError` before the
    first item is edited."""
    try:
        check_fits_dataset(cfg, dataset)
        # no code runs from a weights file: load_components, build_editor and build_metrics load safely themselves
        editor = load_editor(cfg, job_device(cfg.device, job_num))
        metrics = with_ground_truth(build_metrics(OmegaConf.to_container(cfg.metrics, resolve=True),
                                                  editor.components.device))
        check_fits_dataset(cfg, dataset, metrics)
        task = task_name(cfg)
        if task not in editor.tasks:
            raise ValueError(f"editor {cfg.editor.name} does not do task={task} (it does: {', '.join(editor.tasks)}); "
                             f"editors that do: {', '.join(editors_for(task))}")
        if (reference := cfg.get("task", {}).get("reference")) and not Path(reference).is_dir():
            raise ValueError(f"task.reference={reference} is not a folder (of FID's reference images)")
        if task == "generation" and not reference and metrics.set_columns and cfg.save_images \
                and len(dataset) and not reference_images(dataset):
            raise ValueError(f"none of the {len(dataset)} items has an image to score FID against (dataset.images="
                             f"{cfg.dataset.get('images', cfg.dataset.get('root'))}): set the images' folder, or "
                             "task.reference=<folder of reference images>")
        if task == "generation" and "source" in metrics.needs:
            raise ValueError("task=generation has no source image for the PIE-Bench metrics: use metrics=icd_paper "
                             "(metrics=icd_paper_toy on the toy world)")
    except SETUP_ERRORS as err:
        raise _setup_failure(err) from err
    if editor.components.device.type == "cpu" and cfg.precision.name != "fp32":
        log.warning("precision=%s on CPU: half-precision kernels are emulated there and run several times slower "
                    "than fp32 (precision=fp32 is the CPU's setting)", cfg.precision.name)
    return editor, metrics




def batch_size(cfg: DictConfig) -> int:
    """``batch_size``: how many items each editor call edits (1: one at a time), a whole number >= 1."""
    size = cfg.get("batch_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RunError(f"batch_size={size!r}: give a whole number of items >= 1 to edit per editor call (1: one "
                       "at a time)")
    return size


def task_name(cfg: DictConfig) -> str:
    task = cfg.get("task", {}).get("name", "edit")
    if task not in TASKS:
        raise ValueError(f"unknown task.name={task!r}; expected one of {', '.join(TASKS)}")
    return task


def editors_for(task: str) -> list[str]:
    from editlab.editors.base import EDITORS, _import_editor_modules

    _import_editor_modules()
    return sorted(name for name, cls in EDITORS.items() if task in cls.tasks)


def job_device(device: str, job_num: int | None = None) -> str:
    """``device=auto`` with several visible GPUs: the launcher's local rank (``LOCAL_RANK``, ``SLURM_LOCALID``),
    else the sweep job's number, modulo the GPU count, so parallel jobs of one machine spread over its GPUs
    (``CUDA_VISIBLE_DEVICES`` decides which ones torch sees). Anything else is returned as given."""
    count = torch.cuda.device_count() if device == "auto" and torch.cuda.is_available() else 0
    if count < 2:
        return device
    slot = next((int(os.environ[k]) for k in ("LOCAL_RANK", "SLURM_LOCALID") if os.environ.get(k, "").isdigit()),
                job_num or 0)
    return f"cuda:{slot % count}"


def check_given(cfg: DictConfig, output_dir: Path | None = None) -> None:
    """Every setting the job reads is given: a `RunError` naming the first that is not (a key that refers to a
    ``???``, e.g. an adapter file a paper experiment needs: ``paper.adapters.G.forward``). A new ``output_dir``
    then gets a stub job.json (`record_stopped_job`)."""
    try:
        OmegaConf.to_container(cfg, resolve=True)  # the "???" a job does not use stay unresolved
    except (MissingMandatoryValue, InterpolationToMissingValueError) as err:
        key = str(err).split("Missing mandatory value: ", 1)[-1].splitlines()[0].strip()
        if output_dir is not None:
            record_stopped_job(cfg, output_dir)
        raise RunError(f"{key} is not set: give it on the command line ({key}=...); the experiment's comment says "
                       "what it is") from None


def run(cfg: DictConfig, output_dir: Path, group: str, run_name: str = "default", job_name: str | None = None,
        job_num: int | None = None) -> pd.DataFrame:
    """Run the configured editor over the configured dataset; returns the summary table.

    ``run_name`` labels the rows (the job's overrides), so the results of a sweep stay apart when concatenated;
    ``job_name`` names the W&B run; ``job_num`` (a sweep's job number) spreads parallel jobs over the GPUs and
    keeps the console short (the per-type table goes to the job's log file).
    """
    quiet_libraries(cfg.get("quiet", True))
    check_outside_dataset(output_dir, dataset_root(cfg.dataset))
    check_output_folder(output_dir)
    check_writable(output_dir)
    with hold_folder(output_dir):
        return _run_locked(cfg, output_dir, group, run_name, job_name, job_num)


def _run_locked(cfg: DictConfig, output_dir: Path, group: str, run_name: str, job_name: str | None,
                job_num: int | None) -> pd.DataFrame:
    check_given(cfg, output_dir)
    size = batch_size(cfg)
    dataset = load_dataset(cfg)
    check_outside_dataset(output_dir, dataset.root)  # also where the config names no root (iCD CSVs' own folder)
    task = task_name(cfg)
    inputs = inputs_of(dataset, task)
    check_inputs(cfg, output_dir, inputs)
    job = record_job(cfg, output_dir, check_job(cfg, output_dir), cfg.logger.get("group") or group,
                     dataset.provenance)
    with RunLogger(cfg, output_dir, group, job["wandb_id"], job_name) as logger, contextlib.ExitStack() as cleanup:
        editor, metrics = _setup(cfg, dataset, job_num)  # a setup error is the W&B run's error too
        cleanup.callback(editor.close)  # the shared models as the editor found them
        results = ResultsFile(output_dir / "results.csv", result_columns(metrics.columns))
        model = editor.components.name  # the model the editor runs on (a variant may name another than cfg.model)
        logger.set_model(model)
        run_info = {"run": run_name, "editor": cfg.editor.name, "model": model, "precision": cfg.precision.name}
        previous = results.read()
        done = finished_items(previous, dataset, output_dir, cfg.save_images, inputs)
        logger.log_history(previous[previous["image_id"].isin(done)])
        todo = [item for item in dataset if item.image_id not in done]
        if len(todo) < len(dataset):
            log.info("resuming: %d of %d items already done in %s", len(dataset) - len(todo), len(dataset), output_dir)
        if cfg.warmup and todo:  # untimed: the first calls pay for kernel selection and allocation (batch shape too)
            process_items(task, todo[:size], dataset, editor, metrics, cfg.seed)
        label = f"{cfg.editor.name} on {model}/{cfg.precision.name}"
        unit = {"edit": "edit", "inversion": "inversion", "generation": "image"}[task]
        with tqdm(total=len(todo), desc=label, unit=unit, leave=job_num is None, dynamic_ncols=True) as progress:
            for batch in (todo[k:k + size] for k in range(0, len(todo), size)):
                outcomes = process_items(task, batch, dataset, editor, metrics, cfg.seed, inputs)
                for item, outcome in zip(batch, outcomes):  # each row as soon as its batch is done
                    outcome.row.update(run_info)
                    with disk_errors(output_dir):
                        if outcome.edited is not None and cfg.save_images:
                            save_image_atomic(outcome.edited, edited_image_path(output_dir, item))
                            if source := dataset.source_beside_edit(output_dir, item):  # the source it saw
                                save_image_atomic(outcome.source, source)
                        results.append(outcome.row)  # the commit point: the image, when saved, is already on disk
                    logger.log_item(outcome.row)
                    progress.update()

        frame = results.read()
        summary = summarize(frame)
        try:
            scores = set_scores(metrics, dataset, frame, output_dir, cfg.save_images,
                                cfg.get("task", {}).get("reference"))
        except Exception as err:  # noqa: BLE001 - the rows are on disk; a set metric must not cost the summary
            log.error("the set-level metrics failed (%s: %s); the per-item results are complete", type(err).__name__,
                      err, exc_info=log.isEnabledFor(logging.DEBUG))
            scores = {}
        with disk_errors(output_dir):
            if scores:
                write_json(output_dir / "set_metrics.json", scores)
                for key, value in scores.items():
                    summary.loc[summary["edit_type"] == "all", key] = value
            atomic_write(output_dir / "summary.csv", lambda f: summary.to_csv(f, index=False))
        failed = int((frame["error"] != "").sum())
        log.info("%s | %s | %s | %s: %d done, %d failed | %s", cfg.editor.name, model, cfg.precision.name,
                 task, len(frame) - failed, failed, output_dir)
        notes = []
        if unavailable := [*metrics.unavailable, *metrics.set_unavailable]:
            notes.append(f"unavailable metrics (no backbone): {', '.join(unavailable)}")
        if gaps := metric_gaps(frame, metrics.columns):
            log.warning("a metric failed for some items and is left out of their means (the row's note says why): "
                        "%s", ", ".join(f"{key} for {n}" for key, n in gaps.items()))
        if cfg.metrics.get("label"):
            notes.append(f"metric backbones: {cfg.metrics.label} (not comparable with the reference backbones' "
                         "numbers)")
        table = "\n".join([*notes, format_summary(summary)])
        (details() if job_num is not None else log).info("%s", table)  # a sweep's report prints the headlines
        logger.log_summary(frame, summary, output_dir, dataset)
        if len(frame) and failed == len(frame):
            raise RunError(f"every item failed ({failed} of {len(frame)}; the first: {frame['error'].iloc[0]}); "
                           f"see {output_dir / 'results.csv'}")
    return summary


def objective(summary: pd.DataFrame) -> float:
    """A scalar for Hydra sweepers: the overall CLIP-whole mean when available, else NaN."""
    rows = summary[summary["edit_type"] == "all"]
    if rows.empty or "clip_whole" not in rows:
        return math.nan
    return float(rows["clip_whole"].iloc[0])
