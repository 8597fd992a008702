"""Per-editor, per-edit-type means of per-item PIE-Bench results, in the paper's scales.

Conventions:
- rows with a non-empty `error` are dropped; `n` counts the remaining (successful) items;
- means ignore NaN, as everyone averaging the reference CSVs does (background metrics are NaN for full masks,
  so `n_unedit` counts the items whose background metrics exist);
- PSNR (PIE-Bench's unedited-part PSNR, or the iCD paper's whole-image uint8 PSNR) is +inf when an edit leaves
  the background (or a reconstruction the image) bit-identical. One inf would make the mean inf and hide every
  other item, so inf counts as NaN in the mean and `n_psnr_inf` reports how many items were perfect.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from editlab.evaluation.ground_truth import GroundTruthMetrics
from editlab.evaluation.metrics import PieBenchMetrics
from editlab.evaluation.paper_metrics import ICDPaperMetrics
from editlab.evaluation.protocol import Column

# The metric sets editlab ships. A summary reads results.csv alone, so it knows their columns by name, with how to
# print them (`Column`); another metric's numeric columns are averaged under their own names.
SHIPPED = (PieBenchMetrics, ICDPaperMetrics, GroundTruthMetrics)
COLUMNS: dict[str, Column] = {c: c for metric in SHIPPED for c in (*metric.columns, *metric.set_columns)}
# a run is identified by these (those present are group keys); the other non-metric columns are per-item labels
# (batch_size too: how the item was edited, not a figure to average)
RUN_COLUMNS = ("run", "editor", "model", "precision")
ID_COLUMNS = (*RUN_COLUMNS, "edit_type", "error", "note", "inputs", "image_id", "image_path", "batch_size")
COST_COLUMNS = ("seconds", "nfe", "backward_passes", "peak_mem_mb")


def read_results(path: Path) -> pd.DataFrame:
    """A results.csv as it stands, ids and errors as strings; a last line torn by a kill (no line end) is left out
    (the file itself is repaired only by the run that appends to it)."""
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    frame = pd.read_csv(io.BytesIO(data), dtype={"image_id": str, "edit_type": str, "error": str})
    frame["error"] = frame["error"].fillna("")
    return frame


def _succeeded(results: pd.DataFrame) -> pd.DataFrame:
    if "error" not in results:
        return results
    error = results["error"].fillna("").astype(str).str.strip()
    return results[error == ""]


def _failed_metric(results: pd.DataFrame, key: str) -> pd.Series:
    """Rows whose note says that ``key``'s backbone failed for the item (`evaluation.metrics.BackboneScores`)."""
    notes = results["note"].fillna("").astype(str) if "note" in results else pd.Series("", index=results.index)
    return notes.str.contains(f"{key} failed (", regex=False)


def metric_gaps(results: pd.DataFrame, keys: tuple[str, ...]) -> dict[str, int]:
    """``{metric: items}`` for each metric that failed for some successful items (left out of its means)."""
    ok = _succeeded(results)
    return {key: n for key in keys if (n := int(_failed_metric(ok, key).sum()))}


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, editor, model, precision, edit type) plus an `"all"` edit-type row per run; each of
    those keys is used only when present, so a sweep's concatenated results summarise in one table."""
    ok = _succeeded(results).copy()
    ok["edit_type"] = ok["edit_type"].astype(str)
    known = [*PieBenchMetrics.columns, *COST_COLUMNS]  # always numbers, even when a column is empty or all NaN
    numeric = [c for c in ok.columns if c in known or c not in ID_COLUMNS and pd.api.types.is_numeric_dtype(ok[c])]
    paper = [c for c in COLUMNS.values() if c.paper and c in numeric]  # first, in the papers' order
    metrics = [*paper, *(c for c in numeric if c not in paper and c not in COST_COLUMNS)]
    costs = [c for c in COST_COLUMNS if c in numeric]

    psnr = ok["psnr_unedit_part"].astype(float) if "psnr_unedit_part" in ok else pd.Series(np.nan, index=ok.index)
    counts = pd.DataFrame({"n": 1, "n_unedit": psnr.notna().astype(int), "n_psnr_inf": np.isinf(psnr).astype(int)})
    if "psnr_uint8" in ok:  # the iCD paper's PSNR: an identical pair is inf likewise
        counts["n_psnr_inf"] = np.isinf(ok["psnr_uint8"].astype(float)).astype(int)
    for key in metric_gaps(ok, tuple(metrics)):  # a metric that failed for some items: how many its mean is over
        counts[f"n_{key}"] = (~_failed_metric(ok, key)).astype(int)
    values = ok[metrics + costs].astype(float).replace([np.inf, -np.inf], np.nan)
    for column in paper:
        values[column] *= column.factor
    values = values.rename(columns={column: column.paper for column in paper})
    keys = [c for c in RUN_COLUMNS if c in ok]
    frame = pd.concat([ok[[*keys, "edit_type"]], counts, values], axis=1)

    per_type = frame.groupby([*keys, "edit_type"], sort=True)
    overall = frame.assign(edit_type="all").groupby([*keys, "edit_type"], sort=True)
    aggregations = dict.fromkeys(counts, "sum") | dict.fromkeys(values, "mean")  # pandas' mean skips NaN
    summary = pd.concat([per_type.agg(aggregations), overall.agg(aggregations)]).reset_index()
    # "all" after the per-type rows of its run
    summary["_all"] = summary["edit_type"] == "all"
    summary = summary.sort_values([*keys, "_all", "edit_type"], kind="stable").drop(columns="_all")
    return summary.reset_index(drop=True)


def format_summary(summary: pd.DataFrame) -> str:
    """A fixed-width table: two decimals for paper-scale numbers, four significant digits for small ones."""
    return summary.to_string(index=False, float_format=lambda v: f"{v:.2f}" if abs(v) >= 1 else f"{v:.4g}")
