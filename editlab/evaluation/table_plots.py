"""The papers' tables' plots (``plots:`` in published.yaml, drawn by `evaluation.plots`) and their W&B run."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pandas as pd

from editlab.evaluation.table_layouts import OK, Job, load_layouts, resolve

log = logging.getLogger(__name__)


def _axis(table: pd.DataFrame, spec: str) -> tuple[str, pd.Series, pd.Series, str, bool]:
    """(label, ours by row, paper by row, direction, lower is better) of a plot axis (``key`` or ``1-key``)."""
    flip = spec.startswith("1-")
    key = spec[2:] if flip else spec
    cells = table[table["column"] == key].set_index("row")
    if cells.empty:
        raise KeyError(f"the layout has no column {key!r} to plot")
    name, direction = cells["name"].iloc[0], cells["direction"].iloc[0]
    lower = (direction == "↓") != flip
    if flip:
        base = name.replace(direction, "").strip()
        name = f"1 − {base} {'↓' if lower else '↑'}"
        return name, 1 - cells["ours"], 1 - cells["paper"], direction, lower
    return name, cells["ours"], cells["paper"], direction, lower


def make_plots(table: pd.DataFrame, jobs: list[Job] | None, outdir: Path) -> list[Path]:
    """The layout's plots (``plots:`` in published.yaml) as ``plot_<layout>_<kind>.png``; a plot with nothing to
    draw is skipped, one that fails is logged."""
    from editlab.evaluation import plots

    layout_id = table.attrs["layout"]
    layout = load_layouts()[layout_id]
    written = []
    rows = table.drop_duplicates("row").set_index("row")
    labels = rows["label"].where(rows["group"].fillna("") == "", rows["label"] + " (" + rows["group"].fillna("") + ")")
    ran = rows["status"].isin([OK, "reference"])
    title = layout["title"] + ("\n(ours: toy world, toy backbones; not comparable with the paper's numbers)"
                               if table.attrs.get("header") else "")
    for spec in layout.get("plots", ()):
        kind = spec["kind"]
        path = outdir / f"plot_{layout_id}_{kind}.png"
        try:
            if kind == "quality_vs_cost":
                x_name, x, x_paper, _, x_lower = _axis(table, spec["x"])
                y_name, y, y_paper, _, y_lower = _axis(table, spec["y"])
                s_name, size, size_paper, _, _ = _axis(table, spec["size"])
                ours = pd.DataFrame({"label": labels, "x": x, "y": y, "size": size})[ran]
                # toy numbers and the paper's share no scale: the paper's points only beside real runs
                paper = None if table.attrs.get("header") else \
                    pd.DataFrame({"label": labels, "x": x_paper, "y": y_paper, "size": size_paper})
                out = plots.quality_vs_cost(ours, path, x_label=x_name, y_label=y_name, size_label=s_name,
                                            lower_x_better=x_lower, lower_y_better=y_lower, paper=paper,
                                            title=title)
            elif kind == "per_edit_type_bars":
                metric = spec["metric"]
                parts = [r.per_type.assign(method=r.row["label"]) for r in resolve(layout_id, jobs or [], False)
                         if r.per_type is not None and metric in r.per_type]
                per_type = pd.concat(parts)[["method", "edit_type", metric, "n"]].rename(columns={metric: "value"}) \
                    if parts else pd.DataFrame(columns=["method", "edit_type", "value", "n"])
                name = table.loc[table["column"] == metric, "name"].iloc[0]
                out = plots.per_edit_type_bars(per_type, path, metric_label=name, title=title)
            elif kind == "inversion_ablation":
                out = plots.inversion_ablation(table.assign(paper=math.nan) if table.attrs.get("header") else table,
                                               path, title=title)  # toy numbers: no paper bars beside them
            elif kind == "fig9_scatter":
                out = plots.fig9_scatter(table, path, title=title)
            else:
                raise ValueError(f"unknown plot kind {kind!r}")
        except Exception:  # noqa: BLE001 - a plot must not cost the tables
            log.exception("plot %s of %s failed", kind, layout_id)
            continue
        if out is not None:
            written.append(out)
    return written


def log_to_wandb(tables: dict[str, pd.DataFrame], images: dict[str, Path], outdir: Path, group: str,
                 name: str | None = None, job_type: str = "tables", mode: str = "offline", project: str | None = None,
                 entity: str | None = None) -> Path:
    """A W&B run in ``outdir`` (offline unless ``mode`` says otherwise) holding each table as a ``wandb.Table`` and
    each image as a ``wandb.Image``, under their keys; W&B's console stays quiet and the run is always finished.
    Returns the run's folder."""
    import wandb

    data_dir = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = str(outdir / "wandb" / "data")  # W&B's staging folder: with the run, not global
    try:
        run = wandb.init(mode=mode, project=project, entity=entity, dir=str(outdir), group=group, job_type=job_type,
                         name=name or f"{job_type} {group}", settings=wandb.Settings(silent=True, console="off"),
                         reinit="finish_previous")
        try:
            run.log({**{key: wandb.Table(dataframe=table) for key, table in tables.items()},
                     **{key: wandb.Image(str(image)) for key, image in images.items()}})
            folder = Path(run.dir).parent
        finally:
            run.finish()
    finally:
        if data_dir is None:
            os.environ.pop("WANDB_DATA_DIR", None)
        else:
            os.environ["WANDB_DATA_DIR"] = data_dir
    return folder
