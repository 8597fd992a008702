"""The toy variants of the PIE-Bench table, the flow editors' table (FireFlow Table 4), the inversion table (iCD
Table 2) and the generation table (iCD Table 4) end to end: run.py's sweep, its report's paper table, and
`python -m editlab.evaluation.tables` on the sweep folder, with every expected row run and finite numbers beside the
published ones. Two items per job to stay quick."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from editlab.evaluation import tables

RUN = {  # the rows each toy variant runs; the other rows of the table stay "not run"
    "flow_editors": ["rf_inversion", "rf_solver", "fireflow_15", "fireflow", "flowedit"],
    "piebench": ["ddim_p2p", "null_text", "npi", "direct_inversion", "pix2pix_zero", "instruct_pix2pix"],
    "icd_table2": ["teacher_unguided", "teacher_guided", "teacher_guided_dcfg", "G", "K"],
    "icd_table4": ["ddim50", "cd4", "cd4_dcfg08", "cd4_dcfg07"],
}
NO_TOY_BACKBONE = {"lpips_vgg", "image_reward", "lpips_x1e3"}  # reported as unavailable on the toy world


@pytest.mark.parametrize("table", sorted(RUN))
def test_toy_paper_table_end_to_end(call_main, tmp_path, capsys, table):
    sweep = tmp_path / table
    logged = table == "icd_table4"  # one sweep with W&B (offline): its tables and plots get a run of their own
    done = call_main("run", f"experiment=paper/toy/{table}", "dataset.limit=2", *([] if logged else ["logger=none"]),
                     f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr
    assert f"== {table}:" in done.stdout and "TOY METRICS" in done.stdout  # the sweep report's paper table
    assert bool(list((sweep / "wandb").glob("offline-run-*"))) == logged

    assert tables.main([str(sweep), "--layout", table]) == 0
    printed = capsys.readouterr().out
    tidy = pd.read_csv(sweep / f"table_{table}.csv")
    layout = tables.load_layouts()[table]
    assert set(tidy["row"]) == {row["id"] for row in layout["rows"]}  # every row of the paper, run or not
    for row in RUN[table]:
        cells = tidy[tidy["row"] == row]
        assert (cells["status"] == "ok").all() and (cells["n"] == 2).all(), row
        published = cells[cells["paper"].notna() & ~cells["column"].isin(NO_TOY_BACKBONE)]
        row_published = next(r for r in layout["rows"] if r["id"] == row).get("published")
        assert len(published) or not row_published, f"{row} has no published number to compare with"
        for cell in published.itertuples():
            assert math.isfinite(cell.ours), (row, cell.column)
            assert cell.diff == pytest.approx(cell.ours - cell.paper), (row, cell.column)
        label = next(r["label"] for r in layout["rows"] if r["id"] == row)
        assert label in printed
    not_run = tidy[~tidy["row"].isin(RUN[table])]
    assert (not_run["status"] != "ok").all() and not_run["ours"].isna().all()
    for suffix in ("md", "tex"):
        assert (sweep / f"table_{table}.{suffix}").stat().st_size > 200
    assert list(sweep.glob(f"plot_{table}_*.png")), "the table's plots"
