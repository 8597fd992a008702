"""The papers' tables (`evaluation.tables.build_table`'s tidy frame) as console text, Markdown and LaTeX.

Laid out as papers lay out a reproduction: one line per method, for each metric our number beside the paper's
(text and Markdown: "ours / paper" in one cell; LaTeX: two sub-columns), Δ = ours − paper only on request, the best
number of each column marked (ours and the paper's apart; bold, ``*`` on the console), the paper's setting and
ours in the caption, and numbers the table does not publish (context) apart from it. The job folder and item
count of each row are in the CSV only.
"""

from __future__ import annotations

import math
import re
import textwrap
from typing import Any

import numpy as np
import pandas as pd

NO_VALUE, NOT_AVAILABLE = "–", "n/a"
FORMATS = ("text", "md", "tex", "csv")
BEST = {"text": "{}*", "md": "**{}**", "tex": r"\textbf{{{}}}"}
# a two-column paper (letter, 10 pt; CVPR / IEEE): the column and text widths, and \small's digit width, in points
COLUMN_PT, TEXT_PT, CHAR_PT, COLUMN_PAD_PT = 234.9, 496.9, 4.5, 12.0


def header(column: dict) -> str:
    """A column's printed name: name, scale, direction (``Struct ×10³ ↓``), and "(not computed)" for one whose
    backbone editlab cannot have (``unavailable``)."""
    parts = (column["name"], column.get("scale"), column.get("direction"),
             "(not computed)" if column.get("unavailable") else None)
    return " ".join(str(p) for p in parts if p)


def number(value: float, decimals: int, sign: bool = False) -> str:
    return f"{value:{'+' if sign else ''}.{decimals}f}" if pd.notna(value) and math.isfinite(value) else ""


_TEX = str.maketrans({
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
    "Δ": r"$\Delta$", "×": r"$\times$", "²": r"$^{2}$", "³": r"$^{3}$", "⁴": r"$^{4}$", "τ": r"$\tau$",
    "λ": r"$\lambda$", "†": r"$^{\dagger}$", "·": r"$\cdot$", "±": r"$\pm$", "–": "--", "−": "-", "…": r"\dots{}",
    "|": r"$|$", "“": "``", "”": "''",
})


def tex_escape(text: Any) -> str:
    """``text`` for LaTeX: special characters escaped (underscores included), the tables' symbols as math."""
    return str(text).translate(_TEX)


def best_cells(table: pd.DataFrame) -> set[tuple[str, str, str]]:
    """(row, column, "ours" | "paper") of each column's best number at printed precision, ours and the paper's
    apart, within each group of rows (a section of the paper's table); one whose numbers are all equal (or fewer
    than two) has none."""
    marked = set()
    for (column, _), cells in table.fillna({"group": ""}).groupby(["column", "group"], sort=False):
        direction = cells["direction"].iloc[0]
        for part in ("ours", "paper"):
            values = pd.to_numeric(cells.set_index("row")[part], errors="coerce").round(int(cells["decimals"].iloc[0]))
            values = values[np.isfinite(values)]
            if direction and values.nunique() > 1:
                best = values.min() if direction == "↓" else values.max()
                marked |= {(row, column, part) for row in values.index[values == best]}
    return marked


def wide(table: pd.DataFrame, fmt: str = "text", delta: bool = False) -> pd.DataFrame:
    """One line per row (indexed by group and method). ``tex``: per metric the sub-columns ours, paper (and Δ with
    ``delta``) where the paper has numbers in it, ours alone elsewhere; ``text`` / ``md``: those parts in one cell,
    "ours / paper". "–" is no number (a row not run, a cell the paper leaves empty), "n/a" one the run lacks."""
    best, mark = best_cells(table), BEST[fmt]
    escape = tex_escape if fmt == "tex" else str
    published = table.groupby("column", sort=False)["paper"].apply(lambda s: s.notna().any())
    lines, index = [], []
    for row, cells in table.groupby("row", sort=False):
        status = cells["status"].iloc[0]
        line = {}
        for cell in cells.itertuples():
            ran = status in ("ok", "reference")
            texts = {"ours": (number(cell.ours, cell.decimals) or NOT_AVAILABLE) if ran else
                     "failed" if status == "failed" else NO_VALUE,
                     "paper": number(cell.paper, cell.decimals) or NO_VALUE,
                     "Δ": number(cell.diff, cell.decimals, sign=True) or NO_VALUE}
            parts = ["ours", "paper", *(["Δ"] if delta else [])] if published[cell.column] else ["ours"]
            shown = [mark.format(escape(texts[p])) if (row, cell.column, p) in best else escape(texts[p])
                     for p in parts]
            if fmt == "tex":
                line.update({(escape(cell.name), escape(p)): text for p, text in zip(parts, shown)})
            else:
                line[cell.name] = " / ".join(shown)
        lines.append(line)
        group = cells["group"].iloc[0]
        index.append((escape(group) if isinstance(group, str) else "", escape(cells["label"].iloc[0])))
    frame = pd.DataFrame(lines)
    if fmt == "tex":
        frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    if any(group for group, _ in index):
        frame.index = pd.MultiIndex.from_tuples(index, names=["", "method"])
    else:
        frame.index = pd.Index([label for _, label in index], name="method")
    return frame


def _visible(tex: str) -> int:
    """About how many characters wide ``tex`` prints (commands and braces dropped, a math symbol one)."""
    return len(re.sub(r"\\[a-zA-Z]+(\{\})?|[{}$^]", "", re.sub(r"\$\\[a-zA-Z]+\$", "x", tex)))


def tex_width_pt(frame: pd.DataFrame) -> float:
    """The estimated width in points of ``frame`` (wide's ``tex`` layout) typeset in \\small: each column as wide
    as its widest cell or sub-header, a metric's sub-columns at least as wide as its name."""
    index = frame.index.to_frame()
    widths = [max(map(_visible, index[c]), default=0) for c in index]
    by_metric: dict[str, list[int]] = {}
    for (metric, part), values in frame.items():
        by_metric.setdefault(metric, []).append(max(_visible(part), *map(_visible, values)))
    for metric, parts in by_metric.items():
        spread = max(0, _visible(metric) - sum(parts) - (len(parts) - 1) * COLUMN_PAD_PT / CHAR_PT)
        widths += [w + spread / len(parts) for w in parts]
    return sum(w * CHAR_PT + COLUMN_PAD_PT for w in widths)


def settings(meta: dict) -> list[str]:
    """What the paper's numbers and ours were measured on (the caption's sentences)."""
    return [f"Paper: {meta.get('setup') or 'no published numbers'}.", f"Ours: {meta.get('ran', '')}."]


def render(table: pd.DataFrame, fmt: str = "text", delta: bool = False) -> str:
    """The table as ``text`` (the console), ``md``, ``tex`` (booktabs; ``table*`` where it is wider than a column of
    a two-column paper, scaled to the text width only where it is wider than that) or ``csv`` (tidy, with the
    difference, the job folder and the item count of each row). ``delta``: a Δ beside each published number."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    meta = table.attrs
    layout_id, title, source = meta.get("layout", ""), meta.get("title", ""), meta.get("source", "")
    frame, notes, context = wide(table, fmt, delta), list(meta.get("notes", ())), list(meta.get("context", ()))
    legend = (f"cells: ours / paper{' / Δ (ours − paper)' if delta else ''} where the paper has numbers; "
              f"{'*' if fmt == 'text' else 'bold'}: the best of a column (ours and the paper's apart); "
              f"{NO_VALUE}: no number (not run, or none in the paper); {NOT_AVAILABLE}: the run has no such number")
    apart = "Not in the paper's table (context only, never compared):"
    if fmt == "tex":
        width = tex_width_pt(frame)
        env = "table*" if width > COLUMN_PT else "table"
        frame.index.names = [None] * frame.index.nlevels  # no line of index names under the header
        body = frame.to_latex(escape=False, multicolumn=True, multicolumn_format="c", multirow=False,
                              column_format="l" * frame.index.nlevels + "r" * frame.shape[1]).strip()
        if width > TEXT_PT:
            body = f"\\resizebox{{\\textwidth}}{{!}}{{%\n{body}\n}}"
        comments = [f"% {line}" for line in (f"source: {source}", *meta.get("header", ()), *notes,
                                             *([apart, *context] if context else []))]
        caption = tex_escape(" ".join([f"{title}.", *settings(meta)]))
        return "\n".join(["% requires \\usepackage{booktabs} and \\usepackage{graphicx}", *comments,
                          f"\\begin{{{env}}}[t]", "\\centering", "\\small", f"\\caption{{{caption}}}",
                          f"\\label{{tab:{layout_id}}}", body, f"\\end{{{env}}}", ""])
    if fmt == "md":
        flat = frame.reset_index().rename(columns={"": "group"}) if frame.index.nlevels > 1 else frame.reset_index()
        flat = flat.map(lambda v: str(v).replace("|", r"\|"))
        flat.columns = [str(c).replace("|", r"\|") for c in flat.columns]
        parts = [f"### {title}", "", f"Source: {source}", "", " ".join(settings(meta)), ""]
        parts += [f"**{line}**" for line in meta.get("header", ())] + ([""] if meta.get("header") else [])
        parts += [flat.to_markdown(index=False, disable_numparse=True, colalign=[
            "left" if c in ("group", "method") else "right" for c in flat.columns]), "", legend, ""]
        parts += [f"- {note}" for note in notes]
        parts += ["", apart, *[f"- {line}" for line in context]] if context else []
        return "\n".join(parts).rstrip() + "\n"
    wrap = textwrap.TextWrapper(width=119, subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)
    parts = [f"== {layout_id}: {title} ==", wrap.fill(f"Source: {source}"), *map(wrap.fill, settings(meta))]
    parts += [f"!! {line}" for line in meta.get("header", ())]
    parts += [frame.to_string(), wrap.fill(legend)]
    parts += [wrap.fill(f"  * {note}") for note in notes]
    parts += [apart, *[wrap.fill(f"  * {line}") for line in context]] if context else []
    return "\n".join(parts)
