"""run.py's inversion and generation tasks end to end on the toy world (toy model, toy backbones of the iCD metric
suite), the iCD benchmark CSVs as a dataset, and what the harness says when a task cannot run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from editlab.evaluation import tables
from editlab.evaluation.icd_benchmark import IcdCsvDataset
from editlab.evaluation.paper_metrics import ICDPaperMetrics
from editlab.experiments.harness import item_seed

TOY = ("experiment=toy", "metrics=icd_paper_toy", "logger=none", "dataset.limit=3", "warmup=false")


def test_inversion_task_scores_reconstructions_with_the_icd_suite_and_fid(call_main, tmp_path):
    out = tmp_path / "inv"
    done = call_main("run", *TOY, "editor=ddim", "editor.num_steps=8", "editor.guidance_scale=1",
                     "task=inversion", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr
    results = pd.read_csv(out / "results.csv")
    assert set(ICDPaperMetrics.columns) <= set(results.columns) and "clip_similarity_target_image" not in results
    assert (results["error"].isna()).all() and (results["nfe"] == 7 + 8).all()
    for key in ("clip_t", "clip_i", "dinov2", "psnr_uint8"):
        assert np.isfinite(results[key]).all(), key
    assert results["image_reward"].isna().all() and results["lpips_vgg"].isna().all()  # no toy backbone: NaN
    assert results["dinov2"].min() > 0.8  # a reconstruction looks like its source
    fid = json.loads((out / "set_metrics.json").read_text())["fid"]
    summary = pd.read_csv(out / "summary.csv")
    assert math.isfinite(fid) and summary.loc[summary["edit_type"] == "all", "fid"].item() == fid
    assert json.loads((out / "job.json").read_text())["config"]["task.name"] == "inversion"
    with Image.open(next((out / "annotation_images").rglob("*.png"))) as image:
        assert image.size == (32, 32)


def test_generation_task_with_icd_makes_one_image_per_caption(call_main, tmp_path):
    out = tmp_path / "gen"
    done = call_main("run", *TOY, "editor=icd", "task=generation", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 3 and (results["nfe"] == 4).all()  # 4 reverse steps
    assert np.isfinite(results["clip_t"]).all() and results["clip_i"].isna().all()  # nothing to pair with
    assert len(list((out / "annotation_images").rglob("*.png"))) == 3
    assert math.isfinite(json.loads((out / "set_metrics.json").read_text())["fid"])
    # FID against a folder of one's choosing: the generations themselves give about 0
    again = call_main("run", *TOY, "editor=icd", "task=generation", f"task.reference={out / 'annotation_images'}",
                      f"hydra.run.dir={tmp_path / 'again'}")
    assert again.returncode == 0, again.stderr
    assert abs(json.loads((tmp_path / "again" / "set_metrics.json").read_text())["fid"]) < 1e-2


def test_every_caption_gets_its_own_noise():
    seeds = {item_seed(1234, f"{k:012d}") for k in range(100)}
    assert len(seeds) == 100 and item_seed(1234, "a") == item_seed(1234, "a") != item_seed(1235, "a")


def test_a_task_that_cannot_run_says_why(call_main, tmp_path):
    done = call_main("run", "experiment=toy", "logger=none", "task=generation", "editor=icd",
                     f"hydra.run.dir={tmp_path / 'a'}")
    assert done.returncode == 1 and "task=generation has no source image" in done.stderr
    done = call_main("run", *TOY, "task=generation", "editor=icd", "task.reference=/nowhere",
                     f"hydra.run.dir={tmp_path / 'r'}")
    assert done.returncode == 1 and "task.reference=/nowhere is not a folder" in done.stderr
    done = call_main("run", *TOY, "task=inversion", "editor=direct_inversion", f"hydra.run.dir={tmp_path / 'b'}")
    assert done.returncode == 1
    assert "does not do task=inversion" in done.stderr and "ddim, ddim_p2p, icd, npi, null_text" in done.stderr
    done = call_main("run", "~experiment", "+paper=icd_sd15", "+rows/icd_inversion=G", "task=inversion",
                     "logger=none", f"hydra.run.dir={tmp_path / 'c'}")
    assert done.returncode == 1 and "paper.teacher is not set: give it on the command line" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_paper_row_without_its_files_is_a_failed_row_of_its_table(call_main, tmp_path):
    sweep = tmp_path / "sweep"
    done = call_main("run", "-m", "~experiment", "+paper=icd_sd15", "+rows/icd_inversion=G,teacher_unguided",
                     "task=inversion", "metrics=icd_paper_toy", "model=tiny", "dataset.limit=1", "logger=none",
                     f"hydra.sweep.dir={sweep}")
    assert done.returncode == 1  # a job of the sweep failed
    cells = tables.build_table("icd_table2", tables.find_jobs([sweep]))
    status = cells.drop_duplicates("row").set_index("row")["status"]
    assert status["G"] == "failed" and status["teacher_unguided"] == "ok" and status["K"] == "not run"
    assert "paper.teacher is not set" in " ".join(cells.attrs["notes"])


def write_benchmark(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name)
    csv = root / "editing.csv"
    csv.write_text(',file_name,old_caption,edited_caption,blended_words\n'
                   '0,a.jpg,a red circle,a blue circle,"(\'red\', \'blue\')"\n'
                   '1,b.jpg,a red square,a red triangle, \n')
    return csv


def test_icd_benchmark_csv_items(tmp_path):
    dataset = IcdCsvDataset(write_benchmark(tmp_path))
    first, second = dataset
    assert (first.source_prompt, first.target_prompt, first.blend_words) == ("a red circle", "a blue circle",
                                                                             ("red", "blue"))
    assert second.blend_words is None and dataset.image_file(second) == tmp_path / "b.jpg"
    assert dataset.load_mask(first, 32).sum() == 0  # no edit mask: every pixel is background
    captions = tmp_path / "captions.csv"
    captions.write_text("file_name,caption\na.jpg,\"a cat\non grass\"\na.jpg,another\n")
    captioned = IcdCsvDataset(captions, tmp_path)
    one, two = captioned
    assert (one.image_id, two.image_id, one.source_prompt) == ("a", "a_1", "a cat on grass")
    assert captioned.image_file(one) == captioned.image_file(two) == tmp_path / "a.jpg"
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,prompt\na.jpg,x\n")
    try:
        IcdCsvDataset(bad)
    except ValueError as err:
        assert "caption" in str(err) and "prompt" in str(err)
    else:
        raise AssertionError("a CSV without the benchmark's columns was read")


def test_run_py_edits_an_icd_benchmark_csv(call_main, tmp_path):
    (tmp_path / "bench").mkdir()
    csv = write_benchmark(tmp_path / "bench")
    inside = call_main("run", *TOY, "dataset=icd_csv", f"dataset.csv={csv}", "editor=ddim",
                       f"hydra.run.dir={tmp_path / 'bench' / 'out'}")
    assert inside.returncode == 1 and "edits would be written into the benchmark" in inside.stderr
    out = tmp_path / "out"
    done = call_main("run", *TOY, "dataset=icd_csv", f"dataset.csv={csv}", "metrics=icd_paper_toy", "editor=ddim",
                     "editor.num_steps=4", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr
    results = pd.read_csv(out / "results.csv", dtype={"image_id": str})
    assert list(results["image_id"]) == ["a", "b"] and results["error"].isna().all()
    assert "resized 48x40->32x32" in results["note"].iloc[0]
    assert (tmp_path / "bench" / "a.jpg").is_file() and (out / "annotation_images" / "a.png").is_file()
