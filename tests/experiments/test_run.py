"""run.py end to end on the tiny model over generated PIE-Bench-format folders: its Hydra main called in this
process with the command line's arguments, and as a true subprocess (as a user runs it) for the default tour and
one multirun sweep."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from editlab.evaluation.aggregate import CAPTION, HEADER, SIDEBAR
from editlab.evaluation.toyset import write_piebench
from editlab.experiments.harness import RESULT_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
FAST = ["model=tiny", "editor.num_steps=4", "warmup=false"]


ENV = {"WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}


def _with_defaults(args: tuple[str, ...]) -> tuple[str, ...]:
    """Without an experiment= argument, the plain defaults (~experiment: not the toy tour)."""
    return args if any(a.lstrip("~").startswith("experiment") for a in args) else (*args, "~experiment")


def _checked(proc, check: bool):
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_py_process(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`python run.py args` as a user runs it, for the few tests where the fresh process is the point (the default
    tour's console, a sweep's exit status); the others call it in this process (`run_py`)."""
    env = {**os.environ, "EDITLAB_CACHE": str(cache), **ENV}
    return _checked(subprocess.run([sys.executable, "run.py", *_with_defaults(args)], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=600), check)


@pytest.fixture
def run_py(call_main, monkeypatch):
    """run.py with `args`, in this process (see conftest's call_main): exit status, stdout and stderr as a
    subprocess would give them."""

    def run_(*args: str, cache: Path, check: bool = True):
        for key, value in {"EDITLAB_CACHE": str(cache), **ENV}.items():
            monkeypatch.setenv(key, value)
        return _checked(call_main("run", *_with_defaults(args)), check)

    return run_


def read_results(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "results.csv", dtype={"image_id": str, "edit_type": str, "error": str},
                       keep_default_na=False, na_values={"psnr_unedit_part": ["nan"]})


def test_single_run_writes_results_summary_images_and_offline_wandb(tmp_path, run_py):
    out = tmp_path / "run"
    proc = run_py(*FAST, "dataset.limit=3", f"hydra.run.dir={out}", cache=tmp_path / "cache")
    results = read_results(out)
    assert list(results.columns) == list(RESULT_COLUMNS)
    assert len(results) == 3 and (results["error"] == "").all()
    assert (results["nfe"] == 3 + 4).all()  # 4-step inversion (identity step skipped) + 4 batched edit steps
    assert (results["backward_passes"] == 0).all()
    assert results[["gt_psnr", "gt_ssim", "gt_mse"]].notna().all().all()  # the built-in set ships its true edits
    assert (results[["editor", "model", "precision"]].iloc[0] == ["ddim_p2p", "tiny", "fp32"]).all()
    assert (results["seconds"] > 0).all() and (results["peak_mem_mb"] > 0).all()
    summary = pd.read_csv(out / "summary.csv", dtype={"edit_type": str})
    assert "all" in set(summary["edit_type"]) and {"psnr", "mse_x1e4", "ssim_x1e2", "n"} <= set(summary.columns)
    assert int(summary.loc[summary["edit_type"] == "all", "n"].iloc[0]) == 3
    assert "psnr" in proc.stdout and "ddim_p2p" in proc.stdout  # the summary table is printed
    assert len(list((out / "annotation_images").rglob("*.png"))) == 3
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_multirun_sweep_gives_every_job_its_results_and_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py_process("-m", *FAST, "precision=fp32,bf16", "editor.num_steps=3,4", "dataset.limit=1",
                  f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache")
    # the sweep report: one headline line per job, the comparison grid (source, ground truth, 4 edits)
    assert "sweep " in proc.stdout and proc.stdout.count("ddim_p2p") >= 4 and "comparison grid" in proc.stdout
    with Image.open(sweep / "comparison.png") as grid:  # a label column, then source, truth and 4 edits of 64² x 2
        legend_band = grid.height - (HEADER + 128 + CAPTION)  # the legend's lines above the columns' headers
        assert grid.width == SIDEBAR + 6 * 128 and 14 <= legend_band <= 80
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "results.csv").exists())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        results = read_results(job)
        assert len(results) == 1 and (results["error"] == "").all()
        seen.add((results["precision"].iloc[0], int(results["nfe"].iloc[0])))
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        assert sweep.name.encode() in next(runs[0].glob("*.wandb")).read_bytes()  # W&B group = the sweep
    assert seen == {("fp32", 5), ("fp32", 7), ("bf16", 5), ("bf16", 7)}


def test_rerun_into_the_same_directory_skips_finished_items(tmp_path, run_py):
    out, cache = tmp_path / "run", tmp_path / "cache"
    run_py(*FAST, "dataset.limit=2", "logger=none", f"hydra.run.dir={out}", cache=cache)
    first = read_results(out)
    proc = run_py(*FAST, "dataset.limit=3", "logger=none", f"hydra.run.dir={out}", cache=cache)
    second = read_results(out)
    assert len(second) == 3 and second["image_id"].is_unique
    pd.testing.assert_frame_equal(second.iloc[:2], first)  # finished rows untouched
    assert "resuming: 2 of 3 items already done" in proc.stderr + proc.stdout


def _bad_input_set(root: Path) -> dict[str, str]:
    """A generated set with one item of each kind of bad input; returns image id -> what is wrong with it."""
    write_piebench(root, n_per_type=1, size=64, seed=0, edit_types=("1", "2", "3", "4", "5", "6", "7", "8", "9"))
    mapping = json.loads((root / "mapping_file.json").read_text())
    ids = sorted(mapping)
    image = lambda i: root / "annotation_images" / mapping[ids[i]]["image_path"]  # noqa: E731
    image(0).unlink()
    image(1).write_bytes(b"not an image")
    rgb = np.asarray(Image.open(image(2)))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA").save(image(2))
    grey16 = (np.asarray(Image.open(image(3)).convert("L")).astype(np.uint16) * 257)
    Image.fromarray(grey16).save(image(3))  # mode I;16
    mapping[ids[4]]["editing_prompt"] = "a " + "very " * 20 + "long prompt"
    mapping[ids[5]]["blended_word"] = "unicorn unicorn"
    Image.open(image(6)).resize((128, 128)).save(image(6))
    Image.open(image(7)).resize((96, 64)).save(image(7))
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return dict(zip(ids, ["missing", "corrupt", "rgba", "grey16", "long", "blend", "odd_size", "not_square", "fine"]))


def test_bad_inputs_get_error_rows_and_the_run_goes_on(tmp_path, run_py):
    root, out = tmp_path / "bad", tmp_path / "run"
    kinds = _bad_input_set(root)
    run_py(*FAST, "dataset=pie_bench", f"dataset.root={root}", "metrics=offline",
           "logger=none", f"hydra.run.dir={out}", cache=tmp_path / "cache")
    rows = read_results(out).set_index("image_id")
    by_kind = {kind: rows.loc[image_id] for image_id, kind in kinds.items()}
    assert "FileNotFoundError" in by_kind["missing"]["error"]
    assert "cannot read image" in by_kind["corrupt"]["error"]
    assert "at most 77" in by_kind["long"]["error"]
    assert "blend word 'unicorn'" in by_kind["blend"]["error"]
    assert "64x64 but its image is 96x64" in by_kind["not_square"]["error"]  # the mask cannot be placed on it
    for kind, note in (("rgba", "RGBA->RGB"), ("grey16", "16-bit"), ("odd_size", "resized 128x128->64x64")):
        assert by_kind[kind]["error"] == "" and note in by_kind[kind]["note"], (kind, by_kind[kind].to_dict())
    assert by_kind["fine"]["error"] == "" and by_kind["fine"]["note"] == ""


def test_unknown_editor_is_a_clear_error(tmp_path, run_py):
    proc = run_py("editor=nope", cache=tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "editor" in proc.stderr and "nope" in proc.stderr


def test_missing_pie_bench_root_is_a_clear_error(tmp_path, run_py):
    proc = run_py(*FAST, "dataset=pie_bench", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                  cache=tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "dataset.root" in proc.stderr


@pytest.mark.parametrize("limit", [2])
def test_sharding_splits_the_items(tmp_path, limit, run_py):
    cache, ids = tmp_path / "cache", []
    for shard in (0, 1):
        out = tmp_path / f"shard{shard}"
        run_py(*FAST, f"dataset.limit={limit}", "dataset.num_shards=2", f"dataset.shard={shard}", "logger=none",
               f"hydra.run.dir={out}", cache=cache)
        ids.append(set(read_results(out)["image_id"]))
    assert len(ids[0]) == len(ids[1]) == 1 and not ids[0] & ids[1]


def test_aggregate_summarises_a_sweep_per_run(tmp_path, capsys, run_py):
    from editlab.evaluation.aggregate import main as aggregate

    sweep = tmp_path / "sweep"
    run_py("-m", *FAST, "experiment=benchmark", "editor.num_steps=2,3", "dataset.limit=1", "dataset.num_shards=2",
           "dataset.shard=0,1", f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache")
    summary = aggregate([str(sweep)])
    overall = summary[summary["edit_type"] == "all"].set_index("run")
    assert len(overall) == 2  # shards merged per configuration, configurations kept apart
    assert ["editor.num_steps=2" in run for run in sorted(overall.index)] == [True, False]
    assert all("shard" not in run for run in overall.index)
    assert list(overall["n"]) == [1, 1]  # limit 1 then 2 shards: one item in shard 0, none in shard 1
    assert list(overall["nfe"]) == [1 + 2, 2 + 3]
    assert "peak_mem_mb" in capsys.readouterr().out and (sweep / "aggregate_summary.csv").exists()


N = 5  # steps in the P2P-family runs below
EDITOR_RUNS = [  # editor, model, overrides, expected UNet calls per edit
    ("ddim_p2p", "tiny", [f"editor.num_steps={N}"], lambda nfe: nfe == 2 * N - 1),
    ("npi", "tiny", [f"editor.num_steps={N}"], lambda nfe: nfe == 2 * N - 1),
    ("direct_inversion", "tiny", [f"editor.num_steps={N}"], lambda nfe: nfe == 3 * N - 1),
    ("pix2pix_zero", "tiny", [f"editor.num_steps={N}"], lambda nfe: nfe == 4 * N - 1),
    # inversion N-1 + optimisation sum(k_i + 2) over N-1 steps with 1 <= k_i <= 10 + edit N
    ("null_text", "tiny", [f"editor.num_steps={N}"], lambda nfe: 5 * N - 4 <= nfe <= 14 * N - 13),
    ("instruct_pix2pix", "tiny_ip2p", ["editor.num_steps=3"], lambda nfe: nfe == 3),
    ("lcm_controlnet", "tiny_sdxl", [], lambda nfe: nfe == 4),
    ("icd", "tiny", [], lambda nfe: nfe == 4 + 4),  # forward (inversion) + reverse steps
    ("icd_sdxl", "tiny_sdxl", [], lambda nfe: nfe == 4 + 4),
    ("identity", "tiny", [], lambda nfe: nfe == 0),
]


@pytest.mark.slow
@pytest.mark.parametrize(("editor", "model", "overrides", "nfe_ok"), EDITOR_RUNS, ids=[r[0] for r in EDITOR_RUNS])
def test_each_editor_in_a_two_image_run(tmp_path, editor, model, overrides, nfe_ok, run_py):
    out = tmp_path / "run"
    run_py(f"editor={editor}", f"model={model}", *overrides, "dataset.limit=2", "logger=none", "warmup=false",
           f"hydra.run.dir={out}", cache=tmp_path / "cache")
    results = read_results(out)
    assert len(results) == 2 and (results["error"] == "").all(), results["error"].tolist()
    assert editor.startswith(results["editor"].iloc[0])  # icd_sdxl is a config of the registered `icd` editor
    assert results["nfe"].map(nfe_ok).all(), results["nfe"].tolist()
    assert len(list((out / "annotation_images").rglob("*.png"))) == 2


def test_one_editor_on_the_default_tour_is_one_run_in_the_folder_named(tmp_path, run_py):
    """``python run.py editor=npi hydra.run.dir=X`` writes into X (a single run, no sweep, no tour notes)."""
    out = tmp_path / "x"
    proc = run_py("experiment=toy_tour", "editor=npi", "editor.num_steps=2", "dataset.limit=1", "logger=none",
                  f"hydra.run.dir={out}", cache=tmp_path / "cache")
    results = read_results(out)
    assert list(results["editor"]) == ["npi"] and results["error"].iloc[0] == ""
    assert results["nfe"].iloc[0] == 2 * 2 - 1
    printed = proc.stdout + proc.stderr
    assert "Launching" not in printed and "not in the tour" not in printed and not (tmp_path / "multirun").exists()


def test_a_sweep_with_a_failed_job_exits_non_zero_and_names_it(tmp_path, run_py):
    sweep = tmp_path / "sweep"
    proc = run_py("-m", *FAST, "editor=ddim_p2p,lcm_controlnet", "dataset.limit=1", "logger=none",
                  f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache", check=False)
    (error,) = sweep.rglob("job_error.txt")
    assert "runs on the sdxl model families, not on sd" in error.read_text() and "did not run" in proc.stdout
    assert proc.returncode == 1 and "1 job(s) of the sweep failed" in proc.stderr
    (first,) = sweep.glob("0_*")
    assert len(read_results(first)) == 1  # the other job's results stand


@pytest.mark.slow
def test_toy_tour_runs_every_editor_with_a_toy_model(tmp_path, monkeypatch):
    """The default run (python run.py) on one colour edit: twelve editors and the no-edit baseline run; the report
    says why lcm_controlnet is not among them; the console holds no library chatter (W&B on, not silenced here)."""
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    sweep = tmp_path / "sweep"
    proc = run_py_process("experiment=toy_tour", "dataset.edit_types=[6]", "dataset.n_per_type=1", "warmup=false",
                  f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache")
    console = proc.stdout + proc.stderr
    for chatter in ("LOAD REPORT", "Loading weights", "should be kept in float32", "wandb:", "Traceback"):
        assert chatter not in console, chatter
    assert len(proc.stdout.splitlines()) < 80, proc.stdout  # 13 jobs of 3 lines, the table, the notes: 70
    results = {job.name.split("editor=")[-1]: read_results(job) for job in sweep.iterdir()
               if (job / "results.csv").is_file()}  # by the tour's editor config (fireflow's editor is rf_solver)
    assert set(results) == {"identity", "ddim", "ddim_p2p", "npi", "direct_inversion", "null_text", "pix2pix_zero",
                            "instruct_pix2pix", "icd", "flowedit", "rf_inversion", "rf_solver", "fireflow"}
    for editor, frame in results.items():
        assert len(frame) == 1 and frame["error"].iloc[0] == "", (editor, frame["error"].iloc[0])
        assert frame[["clip_similarity_target_image", "gt_psnr"]].notna().all().all()
    assert results["icd"]["nfe"].iloc[0] == 8  # 4 forward + 4 reverse; CFG batches cond + uncond in one call
    assert results["flowedit"]["nfe"].iloc[0] == 7  # the last 7 of 10 steps, four rows in one call each
    # the flow editors run on the toy flow teacher: 10 steps each way, midpoint steps twice the calls, FireFlow N + 1
    assert {name: results[name]["nfe"].iloc[0] for name in ("rf_inversion", "rf_solver", "fireflow")} == {
        "rf_inversion": 20, "rf_solver": 40, "fireflow": 18}
    assert {results[name]["model"].iloc[0] for name in ("rf_inversion", "rf_solver", "fireflow")} == {"toy_flow"}
    assert not list(sweep.rglob("job_error.txt")) and "not in the tour: lcm_controlnet" in proc.stdout
    assert (sweep / "comparison.png").is_file() and (sweep / "aggregate_summary.csv").is_file()
