"""The papers' tables, with our numbers beside the published ones, and their plots.

    python -m editlab.evaluation.tables DIR [DIR ...] [--layout auto|<layout id>] [--out OUTDIR] [--delta] [--wandb]

A layout (``evaluation/published.yaml``: one per paper table, with its source) lists the paper's rows in the
paper's order and the columns it prints, with the published numbers; how job folders fill its rows and which
layouts ``--layout auto`` (the default) picks are in `evaluation.table_layouts`; ``--layout <id>`` lays out any
layout.

Each table is printed as papers print a reproduction (`evaluation.table_render`): rows labelled by method (the
paper's own label cited in the notes), for each metric ours beside the paper's number, the best of each column
marked, Δ = ours − paper only with ``--delta``, a caption with the paper's setup and what our jobs ran (model, data
set, items, the layout's ``run_settings``), a header line when metric backbones are toy ones (``metrics.label``:
the numbers are not comparable with the paper's), and numbers that are not in the paper's table (context: another
source's seconds) apart, never compared. It is written into OUTDIR (default: the first DIR) as
``table_<layout>.md``, ``table_<layout>.tex`` (booktabs, fits a two-column paper) and ``table_<layout>.csv``
(tidy: one line per row and column with ours / paper / diff, status, job folder and items), with the layout's plots
(``plot_<layout>_<kind>.png``, `evaluation.table_plots`). ``--wandb`` logs the tables and plots to an offline W&B
run in OUTDIR (``wandb sync`` uploads it). The sweep report (`evaluation.aggregate.report`) prints and writes the
tables its sweep matches.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Iterable

import pandas as pd

from editlab.evaluation.files import atomic_write_text
from editlab.evaluation.table_layouts import (
    OK,
    PUBLISHED_ONLY,
    Job,
    RowResult,
    find_jobs,
    is_number,
    load_layouts,
    matching_layouts,
    resolve,
)
from editlab.evaluation.table_plots import log_to_wandb, make_plots
from editlab.evaluation.table_render import header, render

TIDY_COLUMNS = ("layout", "row", "label", "group", "column", "name", "direction", "decimals", "ours", "paper", "diff",
                "status", "job", "n")


def describe_runs(layout: dict, results: list[RowResult]) -> str:
    """What the rows' jobs ran: model, data set, items per row, the layout's ``run_settings`` (each a config key's
    values over the jobs of its rows) and the judge of judged scores."""
    ran = [r for r in results if r.status in (OK, "reference")]
    if not ran:
        return "nothing run"

    def values(key: str, rows: Iterable[str] | None = None) -> str:
        found = {job.config.get(key) for r in ran if rows is None or r.row["id"] in rows for job in r.jobs}
        return " / ".join(sorted(f"{v:g}" if is_number(v) else str(v) for v in found - {None}))

    counts = sorted({r.n for r in ran})
    items = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    parts = [f"model {values('model.name')}", f"data set {values('dataset.name')}", f"{items} items per row"]
    parts += [f"{s['name']} {v}" for s in layout.get("run_settings", ()) if (v := values(s["key"], s.get("rows")))]
    if judges := sorted({job.judge for r in ran for job in r.jobs if job.judge}):
        parts.append(f"judge {' / '.join(judges)}")
    return ", ".join(parts)


def _row_notes(result: RowResult) -> list[str]:
    row = result.row
    said = ([f"the paper's row “{row['paper_label']}”"] if row.get("paper_label") else []) + \
        ([row["note"]] if row.get("note") else []) + ([PUBLISHED_ONLY] if result.status == PUBLISHED_ONLY else [])
    name = row["label"] + (f" ({row['group']})" if row.get("group") else "")
    return ([f"{name}: {'; '.join(said)}"] if said else []) + [f"{name}: {note}" for note in result.notes]


def build_table(layout_id: str, jobs: list[Job]) -> pd.DataFrame:
    """The layout's table for ``jobs``, tidy: one line per row and column (ours, paper, diff = ours − paper, the
    row's status, job folder and item count), rows and columns in the paper's order. ``attrs`` hold the layout id,
    title, the paper's setup and what our jobs ran, source, header lines (toy metrics), notes and context (numbers
    from outside the table: never a paper number nor a difference)."""
    layout = load_layouts()[layout_id]
    results = resolve(layout_id, jobs)
    columns = {c["key"]: c for c in layout["columns"]}
    records = []
    notes = []
    for result in results:
        row = result.row
        published = row.get("published") or {}
        if (judge := layout.get("judge")) and published:  # judged numbers only beside the same judge's
            ours_by = {job.judge for job in result.jobs if job.judge}  # none: not judged yet, ours are n/a
            if not ours_by <= set(judge["ids"]):
                published = {}
                notes.append(f"{row['label']}: the paper's numbers are {judge['label']}'s; this row's judge is "
                             f"{', '.join(sorted(ours_by))}: not shown beside them")
        for column in layout["columns"]:
            ours = result.values.get(column["key"], math.nan) if result.status in (OK, "reference") else math.nan
            paper = float(published.get(column["key"], math.nan))
            records.append({"layout": layout_id, "row": row["id"], "label": row["label"],
                            "group": row.get("group", ""), "column": column["key"], "name": header(column),
                            "direction": column.get("direction", ""),
                            "decimals": int(column.get("decimals", 2)), "ours": ours, "paper": paper,
                            "diff": ours - paper, "status": result.status, "job": result.job_name, "n": result.n})
    table = pd.DataFrame.from_records(records, columns=list(TIDY_COLUMNS))
    notes = [note for r in results for note in _row_notes(r)] + notes
    notes += [f"{c['name']}: not computed ({c['unavailable']})" for c in layout["columns"] if c.get("unavailable")]
    context = [f"{r['label']}: {header(columns[key])} {value['value']:.{columns[key].get('decimals', 2)}f} "
               f"({' '.join(value['source'].split())})"
               for r in layout["rows"] for key, value in (r.get("context") or {}).items()]
    ran = [r for r in results if r.jobs]
    toy = [r for r in ran if any(j.metrics_label for j in r.jobs)]
    heading = []
    if toy:
        names = ", ".join(sorted({j.metrics_label for r in toy for j in r.jobs if j.metrics_label}))
        which = "every row" if len(toy) == len(ran) else "rows " + "; ".join(
            r.row["label"] + (f" ({r.row['group']})" if r.row.get("group") else "") for r in toy)
        heading.append(f"TOY METRICS ({names} backbones, metrics.label) in {which}: these numbers are not "
                       "comparable with the paper's")
    table.attrs.update(layout=layout_id, title=layout["title"], setup=layout.get("setup", ""),
                       ran=describe_runs(layout, results), source=" ".join(layout["source"].split()),
                       header=heading, notes=notes, context=context,
                       per_type=None if (by_type := per_type_table(layout, results)) is None else
                       by_type.to_dict("records"))  # records, not a frame: pandas compares attrs
    return table


def per_type_table(layout: dict, results: list[RowResult]) -> pd.DataFrame | None:
    """The layout's ``per_type`` columns per row and edit type: their means and the items scored of the type's
    (the fewest over the columns), for a benchmark whose papers report types (GEdit's 11 task types); None without."""
    columns = layout.get("per_type")
    frames = [result.per_type.reindex(columns=["edit_type", "n", *columns, *(f"n_{c}" for c in columns)])
              .assign(method=result.row["label"]) for result in results
              if columns and result.status == OK and result.per_type is not None]
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True)
    counts = table[[f"n_{c}" for c in columns]].apply(lambda col: col.fillna(table["n"]))  # absent: none failed
    table["scored"] = counts.min(axis=1).astype(int).astype(str) + " / " + table["n"].astype(int).astype(str)
    return table[["method", "edit_type", *columns, "scored"]].rename(columns={"edit_type": "type"})


def write_outputs(table: pd.DataFrame, outdir: Path, jobs: list[Job] | None = None, plots: bool = True,
                  delta: bool = False) -> list[Path]:
    """``table_<layout>.md`` / ``.tex`` (``delta``: with Δ columns) / ``.csv`` in ``outdir``, and (``plots``) the
    layout's plots; returns the files written."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    layout_id = table.attrs["layout"]
    texts = {outdir / f"table_{layout_id}.{fmt}": render(table, fmt, delta) for fmt in ("md", "tex", "csv")}
    if (records := table.attrs.get("per_type")) is not None:
        per_type = pd.DataFrame(records)
        texts[outdir / f"table_{layout_id}_per_type.csv"] = per_type.to_csv(index=False)
        texts[outdir / f"table_{layout_id}_per_type.md"] = per_type.to_markdown(index=False, floatfmt=".2f") + "\n"
    for path, text in texts.items():  # all rendered first: a failing format leaves no file of the set half-new
        atomic_write_text(path, text)
    written = list(texts)
    if plots:
        written += make_plots(table, jobs, outdir)
    return written


def lay_out(layouts: list[str], jobs: list[Job], outdir: Path, delta: bool = False
            ) -> tuple[list[str], dict[str, pd.DataFrame], list[Path]]:
    """Each layout's table for ``jobs``, written into ``outdir`` with its plots (`write_outputs`): the printed
    tables with the files written, the tables for W&B (``tables/<layout>``) and the plots."""
    texts, tables, plots = [], {}, []
    for layout_id in layouts:
        table = build_table(layout_id, jobs)
        files = write_outputs(table, outdir, jobs, delta=delta)
        tables[f"tables/{layout_id}"] = table.astype({"n": int})
        plots += [f for f in files if f.suffix == ".png"]
        records = table.attrs.get("per_type")
        by_type = "" if records is None else \
            f"\nper type:\n{pd.DataFrame(records).to_string(index=False, float_format=lambda v: f'{v:.2f}')}"
        texts.append(f"{render(table, delta=delta)}{by_type}\nwritten: {', '.join(str(f) for f in files)}")
    return texts, tables, plots


def sweep_tables(folder: Path) -> tuple[str, dict[str, pd.DataFrame], list[Path]]:
    """For the sweep report: the tables ``folder``'s jobs match, written next to its report.txt (with their plots),
    as printed text ("" when none matches), the tables for the sweep's W&B run and the plots."""
    jobs = find_jobs([folder])
    texts, tables, plots = lay_out(matching_layouts(jobs), jobs, folder)
    return "\n\n".join(texts), tables, plots


def main(argv: list[str] | None = None) -> int:
    layouts = load_layouts()
    parser = argparse.ArgumentParser(prog="python -m editlab.evaluation.tables", description=__doc__.split("\n\n")[0],
                                     epilog="layouts: " + "; ".join(f"{k}: {v['title']}" for k, v in layouts.items()))
    parser.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="sweep or job folders")
    parser.add_argument("--layout", default="auto", choices=["auto", *layouts],
                        help="the paper table to lay out (default auto: every layout the jobs match)")
    parser.add_argument("--out", type=Path, help="where the table files and plots go (default: the first DIR)")
    parser.add_argument("--delta", action="store_true", help="print Δ = ours − paper beside each published number")
    parser.add_argument("--wandb", action="store_true", help="log the tables and plots to an offline W&B run")
    args = parser.parse_args(argv)
    if missing := [str(f) for f in args.folders if not f.is_dir()]:
        parser.error(f"not a folder: {', '.join(missing)}")
    jobs = find_jobs(args.folders)
    chosen = matching_layouts(jobs) if args.layout == "auto" else [args.layout]
    if not chosen:
        print(f"no layout matches the {len(jobs)} job(s) under {', '.join(map(str, args.folders))}; name one with "
              f"--layout ({', '.join(layouts)})", file=sys.stderr)
        return 1
    outdir = args.out or args.folders[0]
    texts, tables, plots = lay_out(chosen, jobs, outdir, args.delta)
    print("\n\n".join(texts) + "\n")
    if args.wandb:
        images = {f"plots/{plot.stem}": plot for plot in plots}
        print(f"W&B run (offline): {log_to_wandb(tables, images, outdir, args.folders[0].resolve().name)}")
    return 0


def cli() -> None:
    """The ``editlab-tables`` command."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
