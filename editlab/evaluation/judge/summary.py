"""Judged scores per task type, and the two overall means the harnesses disagree on, both labelled.

- ``all_macro``: the unweighted mean of the type means, GEdit-Bench's official ``Average`` (calculate_statistics.py).
  It is NaN when some type has no scored item: the official number needs every type.
- ``all_micro``: the mean over items, as EvalScope and lmms-eval print it.
Means are over the *scored* items (every case ``ok``; for GEdit SC, PQ and O over the same items); ``n_scored`` /
``n_total`` and the failures by status (``n_parse_error`` ..., ``n_input_error`` for items not judged at all) say
what they leave out. GEdit is summarised per language, for the full set and, where the items carry the flag, for
the intersection subset. ImgEdit adds ``n_cap_violation`` (replies whose second or third score exceeds the first).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from editlab.evaluation.judge.protocols import FAILURES
from editlab.evaluation.judge.scoring import STATUS_INPUT


def _block(rows: pd.DataFrame, scores: tuple[str, ...], extra: dict[str, str]) -> list[dict]:
    """Per type, then the macro and micro rows, for one subset and language."""
    out = []
    for task_type, group in rows.groupby("task_type", sort=True):
        scored = group[group["status"] == "ok"]
        out.append({"task_type": task_type, "n_total": len(group), "n_scored": len(scored),
                    **{c: scored[c].mean() if len(scored) else np.nan for c in scores},
                    **{f"n_{s}": int((group["status"] == s).sum()) for s in (*FAILURES, STATUS_INPUT)},
                    **{name: int((scored[c] == 1).sum()) for name, c in extra.items()}})
    types = pd.DataFrame(out)
    counts = [c for c in types if c.startswith("n_")]
    scored = rows[rows["status"] == "ok"]
    every_type = bool((types["n_scored"] > 0).all())
    macro = {c: types[c].mean() if every_type else np.nan for c in scores}
    micro = {c: scored[c].mean() if len(scored) else np.nan for c in scores}
    totals = types[counts].sum().astype(int).to_dict()
    return out + [{"task_type": "all_macro", **totals, **macro}, {"task_type": "all_micro", **totals, **micro}]


def summarize(scores: pd.DataFrame, protocol) -> pd.DataFrame:
    """The summary table of a per-item scores frame (`scoring.judge_items`)."""
    extra = {"n_cap_violation": "imgedit_cap_violation"} if "imgedit_cap_violation" in protocol.columns else {}
    blocks = []
    frame = scores.assign(language=scores["language"].fillna("").astype(str))
    subsets = {"full": frame}
    if frame["intersection"].notna().any():
        subsets["intersection"] = frame[frame["intersection"].astype("boolean").fillna(False)]
    for subset, rows in subsets.items():
        for language, group in rows.groupby("language", sort=True):
            if len(group):
                block = pd.DataFrame(_block(group, protocol.scores, extra))
                blocks.append(block.assign(subset=subset, language=language))
    if not blocks:
        return pd.DataFrame(columns=["subset", "language", "task_type", "n_total", "n_scored", *protocol.scores])
    summary = pd.concat(blocks, ignore_index=True)
    first = ["subset", "language", "task_type", "n_total", "n_scored", *protocol.scores]
    return summary[first + [c for c in summary if c not in first]]


def format_summary(summary: pd.DataFrame) -> str:
    """The table as printed: ``scored`` = n_scored/n_total, two decimals, failure counts that are not all zero."""
    table = summary.copy()
    table.insert(3, "scored", [f"{s}/{t}" for s, t in zip(table["n_scored"], table["n_total"])])
    zero = [c for c in table if c.startswith("n_") and c not in ("n_total", "n_scored") and not table[c].any()]
    table = table.drop(columns=["n_total", "n_scored", *zero])
    if (table["language"] == "").all():
        table = table.drop(columns="language")
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="nan")
