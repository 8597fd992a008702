"""The plots beside the paper tables (`evaluation.tables`), drawn with matplotlib's Agg canvas into PNG files.

- `quality_vs_cost`: one point per method, a quality metric against another (or against a cost), the point's
  area a cost (seconds, NFE, memory) with a legend for it; method names annotated; the Pareto front of our points
  drawn as a line; the paper's points, where it has both numbers, as crosses;
- `per_edit_type_bars`: the mean of one metric per PIE-Bench edit type, one bar per method;
- `inversion_ablation`: iCD Table 2 / 5 style, LPIPS / DINOv2 / PSNR per row, ours beside the paper's;
- `fig9_scatter`: iCD Fig. 9, DINOv2 (preservation) against CLIP-T (edit strength), one point per method.

Each function returns the file written, or None when there is nothing to draw. No window is ever opened: the
figures are `matplotlib.figure.Figure` objects on an Agg canvas (pyplot and its global state are not used).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from editlab.evaluation.files import atomic_write
from editlab.evaluation.piebench import EDIT_TYPES

STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9, "xtick.labelsize": 9,
         "ytick.labelsize": 9}
DPI = 130
OURS, PAPER = "#1f77b4", "#d62728"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _title(text: str, width: int = 80) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png"), "wb")
    return path


def _finite(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce")
    return frame[np.isfinite(values.to_numpy(dtype=float)).all(axis=1)]


def pareto_front(x, y, lower_x_better: bool = True, lower_y_better: bool = False) -> np.ndarray:
    """Indices of the points no other point beats on one axis without losing on the other, sorted by x."""
    x = np.asarray(x, dtype=float) * (1 if lower_x_better else -1)
    y = np.asarray(y, dtype=float) * (1 if lower_y_better else -1)
    keep = [i for i in range(len(x)) if not any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i])
                                                 for j in range(len(x)))]
    return np.array(sorted(keep, key=lambda i: x[i] * (1 if lower_x_better else -1)), dtype=int)


def _unstack(labels: list) -> None:
    """Moves each annotation up, in steps of a line, until it overlaps none placed before it (close points)."""
    renderer = labels[0].figure.canvas.get_renderer() if labels else None
    placed = []
    for label in labels:
        for _ in range(len(labels) * 3):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            x, y = label.xyann
            label.xyann = (x, y + box.height * 72 / label.figure.dpi + 1)
        placed.append(label.get_window_extent(renderer))


def quality_vs_cost(points: pd.DataFrame, path: Path, *, x_label: str, y_label: str, size_label: str,
                    lower_x_better: bool = True, lower_y_better: bool = False, paper: pd.DataFrame | None = None,
                    title: str = "") -> Path | None:
    """``points`` (columns label, x, y, size; ours) as a scatter, the area of a point ∝ its size (a default where
    the size is missing), the Pareto front of ours as a line, ``paper``'s points (label, x, y) as crosses."""
    ours = _finite(points, "x", "y") if len(points) else points
    if ours.empty:
        return None
    theirs = _finite(paper, "x", "y") if paper is not None and len(paper) else pd.DataFrame(columns=["x", "y"])
    sizes = pd.to_numeric(ours["size"], errors="coerce").to_numpy(dtype=float)
    top = np.nanmax(sizes) if np.isfinite(sizes).any() and np.nanmax(sizes) > 0 else math.nan

    def area(value: float) -> float:
        return 80.0 if not math.isfinite(value) or not math.isfinite(top) else max(25.0, 700.0 * value / top)

    with mpl.rc_context(STYLE):
        figure = _figure(11.0, 6.5)
        ax = figure.add_subplot()
        ax.scatter(ours["x"], ours["y"], s=[area(v) for v in sizes], color=OURS, alpha=0.6, edgecolor="black",
                   linewidth=0.6, zorder=3)
        labels = [ax.annotate(point["label"], (point["x"], point["y"]), xytext=(6, 6), textcoords="offset points",
                              fontsize=9) for _, point in ours.sort_values(["y", "x"]).iterrows()]
        front = ours.iloc[pareto_front(ours["x"], ours["y"], lower_x_better, lower_y_better)]
        handles = []
        if len(front) > 1:
            ax.plot(front["x"], front["y"], color=OURS, linestyle="--", linewidth=1.2, zorder=2)
            handles.append(Line2D([], [], color=OURS, linestyle="--", label="Pareto front (ours)"))
        if len(theirs):
            ax.scatter(theirs["x"], theirs["y"], marker="x", s=60, color=PAPER, zorder=4)
            labels += [ax.annotate(point["label"], (point["x"], point["y"]), xytext=(6, -12), fontsize=8,
                                   textcoords="offset points", color=PAPER, style="italic")
                       for _, point in theirs.sort_values(["y", "x"]).iterrows()]
            handles.append(Line2D([], [], marker="x", color=PAPER, linestyle="", label="paper"))
        shown = sorted({float(v) for v in np.nanpercentile(sizes, [0, 50, 100])}) if math.isfinite(top) else []
        handles += [ax.scatter([], [], s=area(v), color=OURS, alpha=0.6, edgecolor="black", linewidth=0.6,
                               label=f"{v:.3g}") for v in shown]
        ax.legend(handles=handles, title=f"point size:\n{size_label}" if shown else None, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), labelspacing=1.4, borderpad=1.0)
        ax.set_xlabel(f"{x_label}  ({'lower' if lower_x_better else 'higher'} is better)")
        ax.set_ylabel(f"{y_label}  ({'lower' if lower_y_better else 'higher'} is better)")
        ax.set_title(_title(title))
        ax.grid(alpha=0.3)
        ax.margins(0.15)
        figure.tight_layout()
        _unstack(labels)
        return _save(figure, path)


def per_edit_type_bars(per_type: pd.DataFrame, path: Path, *, metric_label: str, title: str = "") -> Path | None:
    """``per_type`` (columns method, edit_type, value: a metric's mean per edit type, PIE-Bench's or a judged
    benchmark's, n: the items it averages) as grouped bars, one group per edit type, one bar per method; the items
    per type under its name, per method in the legend."""
    data = _finite(per_type, "value") if len(per_type) else per_type
    if data.empty:
        return None
    table = data.pivot_table(index="edit_type", columns="method", values="value", sort=False)
    table = table.loc[sorted(table.index, key=lambda t: (not str(t).isdigit(), int(t) if str(t).isdigit() else 0,
                                                        str(t)))]
    methods = list(dict.fromkeys(data["method"]))
    table = table[methods]
    with mpl.rc_context(STYLE):
        figure_width = max(8.0, 1.1 * len(table) + 3)
        figure = _figure(figure_width, 5.5)
        ax = figure.add_subplot()
        width = 0.8 / len(methods)
        positions = np.arange(len(table))
        counts = data.pivot_table(index="edit_type", columns="method", values="n", aggfunc="sum", sort=False)
        counts = counts.reindex(index=table.index, columns=methods).fillna(0).astype(int)
        for k, method in enumerate(methods):
            ax.bar(positions + (k - (len(methods) - 1) / 2) * width, table[method], width,
                   label=f"{method} (n = {counts[method].sum()})")
        spans = [f"n = {lo}" + (f"–{hi}" if hi > lo else "") for lo, hi in zip(counts.min(axis=1), counts.max(axis=1))]
        names = [f"{t} {EDIT_TYPES.get(str(t), '')}".replace("_", " ").strip() + f"\n{span}"
                 for t, span in zip(table.index, spans)]
        ax.set_xticks(positions, names, rotation=30, ha="right")
        pie_types = all(str(t).isdigit() for t in table.index)  # PIE-Bench's 0-9; GEdit / ImgEdit name theirs
        ax.set_xlabel("PIE-Bench edit type" if pie_types else "edit type")
        ax.set_ylabel(metric_label)
        ax.set_title(_title(title, int(7 * figure_width)))  # the legend takes the figure's right part
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
        return _save(figure, path)


ABLATION_COLUMNS = ("lpips_vgg", "dinov2", "psnr_uint8")


def _row_labels(cells: pd.DataFrame) -> list[str]:
    return [f"{group} · {label}" if isinstance(group, str) and group else label
            for group, label in zip(cells["group"], cells["label"])]


def inversion_ablation(table: pd.DataFrame, path: Path, *, title: str = "",
                       columns: tuple[str, ...] = ABLATION_COLUMNS) -> Path | None:
    """One panel per metric of ``columns`` (from a tidy table of `evaluation.tables.build_table`), per row a bar of
    ours beside the paper's. Metrics, rows and the paper's bars with no number at all are left out, and a line under
    the title names what was."""
    cells = table[table["column"].isin(columns)]
    finite = cells[["ours", "paper"]].apply(pd.to_numeric, errors="coerce").apply(np.isfinite)
    cells = cells.assign(drawn=finite.any(axis=1))
    shown = [c for c in columns if cells.loc[cells["column"] == c, "drawn"].any()]
    if not shown:
        return None
    rows = list(dict.fromkeys(cells.loc[cells["drawn"] & cells["column"].isin(shown), "row"]))
    series = [(part, color) for part, color in (("ours", OURS), ("paper", PAPER)) if finite[part].any()]
    names = cells.drop_duplicates("column").set_index("column")["name"]
    labels = cells.drop_duplicates("row").set_index("row")
    empty = [[names[c] for c in columns if c in names and c not in shown],
             [str(label) for label in labels.loc[~labels.index.isin(rows), "label"]]]
    left_out = [f"{what} {', '.join(items)}" for what, items in zip(("metrics", "rows"), empty) if items]
    with mpl.rc_context(STYLE):
        figure = _figure(5.0 * len(shown) + 3.5, 0.42 * len(rows) + 2.6)
        axes = figure.subplots(1, len(shown), sharey=True, squeeze=False)[0]
        positions, width = np.arange(len(rows)), 0.8 / len(series)
        for ax, column in zip(axes, shown):
            values = cells[cells["column"] == column].set_index("row").loc[rows]
            for k, (part, color) in enumerate(series):
                ax.barh(positions + (k - (len(series) - 1) / 2) * width, values[part], width, color=color,
                        alpha=1.0 if part == "ours" else 0.75, label=part)
            ax.set_xlabel(names[column])
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(positions, _row_labels(labels.loc[rows]))
        axes[0].invert_yaxis()  # the paper's first row on top
        note = f"\n{_title('left out, no numbers: ' + '; '.join(left_out), 140)}" if left_out else ""
        figure.suptitle(_title(title, 120) + note)
        figure.legend(*axes[0].get_legend_handles_labels(), loc="upper right", ncols=len(series))
        return _save(figure, path)


def fig9_scatter(table: pd.DataFrame, path: Path, *, title: str = "") -> Path | None:
    """iCD Fig. 9: DINOv2 (x) against CLIP-T (y) of each row we ran (a tidy table of `build_table`), annotated."""
    cells = table[table["column"].isin(["dinov2", "clip_t"])]
    if cells.empty:
        return None
    ours = cells.pivot_table(index="row", columns="column", values="ours", sort=False)
    if not {"dinov2", "clip_t"} <= set(ours.columns):
        return None
    labels = table.drop_duplicates("row").set_index("row")["label"]
    points = _finite(ours.reset_index(), "dinov2", "clip_t")
    if points.empty:
        return None
    with mpl.rc_context(STYLE):
        figure = _figure(7.0, 5.5)
        ax = figure.add_subplot()
        ax.scatter(points["dinov2"], points["clip_t"], s=70, color=OURS, edgecolor="black", zorder=3, label="ours")
        for _, point in points.iterrows():
            ax.annotate(labels[point["row"]], (point["dinov2"], point["clip_t"]), xytext=(6, 6),
                        textcoords="offset points", fontsize=9)
        ax.set_xlabel("DINOv2 similarity to the source (higher: better preserved)")
        ax.set_ylabel("CLIP-T with the target prompt (higher: stronger edit)")
        ax.set_title(_title(title, 70))
        ax.grid(alpha=0.3)
        ax.margins(0.2)
        ax.legend(loc="best")
        return _save(figure, path)
