"""Summarise every results.csv under a folder (a multirun sweep, sharded jobs, a benchmark) in one table.

    python -m editlab.evaluation.aggregate multirun/2026-11-23/10-00-00 [--out summary.csv] [--data <benchmark root>]

Jobs are told apart by the ``run`` column (their overrides, shard keys excluded, so the shards of one configuration
summarise together); rows of the same item in the same run (overlapping shards, retried jobs) keep the latest.
Prints the headline table (the unedited baseline first), the cost table (seconds per edit, UNet evaluations, peak
memory) and the full summary, and redraws ``comparison.png``. Every ``run.py -m`` sweep ends with the same report
(`SweepReport`, a Hydra callback, which also shows the sweep's progress): one line per run with the headline metrics
and costs, the jobs that failed and why (the sweep then exits with status 1), and ``comparison.png``: source, ground
truth where the dataset has one and each run's edit, labelled with the prompts, edit types and metrics. A sweep
whose jobs match a paper's table (`evaluation.tables`: published.yaml's layouts) also gets that table, our numbers
beside the published ones, printed and written next to report.txt with its plots. With W&B on, the sweep gets a run
of its own in ``<sweep>/wandb`` holding the report's tables, the grid and the plots (`log_sweep_run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import pandas as pd
from diffusers.utils import make_image_grid
from hydra.experimental.callback import Callback
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from editlab.evaluation.files import atomic_write, atomic_write_text, current
from editlab.evaluation.metrics import PieBenchMetrics
from editlab.evaluation.piebench import EDIT_TYPES, strip_brackets
from editlab.evaluation.protocol import Metric
from editlab.evaluation.summary import COLUMNS, RUN_COLUMNS, SHIPPED, format_summary, read_results, summarize
from editlab.evaluation.table_plots import log_to_wandb
from editlab.evaluation.toyset import dataset_root

log = logging.getLogger(__name__)

COST_VIEW = (*RUN_COLUMNS, "n", "seconds", "nfe", "backward_passes", "peak_mem_mb")
BASELINE = "identity"  # the unedited source: the reference of clip_gain, listed first


def _headlined(metric: type[Metric]) -> list[str]:
    """The summary names of a shipped metric set's headline columns, in its order."""
    return [COLUMNS[column].summary_name for column in metric.headline]


def _headline_view() -> tuple[str, ...]:
    """The run, its items, each shipped metric set's headline columns with the CLIP gain over the unedited baseline
    beside the whole-image CLIP score, then the costs."""
    shown = [name for metric in SHIPPED for name in _headlined(metric)]
    shown.insert(shown.index("clip_whole") + 1, "clip_gain")
    return (*RUN_COLUMNS, "n", *shown, "seconds", "nfe")


HEADLINE_VIEW = _headline_view()
# Left out of the headline when no run has a number (no true edits: no gt_*; no source image, as in generation, or no
# backbone: no column of the iCD suite's). PIE-Bench's stay: NaN there says a backbone was off (metrics=toy: LPIPS).
LEFT_OUT_EMPTY = [name for metric in SHIPPED if metric is not PieBenchMetrics for name in _headlined(metric)]


def collect(folder: Path) -> pd.DataFrame:
    files = current(folder.rglob("results.csv"))
    if not files:
        raise FileNotFoundError(f"no results.csv under {folder}")
    results = pd.concat([read_results(f) for f in files], ignore_index=True)
    keys = [c for c in RUN_COLUMNS if c in results]
    return results.drop_duplicates([*keys, "image_id"], keep="last").reset_index(drop=True)


def job_errors(folder: Path) -> dict[str, str]:
    """{job folder name: its error} for the jobs of a sweep that failed as a whole (run.py writes job_error.txt)."""
    return {f.parent.name: f.read_text().strip() for f in current(folder.rglob("job_error.txt"))}


def headline(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per run (the ``all`` rows), the unedited baseline first, with the CLIP gain over it."""
    overall = summary[summary["edit_type"] == "all"].copy()
    if "editor" in overall:
        overall = overall.sort_values("editor", key=lambda e: e != BASELINE, kind="stable")
        baseline = overall.loc[overall["editor"] == BASELINE, "clip_whole"] if "clip_whole" in overall else []
        if len(baseline) == 1:
            overall.insert(overall.columns.get_loc("clip_whole") + 1, "clip_gain",
                           overall["clip_whole"] - baseline.iloc[0])
    empty = [c for c in LEFT_OUT_EMPTY if c in overall and overall[c].isna().all()]
    return overall[[c for c in HEADLINE_VIEW if c in overall and c not in empty]]


# ------------------------------------------------------------------------------------------------ comparison grid
TILE_MIN, TILE_MAX, CAPTION, HEADER, SIDEBAR, MIN_FONT = 128, 256, 44, 34, 230, 7
GRID_METRICS = (  # caption label, results column, its legend: PIE-Bench's metrics, then the iCD paper's
    ("CLIP", "clip_similarity_target_image", "CLIP score of the edit and the target prompt"),
    ("bg PSNR", "psnr_unedit_part", "PSNR of the unedited part against the source (dB)"),
    ("GT PSNR", "gt_psnr", "PSNR against the ground-truth edit (dB)"),
    ("CLIP-T", "clip_t", "CLIP score of the image and its prompt"),
    ("DINOv2", "dinov2", "DINOv2 similarity to the source"),
    ("PSNR", "psnr_uint8", "PSNR against the source, 8-bit (dB)"),
)
BREAKS = " _/,="  # where a line of grid text may end: names never split mid-word


def _font(size: int = 11) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` in lines at most ``width`` pixels wide, broken only after one of `BREAKS` (a word wider than
    ``width`` stays whole on a line of its own)."""
    lines = [""]
    for piece in re.findall(f"[^{BREAKS}]*[{BREAKS}]*", text)[:-1] or [""]:
        if lines[-1] and font.getlength((lines[-1] + piece).rstrip()) > width:
            lines.append("")
        lines[-1] += piece
    return [line.rstrip() for line in lines]


def _text_cell(lines: list[str], width: int, height: int, size: int = 11) -> Image.Image:
    """``lines`` wrapped into a white ``width`` × ``height`` cell, the font shrunk (down to MIN_FONT) until every
    line fits; what still does not fit is cut at the bottom."""
    for size in range(size, MIN_FONT - 1, -1):
        font = _font(size)
        wrapped = [part for line in lines for part in wrap(line, font, width - 6)]
        if len(wrapped) * (size + 3) <= height - 2 and max(map(font.getlength, wrapped), default=0) <= width - 6:
            break
    cell = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(cell)
    for k, line in enumerate(wrapped[: max(1, (height - 2) // (size + 3))]):
        draw.text((3, 2 + k * (size + 3)), line, fill="black", font=font)
    return cell


def _tile(path: Path | None, side: int) -> Image.Image:
    """The image at ``path`` as a ``side``² tile; gray for a failed, missing or unreadable one."""
    gray = Image.new("RGB", (side, side), (128, 128, 128))
    if path is None:
        return gray
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
    except (OSError, ValueError):
        return gray


def _image_side(paths) -> int:
    """The width of the first readable image among ``paths`` (TILE_MIN when none is)."""
    for path in paths:
        try:
            with Image.open(path) as image:
                return image.width
        except (OSError, ValueError):
            continue
    return TILE_MIN


def _shown(row: dict | None) -> list[tuple[str, float]]:
    """(label, value) of each metric of `GRID_METRICS` that a successful row has."""
    if row is None or row.get("error"):
        return []
    return [(label, row[key]) for label, key, _ in GRID_METRICS
            if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]


def caption(row: dict | None) -> list[str]:
    """The lines under a run's tile: one per metric the row has (``CLIP: 90.6``), or why there is no edit."""
    if row is None:
        return ["not edited"]
    if row.get("error"):
        return [f"failed: {row['error']}"]
    return [f"{label}: {value:.{2 if abs(value) < 2 else 1}f}" for label, value in _shown(row)]


def legend(rows: list[dict | None]) -> str:
    """The line above the grid that explains its columns and the metric labels that ``rows``' captions use."""
    used = {label for row in rows for label, _ in _shown(row)}
    return "; ".join(["columns: source, ground truth, each run's edit (gray: failed or not edited)",
                      *(f"{label}: {meaning}" for label, _, meaning in GRID_METRICS if label in used)])


def _runs(folder: Path) -> dict[str, list[Path]]:
    """{column label: the job folders of one run}: the shards of a configuration share a run label (one column);
    the label is the editor, or the run's overrides where editors repeat (a precision sweep of one editor)."""
    by_run: dict[str, list[Path]] = {}
    editor_of: dict[str, str] = {}
    for job in current(p.parent for p in folder.rglob("results.csv")):
        rows = read_results(job / "results.csv")
        if rows.empty:
            continue
        run = str(rows["run"].iloc[0])
        by_run.setdefault(run, []).append(job)
        editor_of[run] = str(rows["editor"].iloc[0])
    names = list(editor_of.values())
    labels = {run: editor if names.count(editor) == 1 else run for run, editor in editor_of.items()}
    order = sorted(by_run, key=lambda run: (editor_of[run] != BASELINE, labels[run]))
    return {labels[run]: by_run[run] for run in order}


def _tasks(jobs: list[Path]) -> set[str]:
    """The tasks (edit, inversion, generation) the job folders ran, as their job.json records them."""
    tasks = set()
    for job in jobs:
        try:
            tasks.add(json.loads((job / "job.json").read_text())["config"].get("task.name", "edit"))
        except (OSError, ValueError, KeyError, TypeError):
            tasks.add("edit")
    return tasks


def _recorded(folder: Path, key: str):
    """The first ``key`` that the job.json of a job under ``folder`` records (None when none does)."""
    for job in current(folder.rglob("job.json")):
        try:
            if value := json.loads(job.read_text()).get(key):
                return value
        except (OSError, ValueError, AttributeError):
            continue
    return None


def find_dataset_root(folder: Path) -> Path | None:
    """The benchmark a sweep edited, as its jobs recorded it (``job.json``)."""
    root = _recorded(folder, "dataset_root")
    return Path(root) if root else None


def comparison_grid(folder: Path, dataset_root: Path | None = None, max_items: int = 10) -> Path | None:
    """``<folder>/comparison.png``: a legend, then one row per edited item (at most ``max_items``, one per edit type
    first) with its id, edit type and prompts; columns: source, ground truth (if the dataset has one), then each
    run's edit (shards merged; gray where it failed), captioned with its CLIP score, unedited-part PSNR and
    ground-truth PSNR (or the iCD metrics), which the legend explains. A sweep of reconstructions or generations
    shows the source prompt and no ground truth. None when no job edited anything or the dataset's mapping file is
    unreadable."""
    root = dataset_root or find_dataset_root(folder)
    try:
        mapping = json.loads((Path(root) / "mapping_file.json").read_text())
    except (OSError, TypeError, ValueError):
        return None
    runs = _runs(folder)
    rows: dict[str, dict[str, dict]] = {label: {} for label in runs}
    for label, jobs in runs.items():
        for job in jobs:
            for row in read_results(job / "results.csv").to_dict("records"):
                rows[label][row["image_id"]] = {**row, "job": job}
    edited = sorted({i for per_run in rows.values() for i in per_run} & set(mapping))
    if not edited:
        return None
    by_type: dict[str, str] = {}
    for image_id in edited:
        by_type.setdefault(str(mapping[image_id]["editing_type_id"]), image_id)
    ids = (sorted(by_type.values()) + [i for i in edited if i not in by_type.values()])[:max_items]

    root = Path(root)
    side = _image_side(root / "annotation_images" / mapping[i]["image_path"] for i in ids)
    side = min(TILE_MAX, side * max(1, math.ceil(TILE_MIN / side)))
    edits = _tasks([job for jobs in runs.values() for job in jobs]) <= {"edit"}  # else reconstructions, generations
    has_truth = edits and (root / "ground_truth").is_dir()
    columns = ["source", *(["ground truth"] if has_truth else []), *runs]
    cells, shown = [], []
    for image_id in ids:
        entry = mapping[image_id]
        stem = Path(entry["image_path"]).with_suffix(".png")
        tiles = [(_tile(root / "annotation_images" / entry["image_path"], side), [])]
        if has_truth:
            tiles.append((_tile(root / "ground_truth" / entry["image_path"], side), []))
        for label in runs:
            row = rows[label].get(image_id)
            edit = row["job"] / "annotation_images" / stem if row and not row["error"] else None
            tiles.append((_tile(edit, side), caption(row)))
            shown.append(row)
        for tile, lines in tiles:
            cell = Image.new("RGB", (side, side + CAPTION), "white")
            cell.paste(tile)
            cell.paste(_text_cell(lines, side, CAPTION, 10), (0, side))
            cells.append(cell)
    grid = make_image_grid(cells, rows=len(ids), cols=len(columns))

    width = SIDEBAR + grid.width
    key = legend(shown)
    top = len(wrap(key, _font(), width - 6)) * 14 + 6
    canvas = Image.new("RGB", (width, top + HEADER + grid.height), "white")
    canvas.paste(_text_cell([key], width, top), (0, 0))
    canvas.paste(grid, (SIDEBAR, top + HEADER))
    for k, label in enumerate(columns):
        canvas.paste(_text_cell([label], side, HEADER, 12), (SIDEBAR + k * side, top))
    for k, image_id in enumerate(ids):
        entry = mapping[image_id]
        type_id = str(entry["editing_type_id"])
        lines = [f"{image_id} · type {type_id} {EDIT_TYPES.get(type_id, '')}".strip(),
                 *([f"source: {entry['original_prompt']}", f"target: {entry['editing_prompt']}"] if edits else
                   [f"prompt: {strip_brackets(entry['original_prompt'])}"])]
        canvas.paste(_text_cell(lines, SIDEBAR, side + CAPTION), (0, top + HEADER + k * (side + CAPTION)))
    out = folder / "comparison.png"
    atomic_write(out, lambda f: canvas.save(f, format="PNG"), "wb")
    return out


# ------------------------------------------------------------------------------------------------ report
def paper_tables(folder: Path) -> tuple[str, dict[str, pd.DataFrame], list[Path]]:
    """The papers' tables (`evaluation.tables.sweep_tables`) that the sweep's jobs match, with the published numbers
    beside ours, written next to report.txt with their plots: the printed text, the tables for W&B and the plots;
    nothing when none matches, or when laying them out failed (logged: the report stands without them)."""
    try:
        from editlab.evaluation.tables import sweep_tables

        return sweep_tables(folder)
    except Exception:  # noqa: BLE001 - the headline table is already written; a layout problem must not lose it
        log.exception("the paper tables of %s failed; the report is in %s", folder, folder / "report.txt")
        return "", {}, []


def sync_command(folder: Path) -> str:
    """The ``wandb sync`` that uploads every run of a sweep: the sweep's own and its jobs' (not their superseded
    attempts, which sit outside ``offline-run-*``)."""
    return f"wandb sync {folder}/wandb/offline-run-* {folder}/*/wandb/offline-run-*"


def log_sweep_run(folder: Path, wandb: dict, summary: pd.DataFrame | None, paper: dict[str, pd.DataFrame],
                  images: list[Path]) -> str:
    """The sweep's own W&B run, in ``<folder>/wandb`` and the jobs' group: the headline and summary tables, the
    papers' tables, comparison.png and the plots. Returns the report's line about it ("" when logging failed,
    logged: the report stands without it)."""
    group = _recorded(folder, "wandb_group") or folder.name
    tables = {**({"report/headline": headline(summary), "report/summary": summary} if summary is not None else {}),
              **{f"tables/{layout}": table for layout, table in paper.items()}}
    try:
        run = log_to_wandb(tables, {f"images/{image.stem}": image for image in images}, folder, group,
                           f"sweep {group}", "sweep", **wandb)
    except Exception:  # noqa: BLE001 - the report's files are written; W&B must not lose them
        log.exception("the sweep's W&B run failed; the report is in %s", folder / "report.txt")
        return ""
    return f"W&B: the sweep's run {run} (group {group!r}); upload every run of the sweep: {sync_command(folder)}"


def report(folder: Path, dataset_root: Path | None = None, notes: list[str] = (),
           wandb: dict | None = None) -> pd.DataFrame | None:
    """Print a sweep's headline table (one line per run), its failed jobs and ``notes`` (the sweep config's
    ``sweep_notes``), then the papers' tables its jobs match (`paper_tables`) and comparison.png, keeping it all in
    ``report.txt``; write aggregate_summary.csv; with ``wandb`` (the sweep's logger settings) log the sweep's own
    W&B run (`log_sweep_run`). Every file is replaced whole (a kill leaves the old one or the new one). Returns the
    summary (None when no job wrote results)."""
    errors = job_errors(folder)
    try:
        results = collect(folder)
    except FileNotFoundError:
        results = None
    summary, lines = None, []

    def say(*new: str) -> None:  # report.txt is rewritten at each step: a later step that fails loses no table
        lines.extend(new)
        print("\n" + "\n".join(new))
        atomic_write_text(folder / "report.txt", "\n".join(lines) + "\n")

    if results is not None:
        summary = summarize(results)
        atomic_write(folder / "aggregate_summary.csv", lambda f: summary.to_csv(f, index=False))
    say(*([f"sweep {folder}: {len(results)} items ({int((results['error'] != '').sum())} failed)",
           format_summary(headline(summary))] if results is not None else []),
        *(f"job {job} did not run: {error}" for job, error in errors.items()), *notes)
    text, tables, plots = paper_tables(folder)
    if text:
        say("", text)
    grid = comparison_grid(folder, dataset_root)
    if grid is not None:
        say(f"comparison grid: {grid}")
    if wandb and (line := log_sweep_run(folder, wandb, summary, tables, [*([grid] if grid else []), *plots])):
        say(line)
    return summary


def _count_jobs(config) -> int:
    """How many jobs the sweep's overrides (command line and ``hydra.sweeper.params``) expand to; as Hydra's sweeper
    does, a key on the command line replaces the same key of the params (``run.py editor=npi,ddim`` over the tour)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = config.hydra.sweeper.get("params") or {}
    by_key = {o.key_or_group: o for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()])}
    by_key |= {o.key_or_group: o for o in parser.parse_overrides(list(config.hydra.overrides.task))}
    count = 1
    for override in by_key.values():
        if override.is_sweep_override():
            count *= len(list(override.sweep_string_iterator()))
    return count


class SweepReport(Callback):
    """Hydra callback: a progress bar over the sweep's jobs, then `report` on the sweep folder; a sweep in which
    a job failed as a whole exits with status 1 after the report."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.total: int | None = None

    def __getstate__(self) -> dict:
        # launchers that run the jobs in processes of their own (submitit, joblib) pickle the callbacks with them;
        # the bar stays with the sweep (a pickled tqdm recurses without end when loaded)
        return {**self.__dict__, "bar": None}

    def on_multirun_start(self, config, **kwargs) -> None:
        # resolved now, before the launcher makes the jobs' configs (which copy this config's resolver cache): every
        # job's W&B group then carries the sweep's start, also where hydra.sweep.dir names no time
        str(config.get("started"))
        try:
            total = _count_jobs(config)
        except Exception:  # noqa: BLE001 - an unusual sweeper: no total, the bar still counts
            total = None
        self.total = total
        self.bar = tqdm(total=total, desc="sweep", unit="job", file=sys.stdout, dynamic_ncols=True)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update()

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.bar is not None:
            self.bar.close()
        folder = Path(config.hydra.sweep.dir)
        if not folder.is_dir():
            return
        try:
            logger = config.get("logger") or {}
            wandb = {k: logger.get(k) for k in ("mode", "project", "entity")} \
                if logger.get("name") == "wandb" and logger.get("mode") != "disabled" else None
            report(folder, dataset_root(config.dataset) if config.get("dataset") else None,
                   list(config.get("sweep_notes") or []), wandb)
        except Exception:  # noqa: BLE001 - the jobs' results are already on disk; a report failure must not hide them
            log.exception("the sweep report failed; the results are in %s", folder)
        problems = []
        if failed := job_errors(folder):
            problems.append(f"{len(failed)} job(s) of the sweep failed: {', '.join(failed)} (see above)")
        reported = {p.parent for name in ("results.csv", "job_error.txt") for p in current(folder.rglob(name))}
        if self.total is not None and len(reported) < self.total:
            problems.append(f"{self.total - len(reported)} of the sweep's {self.total} jobs left neither results nor "
                            f"an error in {folder} (killed, or written elsewhere; see the jobs' logs)")
        if problems:
            sys.exit("; ".join(problems))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m editlab.evaluation.aggregate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, help="summary CSV (default: <folder>/aggregate_summary.csv)")
    parser.add_argument("--data", type=Path, help="benchmark root for comparison.png (default: as the jobs recorded)")
    parser.add_argument("--max-items", type=int, default=10, help="rows of comparison.png")
    args = parser.parse_args(argv)
    results = collect(args.folder)
    summary = summarize(results)
    atomic_write(args.out or args.folder / "aggregate_summary.csv", lambda f: summary.to_csv(f, index=False))
    failed = int((results["error"] != "").sum())
    print(f"{len(results)} items ({failed} failed) from {args.folder}\n")
    print(format_summary(headline(summary)))
    print()
    overall = summary[summary["edit_type"] == "all"]
    print(format_summary(overall[[c for c in COST_VIEW if c in overall]]))
    print()
    print(format_summary(summary))
    grid = comparison_grid(args.folder, args.data, args.max_items)
    print(f"\ncomparison grid: {grid}" if grid else "\nno comparison grid (no edits, or no readable mapping file)")
    return summary


def cli() -> None:
    """The ``editlab-aggregate`` command (its exit status is 0 unless aggregating stopped)."""
    main()


if __name__ == "__main__":
    cli()
