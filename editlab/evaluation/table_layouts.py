"""Which jobs fill which rows of the papers' tables: layouts, job folders, matching, each row's numbers.

A layout (``evaluation/published.yaml``: one per paper table, with its source) lists the paper's rows in the
paper's order and the columns it prints, with the published numbers. Each job folder under the DIRs (``job.json``,
``results.csv``, optional ``set_metrics.json``, ``job_error.txt`` when the whole job failed; nested anywhere, as in
a Hydra multirun; results moved aside into ``superseded_*`` folders are skipped) is matched to rows:

- only jobs of the layout's task (``task.name`` in job.json's config, absent = edit) and, where the layout names
  one, of its metric set (``metrics.kind``, absent = piebench) are considered;
- a job fills a row when its ``paper_row`` is the row's id (or one of the row's ``aliases``), or when every dotted
  key of the row's ``match`` equals the job's config value (e.g. ``editor.name: ddim_p2p``); published-only rows
  (baselines editlab does not have) are never filled;
- the job folders of one configuration (shards; the same job.json config and paper_row) are merged, the latest row
  per item kept; when several configurations fill a row, the latest (job.json's modification time) is shown and a
  note names the others. A row no job fills is "not run"; one whose job failed as a whole is "failed";
- our numbers are `evaluation.summary.summarize`'s overall means (paper scales, failed items left out), set-level
  metrics (``fid``) come from set_metrics.json, ``peak_mem_gb`` is the largest per-item peak, and a layout with a
  reference row (fast_editing) scores every row's saved edits against the reference's (`compare_edits`).

`matching_layouts` (``--layout auto`` of `evaluation.tables`, the default) picks every layout that one of the sweeps
matches (a sweep: the jobs of one folder holding Hydra's multirun.yaml, else of one parent folder): every job of the
sweep of the layout's task and metric set fills one of its rows, and at least two rows are filled by their own id or
match (one for a layout with a single row that can be run; aliases do not count: a Table 2 sweep fills two rows of
Table 5 without being a Table 5 sweep). So the paper sweeps (conf/experiment/paper/*, one sweep per table) each pick
their table, a sweep with jobs no row names (the toy tour's ``identity`` baseline, iCD in a PIE-Bench sweep) picks
none, and several sweeps given together pick each one's table, the tables then drawing on every job given (the
fast-editing sweep with its separately run reference). ``--layout <id>`` lays out any layout.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import yaml

from editlab.evaluation.files import current
from editlab.evaluation.judge.protocols import protocol
from editlab.evaluation.summary import read_results, summarize

log = logging.getLogger(__name__)

LAYOUTS_FILE = Path(__file__).with_name("published.yaml")
JOB_FILES = ("job.json", "results.csv", "job_error.txt")
NOT_RUN, FAILED, PUBLISHED_ONLY, OK = "not run", "failed", "not run (not in editlab)", "ok"


# ------------------------------------------------------------------------------------------------ layouts
def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[str, dict]:
    layouts = yaml.safe_load(Path(path).read_text())
    for layout_id, layout in layouts.items():
        keys = [c["key"] for c in layout.get("columns", ())]
        ids = [r.get("id") for r in layout.get("rows", ())]
        problems = [f"{what} missing" for what in ("title", "source", "task", "columns", "rows")
                    if not layout.get(what)]
        problems += [f"row {r.get('id')!r} has no id or label" for r in layout.get("rows", ())
                     if not r.get("id") or not r.get("label")]
        problems += [f"row ids repeat: {ids}"] if len(set(ids)) != len(ids) else []
        problems += [f"row {r['id']}: published {k!r} is not a number under a declared column"
                     for r in layout.get("rows", ()) for k, v in (r.get("published") or {}).items()
                     if k not in keys or not is_number(v)]
        problems += [f"row {r['id']}: context {k!r} needs a value, a source, a declared column and no published number"
                     for r in layout.get("rows", ()) for k, v in (r.get("context") or {}).items()
                     if k not in keys or k in (r.get("published") or {}) or not is_number(v.get("value"))
                     or not v.get("source")]
        problems += [f"column {c['key']}: mean {c['mean']!r} needs mean: macro and `of`, the column it averages"
                     for c in layout.get("columns", ()) if "mean" in c and (c["mean"] != "macro" or not c.get("of"))]
        judge = layout.get("judge")
        if judge is not None and not (isinstance(judge, dict) and judge.get("label") and judge.get("ids")):
            problems.append("judge needs a label and ids (our judge ids that the published numbers compare with)")
        if layout.get("reference") and layout["reference"] not in ids:
            problems.append(f"reference row {layout['reference']!r} is not a row")
        if problems:
            raise ValueError(f"{path}: layout {layout_id}: {'; '.join(problems)}")
    return layouts


def load_layouts(path: Path = LAYOUTS_FILE) -> dict[str, dict]:
    """{layout id: layout} from published.yaml, checked (a ValueError names what is wrong)."""
    return _load(str(path), path.stat().st_mtime)


# ------------------------------------------------------------------------------------------------ jobs
@dataclass
class Job:
    """One job folder: its configuration (job.json's flattened dotted keys), results and set-level metrics."""

    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # the folder it was found under
    paper_row: str | None = None
    mtime: float = 0.0
    results: pd.DataFrame | None = None
    set_metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    wandb_group: str | None = None  # the W&B group of the job's run (job.json)
    posthoc_judge: str = ""  # the judge of a post-hoc judging pass over the job (judge_<benchmark>/judge.json)
    posthoc_judged: tuple[str, ...] = ()  # the benchmarks of those passes (gedit, imgedit)

    @property
    def task(self) -> str:
        return str(self.config.get("task.name") or "edit")

    @property
    def metrics_kinds(self) -> set[str]:
        """The kinds of its metric set, or of each of its ``metrics.sets`` (`evaluation.protocol`)."""
        sets = {key.split(".")[2] for key in self.config if key.startswith("metrics.sets.")}
        kinds = [self.config.get(f"metrics.sets.{name}.kind") for name in sets] or [self.config.get("metrics.kind")]
        return {str(kind or "piebench") for kind in kinds} | {f"{b}_judge" for b in self.posthoc_judged}

    @property
    def judge(self) -> str:
        """The judge that scored the job (a post-hoc pass's, else a judged metric set's backend: the served model's
        name, the local model's path, or the backend's name), or "" for a job without one."""
        if self.posthoc_judge:
            return self.posthoc_judge
        prefixes = ["metrics."] + sorted({".".join(key.split(".")[:3]) + "." for key in self.config
                                          if key.startswith("metrics.sets.")})
        for prefix in prefixes:
            if backend := self.config.get(f"{prefix}backend.name"):
                field = {"openai_compat": "model", "transformers": "path"}.get(str(backend))
                return str(self.config.get(f"{prefix}backend.{field}") if field else backend)
        return ""

    @property
    def metrics_label(self) -> str:
        return str(self.config.get("metrics.label") or "")

    @property
    def has_results(self) -> bool:
        return self.results is not None and not self.results.empty

    def config_key(self) -> str:
        return json.dumps([self.config, self.paper_row], sort_keys=True, default=str)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s cannot be read (%s): ignored", path, err)
        return {}
    return data if isinstance(data, dict) else {}




def with_judged_scores(results: pd.DataFrame, folder: Path) -> tuple[pd.DataFrame, str, tuple[str, ...]]:
    """``results`` with the scores of a post-hoc judging pass over the job (``editlab-judge``: ``judge_<benchmark>/
    judge_scores.csv``, matched by item key; they replace the columns of a judge run in the job), a failed judgement
    noted on its row as the in-run judge notes it; the judge's id (``judge.json``, "" without a pass) and the
    benchmarks judged."""
    judge, judged = "", []
    for benchmark in ("gedit", "imgedit"):
        noted = protocol(benchmark).scores  # the headline scores, whose failures are noted
        path = folder / f"judge_{benchmark}" / "judge_scores.csv"
        if not path.is_file():
            continue
        try:
            scores = pd.read_csv(path, dtype={"key": str, "status": str, "message": str}, keep_default_na=False,
                                 na_values={c: ["", "nan"] for c in noted})
        except (OSError, ValueError) as err:
            log.warning("%s cannot be read (%s): the job's judged scores are left out", path, err)
            continue
        scores = scores.drop_duplicates("key", keep="last").set_index("key")
        columns = [c for c in scores if c.startswith(f"{benchmark}_")]
        ids = results["image_id"].astype(str)
        for column in columns:
            results[column] = pd.to_numeric(ids.map(scores[column]), errors="coerce")
        failed = ids.map(scores["status"]).fillna("").ne("ok") & ids.isin(scores.index)
        why = ids.map(lambda key: f"{scores.at[key, 'status']}: {str(scores.at[key, 'message'])[:160]}"
                      if key in scores.index else "")
        notes = results["note"].fillna("").astype(str) if "note" in results else pd.Series("", results.index)
        for column in noted:
            missing = failed & results[column].isna()
            notes = notes.where(~missing, notes + "; " + column + " failed (judge " + why + "): left out of its mean")
        results["note"] = notes.str.lstrip("; ")
        judge = str(_read_json(path.with_name("judge.json")).get("judge") or "")
        judged.append(benchmark)
    return results, judge, tuple(judged)


def read_job(folder: Path, root: Path) -> Job:
    """The job in ``folder`` (found under ``root``, which names it), with the scores of a post-hoc judging pass."""
    meta = _read_json(folder / "job.json")
    results, judge, judged = None, "", ()
    if (folder / "results.csv").is_file():
        try:
            results, judge, judged = with_judged_scores(read_results(folder / "results.csv"), folder)
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s cannot be read (%s): the job counts as without results", folder / "results.csv", err)
    config = dict(meta.get("config") or {})
    if not config and results is not None and not results.empty:  # written before job.json held the config
        config = {f"{key}.name": str(results[key].iloc[0]) for key in ("editor", "model", "precision")
                  if key in results}
    set_metrics = {k: float(v) for k, v in _read_json(folder / "set_metrics.json").items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    error = (folder / "job_error.txt").read_text().strip() if (folder / "job_error.txt").is_file() else ""
    stamp = next((folder / n for n in JOB_FILES if (folder / n).is_file()), folder)
    paper_row = meta.get("paper_row")
    return Job(path=folder, name=str(folder.relative_to(root)) if folder != root else folder.name, config=config,
               paper_row=None if paper_row is None else str(paper_row), mtime=stamp.stat().st_mtime,
               results=results, set_metrics=set_metrics, error=error, root=root,
               wandb_group=meta.get("wandb_group"), posthoc_judge=judge, posthoc_judged=judged)


def find_jobs(folders: Iterable[Path | str]) -> list[Job]:
    """Every job folder under ``folders`` (one with a job.json, results.csv or job_error.txt), superseded results
    and W&B folders left out; a folder given twice (or inside another given) counts once."""
    jobs, seen = [], set()
    for root in map(Path, folders):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        marks = {p.parent for name in JOB_FILES for p in root.rglob(name)}
        for folder in current(marks):
            if "wandb" in folder.relative_to(root).parts or folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            jobs.append(read_job(folder, root))
    return jobs


# ------------------------------------------------------------------------------------------------ matching
_MISSING = object()


def _same(value: Any, expected: Any) -> bool:
    return value is not _MISSING and (value == expected or str(value) == str(expected))


def row_matches(row: dict, job: Job, aliases: bool = True) -> bool:
    """Whether ``job`` fills ``row``: its paper_row is the row's id (or, with ``aliases``, one of the row's
    aliases), or it has every ``match`` value."""
    if row.get("published_only"):
        return False
    if job.paper_row is not None and job.paper_row in {row["id"], *(row.get("aliases", ()) if aliases else ())}:
        return True
    match = row.get("match") or {}
    return bool(match) and all(_same(job.config.get(key, _MISSING), value) for key, value in match.items())


def _eligible(layout: dict, job: Job) -> bool:
    """A job of the layout's task and (where the layout names one) metric set, whose configuration is known."""
    wanted = layout.get("metrics")
    return bool(job.config) and job.task == layout["task"] and (wanted is None or wanted in job.metrics_kinds)


def sweep_of(job: Job) -> Path:
    """The sweep a job belongs to: the nearest folder above it (within the folder it was found under) that holds
    Hydra's multirun.yaml, else its parent folder."""
    root = job.root or job.path.parent
    for folder in job.path.parents:
        if folder != root and root not in folder.parents:  # above the folder given: not looked at
            break
        if (folder / "multirun.yaml").is_file():
            return folder
    return job.path.parent


def _fits(layout: dict, jobs: list[Job]) -> bool:
    pool = [job for job in jobs if _eligible(layout, job)]
    rows = [row for row in layout["rows"] if not row.get("published_only")]
    filled = [row for row in rows if any(row_matches(row, job, aliases=False) for job in pool)]
    strays = [job for job in pool if not any(row_matches(row, job) for row in rows)]
    return bool(rows) and len(filled) >= min(2, len(rows)) and not strays


def matching_layouts(jobs: list[Job]) -> list[str]:
    """The layouts ``auto`` lays out for ``jobs`` (the rule is in the module docstring), in published.yaml's
    order."""
    layouts = load_layouts()
    sweeps: dict[Path, list[Job]] = {}
    for job in jobs:
        sweeps.setdefault(sweep_of(job), []).append(job)
    picked = {layout_id for group in sweeps.values() for layout_id, layout in layouts.items() if _fits(layout, group)}
    return [layout_id for layout_id in layouts if layout_id in picked]


@dataclass
class RowResult:
    """A layout row and what filled it: the chosen configuration's job folders, its numbers, notes."""

    row: dict
    status: str = NOT_RUN
    jobs: list[Job] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)
    per_type: pd.DataFrame | None = None
    n: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def job_name(self) -> str:
        if not self.jobs:
            return ""
        more = f" (+{len(self.jobs) - 1} shards)" if len(self.jobs) > 1 else ""
        return f"{self.jobs[-1].name}{more}"


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _column_value(column: dict, overall: dict, per_type: pd.DataFrame, results: pd.DataFrame,
                  jobs: list[Job]) -> float:
    key = column["key"]
    if column.get("vs_reference"):
        return math.nan  # filled in by the reference pass
    if column.get("mean") == "macro":  # the unweighted mean of the edit types' means (GEdit's official overall),
        # which a type without one scored item leaves undefined, as GEdit's own average does
        means = pd.to_numeric(per_type.get(column["of"], pd.Series(dtype=float)), errors="coerce")
        return float(means.mean()) if len(means) and means.notna().all() else math.nan
    if key == "peak_mem_gb":
        peak = pd.to_numeric(results.get("peak_mem_mb", pd.Series(dtype=float)), errors="coerce")
        return float(peak.max() / 1024) if peak.notna().any() else math.nan
    if key in overall and overall[key] is not None:
        value = pd.to_numeric(overall[key], errors="coerce")
        return float(value) if pd.notna(value) else math.nan
    scored = [job for job in jobs if key in job.set_metrics]  # set-level metrics (fid)
    if len(scored) == 1:
        return scored[0].set_metrics[key]
    return math.nan  # none, or one per shard: a set metric of parts is not the whole set's (noted in _fill)


def _shared_notes(notes: Iterable[tuple[str, str]]) -> list[str]:
    """``(key, note)`` pairs as ``"key, key: note"`` lines, the keys of one note on one line, in first-seen order."""
    keys_by_note: dict[str, list[str]] = {}
    for key, note in notes:
        keys_by_note.setdefault(note, []).append(key)
    return [f"{', '.join(keys)}: {note}" for note, keys in keys_by_note.items()]


def _scored_notes(layout: dict, overall: dict, results: pd.DataFrame) -> list[str]:
    """For each metric a column shows that some items lack (a judge's failed reply, a backbone that failed: the
    row's note says why), how many of the items it was scored on, and the failures by status; metrics that share
    those counts share a note."""
    notes_text = results["note"].fillna("").astype(str) if "note" in results else pd.Series("", results.index)
    notes = []
    for key in dict.fromkeys(c.get("of", c["key"]) for c in layout["columns"]):
        scored, total = overall.get(f"n_{key}"), int(overall.get("n", 0))
        if scored is None or pd.isna(scored) or int(scored) >= total:
            continue
        statuses = notes_text.str.extract(rf"\b{re.escape(key)} failed \(judge (\w+)", expand=False).dropna()
        counts = ", ".join(f"{status} {n}" for status, n in statuses.value_counts().sort_index().items())
        notes.append((key, f"scored {int(scored)} / {total} items" + (f" (failed: {counts})" if counts else "")))
    return _shared_notes(notes)


def _macro_notes(layout: dict, per_type: pd.DataFrame) -> list[str]:
    """Why a macro column is undefined where some types have a mean: the types without one (columns undefined for
    the same types share a note)."""
    notes = []
    for column in (c for c in layout["columns"] if c.get("mean") == "macro" and c["of"] in per_type):
        means = pd.to_numeric(per_type[column["of"]], errors="coerce")
        if means.isna().any() and means.notna().any():
            missing = ", ".join(per_type.loc[means.isna(), "edit_type"].astype(str))
            notes.append((column["key"], f"undefined, no scored item of type {missing}"))
    return _shared_notes(notes)


def _fill(result: RowResult, layout: dict, matched: list[Job]) -> None:
    groups: dict[str, list[Job]] = {}
    for job in sorted(matched, key=lambda j: j.mtime):
        groups.setdefault(job.config_key(), []).append(job)
    ran = {key: group for key, group in groups.items() if any(job.has_results for job in group)}
    pool = ran or groups
    latest = max(pool, key=lambda key: pool[key][-1].mtime)
    result.jobs = pool[latest]
    others = [group[-1].name for key, group in groups.items() if key != latest]
    if others:
        result.notes.append(f"{len(groups)} configurations match; the latest is shown ({result.jobs[-1].name}), not "
                            f"{', '.join(others)}")
    frames = [job.results for job in result.jobs if job.has_results]
    if not frames:
        error = next((job.error for job in result.jobs if job.error), "")
        result.status = FAILED if error else NOT_RUN
        result.notes.append(f"the job failed: {_first_line(error)}" if error else
                            f"no results yet in {result.jobs[-1].name}")
        return
    results = pd.concat(frames, ignore_index=True)
    if "image_id" in results:
        results = results.drop_duplicates("image_id", keep="last")
    results = results.assign(run=result.row["id"]).reset_index(drop=True)
    errors = results["error"] if "error" in results else pd.Series("", results.index)
    errors = errors.fillna("").astype(str).str.strip()
    if (errors != "").all():
        result.status = FAILED
        result.notes.append(f"every item failed ({len(results)}; the first: {_first_line(errors.iloc[0])})")
        return
    if (errors != "").any():
        result.notes.append(f"{int((errors != '').sum())} of {len(results)} items failed (left out of the means)")
    summary = summarize(results if "edit_type" in results else results.assign(edit_type="-"))
    overall = summary[summary["edit_type"] == "all"].iloc[0].to_dict()
    result.per_type = summary[summary["edit_type"] != "all"].reset_index(drop=True)
    result.status, result.n = OK, int(overall.get("n", 0))
    succeeded = results[(errors == "").to_numpy()]
    result.values = {c["key"]: _column_value(c, overall, result.per_type, succeeded, result.jobs)
                     for c in layout["columns"]}
    result.notes += _scored_notes(layout, overall, succeeded) + _macro_notes(layout, result.per_type)
    sharded = sorted({k for job in result.jobs for k in job.set_metrics} if len(result.jobs) > 1 else set())
    if sharded:
        result.notes.append(f"{', '.join(sharded)}: {len(result.jobs)} shards each scored their own part, which is "
                            "not the whole set's score: n/a (run the configuration as one job for it)")


def resolve(layout_id: str, jobs: list[Job], compare: bool = True) -> list[RowResult]:
    """The layout's rows in its order, each with what filled it (``compare``: also the quality against the
    reference row's edits, for layouts that have one)."""
    layout = load_layouts()[layout_id]
    pool = [job for job in jobs if _eligible(layout, job)]
    rows = []
    for row in layout["rows"]:
        result = RowResult(row)
        if row.get("published_only"):
            result.status = PUBLISHED_ONLY
        elif matched := [job for job in pool if row_matches(row, job)]:
            _fill(result, layout, matched)
        rows.append(result)
    if compare and layout.get("reference"):
        _against_reference(layout, rows)
    return rows


# ------------------------------------------------------------------------------------------------ against a reference
def _edits(jobs: list[Job]) -> dict[Path, Path]:
    """{path relative to annotation_images: file} of the saved edits of a configuration's job folders."""
    found: dict[Path, Path] = {}
    for job in jobs:  # oldest first: a later shard's edit of an item wins
        folder = job.path / "annotation_images"
        found.update({p.relative_to(folder): p for p in sorted(folder.rglob("*.png"))} if folder.is_dir() else {})
    return found


def compare_edits(edits: dict[Path, Path], reference: dict[Path, Path]) -> tuple[dict[str, float], int, bool]:
    """Mean PSNR (dB, data range 1), SSIM and MSE (images in [0, 1]) of ``edits`` against the ``reference`` edits
    of the same relative paths (torchmetrics), an edit of another size resized to the reference's (Lanczos); PSNR
    of identical images (inf) is left out of its mean. Returns (means, pairs compared, whether any was resized)."""
    import torch
    from PIL import Image
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    def tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous()

    scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "mse": []}
    resized = False
    for rel in sorted(edits.keys() & reference.keys()):
        with Image.open(reference[rel]) as ref_image, Image.open(edits[rel]) as image:
            ref_image, image = ref_image.convert("RGB"), image.convert("RGB")
            if image.size != ref_image.size:
                image, resized = image.resize(ref_image.size, Image.Resampling.LANCZOS), True
            a, b = tensor(image), tensor(ref_image)
        scores["psnr"].append(float(peak_signal_noise_ratio(a, b, data_range=1.0)))
        scores["ssim"].append(float(structural_similarity_index_measure(a, b, data_range=1.0)))
        scores["mse"].append(float(mean_squared_error(a, b)))
    means = {k: float(np.nanmean(np.where(np.isinf(v), np.nan, v))) if v and np.isfinite(v).any() else math.nan
             for k, v in scores.items()}
    return means, len(scores["psnr"]), resized


def _against_reference(layout: dict, rows: list[RowResult]) -> None:
    columns = [c for c in layout["columns"] if c.get("vs_reference")]
    reference = next(r for r in rows if r.row["id"] == layout["reference"])
    if reference.status == OK:
        reference.status = "reference"
    ref_edits = _edits(reference.jobs) if reference.jobs else {}
    for result in rows:
        if result is reference or result.status != OK:
            continue
        if not ref_edits:
            result.notes.append(f"no saved edits of the reference row ({layout['reference']}) to compare with")
            continue
        means, pairs, resized = compare_edits(_edits(result.jobs), ref_edits)
        if not pairs:
            result.notes.append("no saved edit shares a path with the reference's: nothing compared")
            continue
        for column in columns:
            if not column.get("unavailable") and column["vs_reference"] in means:
                result.values[column["key"]] = means[column["vs_reference"]] * column.get("factor", 1)
        result.notes.append(f"against the reference on {pairs} edits" + (" (resized to its size)" if resized else ""))
