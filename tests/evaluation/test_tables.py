"""editlab.evaluation.tables / evaluation.plots: published.yaml, matching jobs to the papers' rows, the files, the
plots, the sweep report. Synthetic job folders (job.json, results.csv, set_metrics.json) in tmp_path; offline and
fast."""

import io
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from editlab.evaluation import aggregate, plots, table_layouts, table_render, tables
from editlab.evaluation.metrics import PieBenchMetrics
from editlab.evaluation.paper_metrics import ICDPaperMetrics
from editlab.evaluation.summary import summarize
from editlab.evaluation.table_render import wide

LAYOUTS = yaml.safe_load(table_layouts.LAYOUTS_FILE.read_text())
ROW_COUNTS = {"piebench": 6, "flow_editors": 5, "gedit": 6, "imgedit": 6, "course_poster": 5, "icd_table1": 16,
              "icd_table2": 13,
              "icd_table5": 4, "icd_table3": 8, "icd_table4": 6, "icd_table6": 5, "icd_fig9": 4,
              "fast_editing": 17}
PIE_EDITORS = ("ddim_p2p", "null_text", "npi", "direct_inversion", "pix2pix_zero", "instruct_pix2pix")
PIE_RAW = {"structure_distance": 0.05, "psnr_unedit_part": 25.0, "lpips_unedit_part": 0.08, "mse_unedit_part": 0.004,
           "ssim_unedit_part": 0.8, "clip_similarity_source_image": 20.0, "clip_similarity_target_image": 24.0,
           "clip_similarity_target_image_edit_part": 21.0}


def make_job(folder: Path, editor: str = "ddim_p2p", *, paper_row: str | None = None, task: str | None = None,
             metrics: str | None = None, label: str | None = None, values: dict | None = None, items: int = 3,
             edit_types=("1", "2", "9"), set_metrics: dict | None = None, mtime: float | None = None,
             extra: dict | None = None, error: str = "") -> Path:
    """A job folder as run.py leaves it: job.json (flattened config, paper_row), results.csv, set_metrics.json."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"editor.name": editor, "model.name": "sd14", "precision.name": "fp32", "offload.name": "none",
              "dataset.name": "pie_bench", **(extra or {})}
    config |= {k: v for k, v in (("task.name", task), ("metrics.kind", metrics), ("metrics.label", label)) if v}
    (folder / "job.json").write_text(json.dumps({"config": config, "paper_row": paper_row, "wandb_id": "x",
                                                 "dataset_root": None}))
    if error:
        (folder / "job_error.txt").write_text(error + "\n")
    if items:
        keys = ICDPaperMetrics.columns if metrics == "icd_paper" else PieBenchMetrics.columns
        values = {**(dict.fromkeys(keys, 0.5) if metrics == "icd_paper" else PIE_RAW), **(values or {})}
        types = [edit_types[k % len(edit_types)] for k in range(items)]
        rows = [{"run": f"editor={editor}", "editor": editor, "model": "sd14", "precision": "fp32",
                 "image_id": f"{types[k]}{k:011d}", "edit_type": types[k],
                 **{key: (v[k] if isinstance(v, (list, tuple)) else v) for key, v in values.items()},
                 "seconds": 2.0, "nfe": 100, "backward_passes": 0, "peak_mem_mb": 1024.0 * (k + 1), "error": "",
                 "note": ""} for k in range(items)]
        pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    if set_metrics is not None:
        (folder / "set_metrics.json").write_text(json.dumps(set_metrics))
    if mtime is not None:
        os.utime(folder / "job.json", (mtime, mtime))
    return folder


def cells(table: pd.DataFrame, row: str) -> pd.DataFrame:
    return table[table["row"] == row].set_index("column")


# ------------------------------------------------------------------------------------------------ published.yaml
def test_every_layout_loads_with_a_source_rows_and_numbers_under_declared_columns():
    assert tables.load_layouts().keys() == LAYOUTS.keys() == ROW_COUNTS.keys()
    for layout_id, layout in LAYOUTS.items():
        assert layout["source"].strip() and layout["title"].strip(), layout_id
        assert layout["task"] in ("edit", "inversion", "generation"), layout_id
        keys = [c["key"] for c in layout["columns"]]
        assert len(set(keys)) == len(keys) and all(c.get("name") and c.get("direction") in "↑↓"
                                                   for c in layout["columns"]), layout_id
        assert len(layout["rows"]) == ROW_COUNTS[layout_id], layout_id
        for row in layout["rows"]:
            assert row.get("id") and row.get("label"), (layout_id, row)
            for key, value in (row.get("published") or {}).items():
                assert key in keys, (layout_id, row["id"], key)
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (layout_id, row["id"], key)
    # spot checks of values as the papers print them (PnP Inversion Table 1; FireFlow Table 4; iCD Tables 1, 2, 4, 6)
    published = {(lid, r["id"]): r.get("published", {}) for lid, lay in LAYOUTS.items() for r in lay["rows"]}
    assert published["piebench", "ddim_p2p"]["struct_x1e3"] == 69.43
    assert published["piebench", "direct_inversion"]["clip_edited"] == 22.10
    assert published["flow_editors", "fireflow"] == {"struct_x1e3": 27.1, "psnr": 23.03, "ssim_x1e2": 82.49,
                                                     "clip_whole": 26.02, "clip_edited": 22.81, "nfe": 18}
    assert published["flow_editors", "rf_solver"]["nfe"] == 60 and not published["flow_editors", "flowedit"]
    assert published["icd_table2", "K"] == {"lpips_vgg": 0.273, "dinov2": 0.749, "psnr_uint8": 19.66}
    assert published["icd_table5", "icd4_unguided"] == published["icd_table2", "G"]
    assert published["icd_table1", "enc_cfg__dec_cfg"]["fid"] == 102.1
    assert published["icd_table4", "cd3_dcfg07"]["image_reward"] == -0.351
    assert published["icd_table6", "null_text"]["seconds"] == 116.4
    assert not any(published["icd_fig9", r] for r in ("icd3", "icd4", "null_text", "npi"))
    assert not any(published["course_poster", r["id"]] for r in LAYOUTS["course_poster"]["rows"])
    fast = {r["id"] for r in LAYOUTS["fast_editing"]["rows"]}
    assert {f"{m}_{p}_{c}_{o}" for m in ("ssd1b", "sdxl") for p in ("fp32", "fp16") for c in ("full", "small")
            for o in ("none", "model")} | {"reference_ddim_p2p"} == fast


def test_a_published_number_under_no_declared_column_is_refused(tmp_path):
    broken = {"x": {"title": "t", "source": "s", "task": "edit", "columns": [{"key": "psnr", "name": "PSNR"}],
                    "rows": [{"id": "a", "label": "A", "published": {"ssim_x1e2": 1.0}}]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(ValueError, match="ssim_x1e2"):
        tables.load_layouts(tmp_path / "bad.yaml")


# ------------------------------------------------------------------------------------------------ building tables
def test_a_piebench_table_has_every_row_with_ours_beside_the_paper_and_the_difference(tmp_path):
    for k, editor in enumerate(PIE_EDITORS):
        make_job(tmp_path / "sweep" / f"{k}_editor={editor}", editor,
                 values={"structure_distance": [0.01 * (k + 1), 0.01 * (k + 1), 0.04 * (k + 1)]})
    table = tables.build_table("piebench", tables.find_jobs([tmp_path / "sweep"]))
    assert list(dict.fromkeys(table["row"])) == list(PIE_EDITORS)  # the paper's order
    assert list(dict.fromkeys(table["column"])) == [c["key"] for c in LAYOUTS["piebench"]["columns"]]
    published = {r["id"]: r.get("published", {}) for r in LAYOUTS["piebench"]["rows"]}
    for k, editor in enumerate(PIE_EDITORS):
        row = cells(table, editor)
        assert (row["status"] == "ok").all() and row["n"].iloc[0] == 3
        assert row.loc["struct_x1e3", "ours"] == pytest.approx(20.0 * (k + 1))  # mean of 10, 10, 40 (x k+1), x1e3
        assert row.loc["ssim_x1e2", "ours"] == pytest.approx(80.0) and row.loc["mse_x1e4", "ours"] == pytest.approx(40)
        assert row.loc["clip_whole", "ours"] == 24.0 and row.loc["nfe", "ours"] == 100
        for key, value in published[editor].items():
            assert row.loc[key, "paper"] == value
            assert row.loc[key, "diff"] == pytest.approx(row.loc[key, "ours"] - value)
        assert np.isfinite(row.loc[list(published[editor]), "ours"]).all()
    assert table.loc[(table["row"] == "npi") & (table["column"] == "seconds"), "paper"].isna().all()
    assert "-49.43" not in tables.render(table)  # Δ only on request
    text = tables.render(table, delta=True)
    assert "DDIM + P2P" in text and "69.43" in text and "-49.43" in text  # ours 20.00 - paper 69.43


def test_rows_without_a_job_are_not_run_and_not_an_error(tmp_path):
    make_job(tmp_path / "a", "ddim_p2p")
    make_job(tmp_path / "b", "null_text")
    table = tables.build_table("piebench", tables.find_jobs([tmp_path]))
    status = table.drop_duplicates("row").set_index("row")["status"]
    assert status.to_dict() == {"ddim_p2p": "ok", "null_text": "ok", "npi": "not run", "direct_inversion": "not run",
                                "pix2pix_zero": "not run", "instruct_pix2pix": "not run"}
    assert cells(table, "npi")["ours"].isna().all() and cells(table, "npi").loc["psnr", "paper"] == 26.21
    laid_out = wide(table, "tex", delta=True)
    assert laid_out.loc["NPI + P2P", ("PSNR dB $\\uparrow$", "ours")] == "--"  # not run
    assert laid_out.loc["NPI + P2P", ("PSNR dB $\\uparrow$", "paper")] == "26.21"
    lpips = ("LPIPS $\\times$10$^{3}$ $\\downarrow$", "$\\Delta$")
    assert laid_out.loc["DDIM + P2P", lpips] == "-128.80"  # 80 - 208.80
    assert wide(table).loc["NPI + P2P", "PSNR dB ↑"] == "– / 26.21"
    empty = tables.build_table("icd_table3", [])  # nothing at all: every row "not run", published-only ones said so
    assert set(empty["status"]) == {"not run", "not run (not in editlab)"} and empty["ours"].isna().all()


def test_rows_are_found_by_paper_row_by_match_and_by_alias(tmp_path):
    make_job(tmp_path / "sweep" / "0", "my_npi_variant", paper_row="npi")  # paper_row wins over editor.name
    make_job(tmp_path / "sweep" / "1", "ddim_p2p")  # match: editor.name
    for k, row in enumerate(("G", "K", "A")):
        make_job(tmp_path / "sweep" / f"inv{k}", "icd", paper_row=row, task="inversion", metrics="icd_paper",
                 values={"lpips_vgg": 0.1 * (k + 1)})
    make_job(tmp_path / "sweep" / "wrong_task", "icd", paper_row="B", task="edit", metrics="icd_paper")
    jobs = tables.find_jobs([tmp_path / "sweep"])
    pie = tables.build_table("piebench", jobs).drop_duplicates("row").set_index("row")
    assert pie.loc["npi", "job"] == "0" and pie.loc["ddim_p2p", "job"] == "1"
    assert pie.loc["direct_inversion", "status"] == "not run"
    table2 = tables.build_table("icd_table2", jobs)
    assert cells(table2, "G").loc["lpips_vgg", "ours"] == pytest.approx(0.1)
    assert cells(table2, "K").loc["lpips_vgg", "ours"] == pytest.approx(0.2)
    assert cells(table2, "K").loc["lpips_vgg", "diff"] == pytest.approx(0.2 - 0.273)
    assert cells(table2, "B")["status"].iloc[0] == "not run"  # an edit job does not fill an inversion row
    table5 = tables.build_table("icd_table5", jobs)  # G and K fill the 4-step rows (aliases)
    assert cells(table5, "icd4_guided_dcfg").loc["lpips_vgg", "ours"] == pytest.approx(0.2)
    assert cells(table5, "icd3_unguided")["status"].iloc[0] == "not run"


def test_the_flow_rows_tell_the_solver_and_the_steps_apart_without_paper_row(tmp_path):
    for k, (solver, steps) in enumerate((("midpoint", 15), ("fireflow", 15), ("fireflow", 8), ("euler", 15))):
        make_job(tmp_path / f"{k}", "rf_solver", values={"psnr_unedit_part": 20.0 + k},
                 extra={"editor.solver": solver, "editor.num_steps": steps})
    table = tables.build_table("flow_editors", tables.find_jobs([tmp_path])).drop_duplicates("row").set_index("row")
    assert table.loc["rf_solver", "job"] == "0" and table.loc["fireflow_15", "job"] == "1"
    assert table.loc["fireflow", "job"] == "2"  # the Euler job fills no row
    assert (table.loc[["rf_inversion", "flowedit"], "status"] == "not run").all()


def test_a_macro_column_averages_the_edit_types_means_and_the_bare_key_the_items(tmp_path, monkeypatch):
    layout = {"m": {"title": "t", "source": "s", "task": "edit", "rows": [{"id": "a", "label": "A",
                                                                         "match": {"editor.name": "ddim_p2p"}}],
                    "columns": [{"key": "score", "name": "micro", "direction": "↑"},
                                {"key": "score_macro", "of": "score", "mean": "macro", "name": "macro",
                                 "direction": "↑"}]}}
    (tmp_path / "layouts.yaml").write_text(yaml.safe_dump(layout, allow_unicode=True))
    # type "1": three items of 1.0; type "2": one item of 5.0 -> micro 2.0, macro 3.0
    make_job(tmp_path / "job", values={"score": [1.0, 1.0, 1.0, 5.0]}, items=4, edit_types=("1", "1", "1", "2"))
    layouts = tables.load_layouts(tmp_path / "layouts.yaml")
    jobs = tables.find_jobs([tmp_path / "job"])
    monkeypatch.setattr(table_layouts, "load_layouts", lambda path=None: layouts)
    (row,) = table_layouts.resolve("m", jobs)
    assert row.values == {"score": pytest.approx(2.0), "score_macro": pytest.approx(3.0)}
    make_job(tmp_path / "job", values={"score": [1.0, 1.0, 1.0, math.nan]}, items=4, edit_types=("1", "1", "1", "2"))
    (row,) = table_layouts.resolve("m", tables.find_jobs([tmp_path / "job"]))
    assert row.values["score"] == pytest.approx(1.0) and math.isnan(row.values["score_macro"])  # type 2: none scored
    assert "score_macro: undefined, no scored item of type 2" in row.notes
    broken = {"m": {**layout["m"], "columns": [{"key": "x", "name": "x", "direction": "↑", "mean": "median"}]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(broken, allow_unicode=True))
    with pytest.raises(ValueError, match="mean: macro"):
        tables.load_layouts(tmp_path / "bad.yaml")


def test_judged_rows_show_the_papers_numbers_only_beside_the_same_judge_and_count_what_was_scored(tmp_path):
    gpt = {"metrics.backend.name": "openai_compat", "metrics.backend.model": "gpt-4.1"}
    qwen7b = {"metrics.backend.name": "transformers", "metrics.backend.path": "Qwen/Qwen2.5-VL-7B-Instruct"}
    # two task types: "a" 2 items of O 6 (one failed), "b" 2 items of O 8 -> micro 7.33, macro 7.0
    scores = {"gedit_sc": [6.0, math.nan, 8.0, 8.0], "gedit_pq": [6.0, math.nan, 8.0, 8.0],
              "gedit_o": [6.0, math.nan, 8.0, 8.0]}
    for name, editor, judge in (("kontext", "flux_kontext", gpt), ("qwen", "qwen_image_edit", qwen7b)):
        folder = make_job(tmp_path / "sweep" / name, editor, metrics="gedit_judge", values=scores, items=4,
                          edit_types=("a", "a", "b", "b"),
                          extra={**judge, "model.name": "qwen_image_edit" if editor == "qwen_image_edit" else ""})
        results = pd.read_csv(folder / "results.csv", dtype={"image_id": str, "edit_type": str, "note": str})
        results.loc[1, "note"] = "gedit_o failed (judge parse_error: no JSON object): left out of its mean"
        results.to_csv(folder / "results.csv", index=False)
    table = tables.build_table("gedit", tables.find_jobs([tmp_path / "sweep"]))
    kontext, qwen = cells(table, "flux_kontext"), cells(table, "qwen_image_edit")
    assert kontext.loc["gedit_o", "ours"] == pytest.approx(22 / 3)
    assert kontext.loc["gedit_o_macro", "ours"] == pytest.approx(7.0)
    assert kontext.loc["gedit_o_macro", "paper"] == 6.00  # the same judge: beside ours
    assert qwen.loc["gedit_o_macro", "ours"] == pytest.approx(7.0) and math.isnan(qwen.loc["gedit_o_macro", "paper"])
    notes = " ".join(table.attrs["notes"])
    assert ("Qwen-Image-Edit: the paper's numbers are GPT-4.1's; this row's judge is "
            "Qwen/Qwen2.5-VL-7B-Instruct") in notes
    assert "gedit_o: scored 3 / 4 items (failed: parse_error 1)" in notes
    not_run = cells(table, "instruct_pix2pix")
    assert not_run.loc["gedit_o_macro", "paper"] == 3.68  # a row not run shows the paper's numbers alone


def test_a_post_hoc_judging_pass_fills_the_judged_columns_of_its_job(tmp_path):
    folder = make_job(tmp_path / "sweep" / "0", "flux_kontext", metrics="none", items=4,
                      edit_types=("a", "b", "b", "b"))
    ids = pd.read_csv(folder / "results.csv", dtype={"image_id": str})["image_id"]
    judged = folder / "judge_gedit"
    judged.mkdir()
    o = [4.0, 8.0, 6.0, math.nan]  # type a: 4; type b: 8, 6 and a failed call -> micro 6.0, macro 5.5
    pd.DataFrame({"key": ids, "task_type": ["a", "b", "b", "b"], "gedit_sc": o, "gedit_pq": o, "gedit_o": o,
                  "status": ["ok", "ok", "ok", "api_error"], "message": ["", "", "", "HTTP 429"]}
                 ).to_csv(judged / "judge_scores.csv", index=False)
    (judged / "judge.json").write_text(json.dumps({"judge": "gpt-4.1", "backend": "openai_compat"}))
    (job,) = tables.find_jobs([tmp_path / "sweep"])
    assert job.judge == "gpt-4.1" and "gedit_judge" in job.metrics_kinds
    table = tables.build_table("gedit", [job])
    kontext = cells(table, "flux_kontext")
    assert kontext.loc["gedit_o", "ours"] == pytest.approx(6.0)
    assert kontext.loc["gedit_o_macro", "ours"] == pytest.approx(5.5)
    assert kontext.loc["gedit_o_macro", "paper"] == 6.0  # judged by GPT-4.1: beside the paper's
    assert table.attrs["ran"].endswith("judge gpt-4.1")
    by_type = pd.DataFrame(table.attrs["per_type"]).set_index("type")  # the per-type table beside it
    assert by_type.loc["a", "gedit_o"] == 4.0 and by_type.loc["b", "gedit_o"] == pytest.approx(7.0)
    assert list(by_type["scored"]) == ["1 / 1", "2 / 3"]
    files = tables.write_outputs(table, tmp_path / "out", [job], plots=False)
    assert {f.name for f in files} >= {"table_gedit_per_type.csv", "table_gedit_per_type.md"}
    assert "gedit_sc, gedit_pq, gedit_o: scored 3 / 4 items (failed: api_error 1)" in " ".join(table.attrs["notes"])


def test_the_latest_configuration_of_a_row_is_shown_with_a_note_and_shards_merge(tmp_path):
    make_job(tmp_path / "old", "ddim_p2p", values={"psnr_unedit_part": 10.0}, mtime=1_000_000)
    make_job(tmp_path / "new", "ddim_p2p", values={"psnr_unedit_part": 30.0}, extra={"editor.num_steps": 10},
             mtime=2_000_000)
    make_job(tmp_path / "shard0", "null_text", items=2, extra={"dataset.shard": 0})
    shard = make_job(tmp_path / "shard1", "null_text", items=0)
    pd.DataFrame([{"run": "r", "editor": "null_text", "model": "sd14", "precision": "fp32", "image_id": "9" * 12,
                   "edit_type": "9", **PIE_RAW, "seconds": 1.0, "nfe": 1, "peak_mem_mb": 1.0, "error": "",
                   "note": ""}]).to_csv(shard / "results.csv", index=False)
    (shard / "job.json").write_text((tmp_path / "shard0" / "job.json").read_text())  # same configuration
    table = tables.build_table("piebench", tables.find_jobs([tmp_path]))
    assert cells(table, "ddim_p2p").loc["psnr", "ours"] == 30.0 and cells(table, "ddim_p2p")["job"].iloc[0] == "new"
    assert any("2 configurations" in note and "old" in note for note in table.attrs["notes"])
    assert cells(table, "null_text")["n"].iloc[0] == 3 and "shards" in cells(table, "null_text")["job"].iloc[0]


def test_a_failed_job_is_marked_failed(tmp_path):
    make_job(tmp_path / "0", "ddim_p2p", items=0, error="RunError: out of GPU memory")
    table = tables.build_table("piebench", tables.find_jobs([tmp_path]))
    assert cells(table, "ddim_p2p")["status"].iloc[0] == "failed"
    assert any("out of GPU memory" in note for note in table.attrs["notes"])


def test_toy_metrics_are_named_in_a_header_line(tmp_path):
    make_job(tmp_path / "0", "ddim_p2p", label="toy")
    make_job(tmp_path / "1", "npi")
    table = tables.build_table("piebench", tables.find_jobs([tmp_path]))
    assert len(table.attrs["header"]) == 1 and "toy" in table.attrs["header"][0]
    assert "DDIM + P2P" in table.attrs["header"][0] and "NPI + P2P" not in table.attrs["header"][0]
    assert any(line.startswith("!! TOY METRICS") and "not comparable" in line
               for line in tables.render(table).splitlines())
    clean = tables.build_table("piebench", tables.find_jobs([tmp_path / "1"]))
    assert clean.attrs["header"] == [] and "TOY" not in tables.render(clean)


def test_set_metrics_and_peak_memory(tmp_path):
    for k, row in enumerate(("ddim50", "cd4")):
        make_job(tmp_path / str(k), "icd", paper_row=row, task="generation", metrics="icd_paper",
                 set_metrics={"fid": 20.0 + k, "note": "text is ignored"}, values={"image_reward": 0.1})
    table = tables.build_table("icd_table4", tables.find_jobs([tmp_path]))
    assert cells(table, "cd4").loc["fid", "ours"] == 21.0
    assert cells(table, "cd4").loc["fid", "diff"] == pytest.approx(21.0 - 18.45)
    assert cells(table, "ddim50").loc["image_reward", "diff"] == pytest.approx(0.1 - 0.201)
    assert cells(table, "cd3")["status"].iloc[0] == "not run"


def _edit(folder: Path, rel: str, value: int, size: int = 32) -> None:
    path = folder / "annotation_images" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size, 3), value, np.uint8)
    pixels[: size // 2] = 255 - value
    Image.fromarray(pixels).save(path)


def test_fast_editing_measures_quality_against_the_reference_edits(tmp_path):
    reference = make_job(tmp_path / "ref", "ddim_p2p", paper_row="reference_ddim_p2p")
    fast = make_job(tmp_path / "fast", "lcm_controlnet", paper_row="ssd1b_fp16_small_none")
    for rel, value in (("1_change_object_80/a.png", 100), ("9_change_style_80/b.png", 50)):
        _edit(reference, rel, value)
    _edit(fast, "1_change_object_80/a.png", 110, size=64)  # another size: resized to the reference's
    _edit(fast, "9_change_style_80/b.png", 50)
    table = tables.build_table("fast_editing", tables.find_jobs([tmp_path]))
    row = cells(table, "ssd1b_fp16_small_none")
    # (a) differs by 10 grey levels everywhere (exactly, after a Lanczos resize of flat halves away from the
    # seam; the seam blurs a little), (b) is identical: PSNR inf is left out, MSE and SSIM average both
    assert row.loc["ref_mse_x1e4", "ours"] == pytest.approx(1e4 * (10 / 255) ** 2 / 2, rel=0.25)
    assert 25 < row.loc["ref_psnr", "ours"] < 30 and 50 < row.loc["ref_ssim_x1e2", "ours"] < 100
    assert row.loc[["ref_lpips_x1e3", "ref_clip", "ref_dino"], "ours"].isna().all()
    assert row.loc["peak_mem_gb", "ours"] == pytest.approx(3.0) and row[["paper", "diff"]].isna().all().all()
    assert cells(table, "reference_ddim_p2p")["status"].iloc[0] == "reference"
    assert any("not computed" in note and "LPIPS" in note for note in table.attrs["notes"])
    assert any("2 edits" in note and "resized" in note for note in table.attrs["notes"])


# ------------------------------------------------------------------------------------------------ files
def test_md_tex_and_csv_are_written_and_the_csv_parses_back(tmp_path):
    make_job(tmp_path / "sweep" / "0", "ddim_p2p", label="toy")
    make_job(tmp_path / "sweep" / "1_editor=direct_inversion", "direct_inversion")
    jobs = tables.find_jobs([tmp_path / "sweep"])
    table = tables.build_table("piebench", jobs)
    files = tables.write_outputs(table, tmp_path / "out", jobs, plots=False)
    assert [f.name for f in files] == ["table_piebench.md", "table_piebench.tex", "table_piebench.csv"]
    back = pd.read_csv(tmp_path / "out" / "table_piebench.csv", dtype={"group": str})
    assert len(back) == 6 * len(LAYOUTS["piebench"]["columns"]) and list(back.columns) == list(tables.TIDY_COLUMNS)
    pd.testing.assert_frame_equal(back[["row", "column", "ours", "paper", "diff"]],
                                  table[["row", "column", "ours", "paper", "diff"]], check_dtype=False)
    md = (tmp_path / "out" / "table_piebench.md").read_text()
    assert "| DDIM + P2P" in md and "TOY METRICS" in md and "– / 27.03" in md  # NTI: not run
    assert md.count("\n|") == 2 + 6  # header, rule, one line per row
    tex = (tmp_path / "out" / "table_piebench.tex").read_text()
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    assert all(rule in body for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\multicolumn{2}{c}"))
    assert re.search(r"(?<!\\)_", body) is None  # every underscore escaped
    assert not re.search(r"[↑↓Δ×τ]", body) and r"$\downarrow$" in body


# ------------------------------------------------------------------------------------------------ plots
def _png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 15_000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plots_are_written_as_readable_pngs(tmp_path):
    for k, editor in enumerate(PIE_EDITORS[:4]):
        make_job(tmp_path / "pie" / str(k), editor, values={"structure_distance": 0.01 * (k + 1),
                                                            "clip_similarity_target_image": 20.0 + k})
    jobs = tables.find_jobs([tmp_path / "pie"])
    files = tables.write_outputs(tables.build_table("piebench", jobs), tmp_path / "out", jobs)
    names = {f.name for f in files}
    assert {"plot_piebench_quality_vs_cost.png", "plot_piebench_per_edit_type_bars.png"} <= names
    width, height = _png(tmp_path / "out" / "plot_piebench_quality_vs_cost.png")
    assert width >= 900 and height >= 600
    _png(tmp_path / "out" / "plot_piebench_per_edit_type_bars.png")

    for k, row in enumerate(("teacher_unguided", "A", "G")):
        make_job(tmp_path / "inv" / str(k), "icd", paper_row=row, task="inversion", metrics="icd_paper")
    for k, row in enumerate(("icd3", "icd4", "null_text")):
        make_job(tmp_path / "fig9" / str(k), "icd", paper_row=row, metrics="icd_paper",
                 values={"dinov2": 0.6 + 0.1 * k, "clip_t": 0.25 - 0.01 * k})
    make_job(tmp_path / "xl" / "0", "icd_sdxl", paper_row="icd_xl_piebench", metrics="icd_paper")
    make_job(tmp_path / "xl" / "1", "icd_sdxl", paper_row="icd_xl_coco", metrics="icd_paper",
             values={"dinov2": 0.4})
    for layout_id, folder, kind in (("icd_table2", "inv", "inversion_ablation"), ("icd_fig9", "fig9", "fig9_scatter"),
                                    ("icd_table3", "xl", "quality_vs_cost")):
        jobs = tables.find_jobs([tmp_path / folder])
        tables.write_outputs(tables.build_table(layout_id, jobs), tmp_path / "out", jobs)
        _png(tmp_path / "out" / f"plot_{layout_id}_{kind}.png")


def test_pareto_front_and_nothing_to_draw():
    from editlab.evaluation import plots

    front = plots.pareto_front([1, 2, 3, 2.5], [1, 3, 4, 2], lower_x_better=True, lower_y_better=False)
    assert list(front) == [0, 1, 2]  # (2.5, 2) is beaten by (2, 3)
    empty = pd.DataFrame({"label": ["a"], "x": [math.nan], "y": [1.0], "size": [1.0]})
    assert plots.quality_vs_cost(empty, Path("never.png"), x_label="x", y_label="y", size_label="s") is None
    assert not Path("never.png").exists()


# ------------------------------------------------------------------------------------------------ auto, report, CLI
def toy_tour(folder: Path) -> Path:
    for k, editor in enumerate(("identity", *PIE_EDITORS, "icd")):
        make_job(folder / f"{k}_editor={editor}", editor, label="toy", extra={"model.name": "toy"})
    return folder


def test_auto_picks_the_layouts_the_jobs_were_run_for(tmp_path):
    for k, editor in enumerate(PIE_EDITORS):
        make_job(tmp_path / "pie" / str(k), editor)
    assert tables.matching_layouts(tables.find_jobs([tmp_path / "pie"])) == ["piebench"]
    assert tables.matching_layouts(tables.find_jobs([toy_tour(tmp_path / "tour")])) == []
    for k, row in enumerate(("A", "B", "G", "K")):
        make_job(tmp_path / "inv" / str(k), "icd", paper_row=row, task="inversion", metrics="icd_paper")
    assert tables.matching_layouts(tables.find_jobs([tmp_path / "inv"])) == ["icd_table2"]  # not Table 5 (aliases)
    for k, row in enumerate(("icd3_unguided", "icd4_unguided", "icd_sd15", "null_text")):
        make_job(tmp_path / "mixed" / str(k), "icd", paper_row=row, task="inversion", metrics="icd_paper")
        make_job(tmp_path / "two" / f"table{5 + k // 2}" / str(k), "icd", paper_row=row, task="inversion",
                 metrics="icd_paper")
    assert tables.matching_layouts(tables.find_jobs([tmp_path / "mixed"])) == []  # one sweep of two tables
    assert tables.matching_layouts(tables.find_jobs([tmp_path / "two"])) == ["icd_table5", "icd_table6"]
    (tmp_path / "two" / "multirun.yaml").write_text("{}\n")  # one Hydra sweep after all
    assert tables.matching_layouts(tables.find_jobs([tmp_path / "two"])) == []
    make_job(tmp_path / "one" / "0", "ddim_p2p")  # one row: not enough
    assert tables.matching_layouts(tables.find_jobs([tmp_path / "one"])) == []
    fast = [make_job(tmp_path / "fast" / "ref", "ddim_p2p", paper_row="reference_ddim_p2p")]
    fast += [make_job(tmp_path / "fast" / str(k), "lcm_controlnet", paper_row=row)
             for k, row in enumerate(("sdxl_fp16_full_none", "ssd1b_fp16_small_none"))]
    assert tables.matching_layouts(tables.find_jobs([tmp_path / "fast"])) == ["fast_editing"]
    (tmp_path / "multirun.yaml").write_text("{}\n")  # above the folders given: never looked at
    separate = tables.find_jobs([tmp_path / "fast" / "ref", tmp_path / "fast" / "0", tmp_path / "fast" / "1"])
    assert [table_layouts.sweep_of(job) for job in separate] == [tmp_path / "fast"] * 3
    poster = [make_job(tmp_path / "poster" / e, e, paper_row=e) for e in ("ddim_p2p", "null_text", "icd")]
    assert tables.matching_layouts(poster_jobs := tables.find_jobs([tmp_path / "poster"])) == ["course_poster"]
    assert len(poster) == 3 and tables.matching_layouts([*poster_jobs, *tables.find_jobs([tmp_path / "pie"])]) == [
        "piebench", "course_poster"]  # two sweeps given together: each one's table


def test_the_sweep_report_prints_a_matching_table_and_nothing_for_the_toy_tour(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for k, editor in enumerate(PIE_EDITORS[:3]):
        make_job(sweep / f"{k}_editor={editor}", editor)
    aggregate.report(sweep)
    out = capsys.readouterr().out
    assert "== piebench:" in out and "NPI + P2P" in out and "69.43" in out
    assert "== piebench:" in (sweep / "report.txt").read_text()
    assert {"table_piebench.md", "table_piebench.tex", "table_piebench.csv",
            "plot_piebench_quality_vs_cost.png"} <= {p.name for p in sweep.iterdir()}

    tour = toy_tour(tmp_path / "tour")
    aggregate.report(tour)
    out = capsys.readouterr().out
    assert "==" not in out and "paper" not in out and not list(tour.glob("table_*")) and not list(tour.glob("plot_*"))
    assert out.strip().startswith(f"sweep {tour}: 24 items")


def test_a_failure_in_the_tables_does_not_lose_the_report(tmp_path, capsys, monkeypatch, caplog):
    sweep = tmp_path / "sweep"
    for k, editor in enumerate(PIE_EDITORS[:2]):
        make_job(sweep / str(k), editor)

    def broken(folder, wandb=None):
        raise RuntimeError("layout exploded")

    monkeypatch.setattr(tables, "sweep_tables", broken)
    with caplog.at_level(logging.ERROR, logger="editlab.evaluation.aggregate"):
        summary = aggregate.report(sweep)
    assert summary is not None and "layout exploded" in caplog.text
    assert "sweep" in (sweep / "report.txt").read_text() and "ddim_p2p" in capsys.readouterr().out


def test_the_command_lays_out_a_named_layout_and_says_when_nothing_matches(tmp_path, capsys):
    for k, row in enumerate(("icd_sd15", "npi")):
        make_job(tmp_path / "inv" / str(k), "icd", paper_row=row, task="inversion", values={"seconds": 1.0})
    assert tables.main([str(tmp_path / "inv"), "--layout", "icd_table6", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "iCD Table 6" in out and "0.959" in out and "not run (not in editlab)" in out
    back = pd.read_csv(tmp_path / "out" / "table_icd_table6.csv")
    icd = back[(back["row"] == "icd_sd15") & (back["column"] == "seconds")].iloc[0]
    assert icd["ours"] == 2.0 and icd["diff"] == pytest.approx(2.0 - 0.959)
    assert tables.main([str(toy_tour(tmp_path / "tour"))]) == 1
    assert "no layout matches" in capsys.readouterr().err


def test_superseded_results_and_wandb_folders_are_not_jobs(tmp_path):
    make_job(tmp_path / "0", "ddim_p2p")
    make_job(tmp_path / "0" / "superseded_20260101-000000_x", "ddim_p2p")
    make_job(tmp_path / "0" / "wandb" / "offline-run-x" / "files", "ddim_p2p")
    assert [job.name for job in tables.find_jobs([tmp_path, tmp_path / "0"])] == ["0"]


def test_summary_agrees_with_the_table(tmp_path):
    """The table's numbers are summarize's overall means of the row's results (no second averaging)."""
    job = make_job(tmp_path / "0", "ddim_p2p", values={"psnr_unedit_part": [20.0, 30.0, math.inf]})
    overall = summarize(pd.read_csv(job / "results.csv", dtype={"edit_type": str}).fillna({"error": ""}))
    overall = overall[overall["edit_type"] == "all"].iloc[0]
    table = tables.build_table("piebench", tables.find_jobs([tmp_path]))
    assert cells(table, "ddim_p2p").loc["psnr", "ours"] == overall["psnr"] == 25.0


def test_wandb_logs_the_tables_and_plots_to_an_offline_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data_dir = os.environ.get("WANDB_DATA_DIR")
    for k, editor in enumerate(PIE_EDITORS[:2]):
        make_job(tmp_path / "sweep" / str(k), editor)
    assert tables.main([str(tmp_path / "sweep"), "--layout", "piebench", "--wandb"]) == 0
    runs = list((tmp_path / "sweep" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and f"W&B run (offline): {runs[0]}" in capsys.readouterr().out
    media = runs[0] / "files" / "media"
    assert len(list(media.rglob("*.table.json"))) == 1 and len(list(media.rglob("*.png"))) == 2
    assert os.environ.get("WANDB_DATA_DIR") == data_dir  # W&B's staging folder pointed at the run only meanwhile


# ------------------------------------------------------------------------------------------------ issue 26, 3–8
def _piebench_run(folder: Path, **job) -> pd.DataFrame:
    for k, editor in enumerate(PIE_EDITORS):
        make_job(folder / f"{k}_editor={editor}", editor, values={"structure_distance": 0.01 * (k + 1)}, **job)
    return tables.build_table("piebench", tables.find_jobs([folder]))


def _table_lines(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("|")]


def test_a_table_fits_a_page_with_ours_beside_the_paper_and_the_best_marked(tmp_path):
    table = _piebench_run(tmp_path / "sweep")
    md, text, tex = (tables.render(table, fmt) for fmt in ("md", "text", "tex"))
    header = [cell.strip() for cell in _table_lines(md)[0].strip("|").split("|")]
    assert header == ["method", *[tables.header(c) for c in LAYOUTS["piebench"]["columns"]]]  # no job, no n
    assert max(map(len, _table_lines(md))) <= 200 and max(map(len, text.splitlines())) <= 160
    assert "| 10.00 / 69.43 |" in md.replace("**", "")  # ours / the paper's, per metric
    assert md.count("**10.00**") == 1 and "**11.65**" in md  # the best of ours and of the paper's Struct (↓)
    csv = pd.read_csv(io.StringIO(tables.render(table, "csv")))
    assert {"job", "n"} <= set(csv.columns) and (csv["n"] == 3).all()
    assert "\\begin{table*}" in tex and "\\resizebox{\\textwidth}" in tex  # 17 columns: the text width, scaled
    small = tables.render(tables.build_table("icd_table6", []), "tex")
    assert "\\begin{table}" in small and "resizebox" not in small  # fits a column as it is
    assert table_render.tex_width_pt(wide(table, "tex")) > table_render.TEXT_PT


def test_a_number_that_is_not_in_the_papers_table_is_context_never_a_difference(tmp_path):
    table = _piebench_run(tmp_path / "sweep")
    seconds = table[table["column"] == "seconds"]
    assert seconds["paper"].isna().all() and seconds["diff"].isna().all()
    text = tables.render(table, delta=True)
    assert "44.0" not in text.split("Not in the paper's table")[0]  # not in the table, not in a Δ
    assert any(line.startswith("DDIM + P2P: Time") and "44.0" in line for line in table.attrs["context"])
    broken = {"x": {"title": "t", "source": "s", "task": "edit", "columns": [{"key": "seconds", "name": "T"}],
                    "rows": [{"id": "a", "label": "A", "published": {"seconds": 1.0},
                              "context": {"seconds": {"value": 2.0, "source": "elsewhere"}}}]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(ValueError, match="context"):
        tables.load_layouts(tmp_path / "bad.yaml")


def test_rows_are_labelled_by_method_and_cite_the_papers_label(tmp_path):
    labels = [row["label"] for layout in LAYOUTS.values() for row in layout["rows"]]
    assert not [label for label in labels if re.search(r"\bours\b", label, re.IGNORECASE)]
    table = _piebench_run(tmp_path / "sweep")
    assert "Direct Inversion + P2P: the paper's row “Direct (Ours) | P2P”" in table.attrs["notes"]


def test_every_published_number_has_a_source_a_reader_can_open():
    text = table_layouts.LAYOUTS_FILE.read_text()
    assert not re.search(r"\w+\.md\b|shared/design|from memory", text)
    for layout_id, layout in LAYOUTS.items():
        rows = layout["rows"]
        if any(row.get("published") for row in rows):
            assert re.search(r"arXiv \d{4}\.\d{5}", layout["source"]), layout_id
        assert not [row["id"] for row in rows if row.get("published") and "unverified" in row.get("note", "")]
        for row in rows:
            for key, context in (row.get("context") or {}).items():
                assert re.search(r"https://|arXiv \d{4}\.\d{5}", context["source"]), (layout_id, row["id"], key)
    assert not next(r for r in LAYOUTS["piebench"]["rows"] if r["id"] == "instruct_pix2pix").get("published")


def test_captions_and_group_labels_describe_what_was_run(tmp_path):
    toy = {"model.name": "toy", "dataset.name": "builtin"}
    for k, (row, guidance) in enumerate((("teacher_unguided", {"editor.guidance_scale": 1.0}),
                                         ("teacher_guided", {"editor.guidance_scale": 3.0}),
                                         ("K", {"editor.code_guidance_scale": 2.0}))):
        make_job(tmp_path / "sweep" / f"{k}_{row}", "ddim", paper_row=row, task="inversion", metrics="icd_paper",
                 label="toy", items=10, extra={**toy, **guidance})
    table = tables.build_table("icd_table2", tables.find_jobs([tmp_path / "sweep"]))
    ran = table.attrs["ran"]
    assert "model toy" in ran and "data set builtin" in ran and "10 items per row" in ran
    assert "(teacher, classic CFG) 3" in ran and "(iCD, code units = classic − 1) 2" in ran
    md = tables.render(table, "md")
    ours = next(line for line in md.splitlines() if "Ours:" in line).split("Ours:")[1]
    assert "5k" not in ours and "w = 8" not in ours and "w = 8" not in " ".join(table["group"])
    assert not any(re.search(r"5k|w = 8", layout["title"]) for layout in LAYOUTS.values())


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots save, kept for a look at their axes and texts."""
    figures = []
    save = plots._save

    def keep(figure, path):
        figures.append(figure)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_the_inversion_ablation_leaves_out_what_has_no_numbers(tmp_path, drawn):
    for k, row in enumerate(("teacher_unguided", "G", "K")):
        make_job(tmp_path / "inv" / str(k), "icd", paper_row=row, task="inversion", metrics="icd_paper",
                 label="toy", values={"lpips_vgg": math.nan})
    jobs = tables.find_jobs([tmp_path / "inv"])
    tables.write_outputs(tables.build_table("icd_table2", jobs), tmp_path / "out", jobs)
    (figure,) = drawn
    panels = [ax for ax in figure.axes if ax.patches]
    assert [ax.get_xlabel() for ax in panels] == ["DINOv2 ↑", "PSNR dB ↑"]  # no LPIPS panel
    assert all(np.isfinite([bar.get_width() for bar in ax.patches]).all() and len(ax.patches) == 3 for ax in panels)
    assert [t.get_text() for legend in figure.legends for t in legend.get_texts()] == ["ours"]  # toy: no paper bars
    assert "left out" in figure._suptitle.get_text() and "LPIPS VGG" in figure._suptitle.get_text()


def test_per_edit_type_bars_show_how_many_items_each_bar_averages(tmp_path, drawn):
    make_job(tmp_path / "pie" / "0", "ddim_p2p", items=4, edit_types=("1", "2"))
    make_job(tmp_path / "pie" / "1", "npi", items=3, edit_types=("1", "2"))
    jobs = tables.find_jobs([tmp_path / "pie"])
    tables.write_outputs(tables.build_table("piebench", jobs), tmp_path / "out", jobs)
    (ax,) = next(f for f in drawn if f.axes[0].get_xlabel() == "PIE-Bench edit type").axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["DDIM + P2P (n = 4)", "NPI + P2P (n = 3)"]
    assert [t.get_text().split("\n")[1] for t in ax.get_xticklabels()] == ["n = 2", "n = 1–2"]


def test_quality_vs_cost_labels_do_not_overlap(tmp_path, drawn):
    close = ["Direct Inversion + P2P", "NTI + P2P", "NPI + P2P", "DDIM + P2P"]  # four points in one spot
    points = pd.DataFrame({"label": [*close, "DDIM + Pix2Pix-Zero"], "x": [10.0, 10.01, 10.02, 10.03, 60.0],
                           "y": [24.0, 24.001, 24.002, 24.003, 20.0], "size": [1, 2, 3, 4, 5]})
    plots.quality_vs_cost(points, tmp_path / "q.png", x_label="x", y_label="y", size_label="s")
    (figure,) = drawn
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in figure.axes[0].texts]
    assert len(boxes) == 5
    assert not [(a, b) for a in range(5) for b in range(a + 1, 5) if boxes[a].overlaps(boxes[b])]


def test_a_kill_while_writing_a_table_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    make_job(tmp_path / "sweep" / "0", "ddim_p2p", label="toy")
    jobs = tables.find_jobs([tmp_path / "sweep"])
    table = tables.build_table("piebench", jobs)
    tables.write_outputs(table, tmp_path / "out", jobs, plots=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    real = tables.render

    class Killed(BaseException):
        pass

    def dying(table, fmt, *args):
        if fmt == "tex":
            raise Killed
        return real(table, fmt, *args)

    monkeypatch.setattr(tables, "render", dying)
    with pytest.raises(Killed):
        tables.write_outputs(table, tmp_path / "out", jobs, plots=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # no 0-byte .md, no .tmp
