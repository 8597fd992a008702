"""The fault and bad-input battery: kills at each write of a run, torn files, changed configurations, NaN, bad
paths, bad parameters, offline hub ids, a toy set rewritten under a running job. In-process through the harness
(what run.py calls), with a few true run.py subprocesses where the exit status is the point."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config
from PIL import Image

from editlab.editors.base import EditorConfigError
from editlab.evaluation.toyset import builtin_folder, write_piebench
from editlab.experiments import harness
from editlab.experiments.harness import ResultsFile, RunError, run

ROOT = Path(__file__).resolve().parents[2]
FAST = ["~experiment", "model=tiny", "editor.num_steps=3", "warmup=false", "logger=none", "dataset.limit=3"]


class Killed(BaseException):
    """Stands for kill -9 at a chosen write: nothing after it runs (a BaseException passes every except clause)."""


pytestmark = pytest.mark.usefixtures("own_cache")


def config(*overrides: str):
    return compose_config(*FAST, *overrides)


def results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv", dtype={"image_id": str, "edit_type": str, "error": str},
                       keep_default_na=False, na_values={"psnr_unedit_part": ["nan"]})


def images(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "annotation_images").rglob("*.png"))}


def kill_at(monkeypatch, target, name: str, call: int) -> None:
    """``target.name`` kills the process on its ``call``-th call (1-based), before doing its work."""
    original, calls = getattr(target, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, dying)


# ------------------------------------------------------------------------------------------------------ kills


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the rows and images every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    os.environ["EDITLAB_CACHE"] = str(out / "cache")
    try:
        run(config(), out, "g")
    finally:
        del os.environ["EDITLAB_CACHE"]
    return results(out), images(out)


METRICS = ["psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part", "gt_psnr", "gt_mse", "nfe"]


def assert_like_reference(out: Path, reference) -> None:
    frame, expected_images = reference
    got = results(out).drop_duplicates("image_id", keep="last").set_index("image_id").sort_index()
    want = frame.set_index("image_id").sort_index()
    assert list(got.index) == list(want.index) and (got["error"] == "").all()
    pd.testing.assert_frame_equal(got[METRICS], want[METRICS])
    assert images(out) == expected_images  # every edit saved, byte for byte


@pytest.mark.parametrize("where", ["before saving image 2", "before appending row 2", "before the summary"])
def test_a_kill_at_any_write_loses_nothing_on_resume(tmp_path, monkeypatch, reference, where):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        if where == "before saving image 2":
            kill_at(patch, harness, "save_image_atomic", 2)
        elif where == "before appending row 2":  # the image of item 2 is on disk, its row is not
            kill_at(patch, ResultsFile, "append", 2)
        else:
            kill_at(patch, harness, "summarize", 1)
        with pytest.raises(Killed):
            run(config(), out, "g")
    assert not list(out.rglob(".*.tmp"))  # no half-written image under a final name or left behind
    run(config(), out, "g")
    assert_like_reference(out, reference)


def test_a_success_row_whose_image_is_missing_is_edited_again(tmp_path, reference):
    out = tmp_path / "run"
    run(config(), out, "g")
    lost = sorted((out / "annotation_images").rglob("*.png"))[1]
    lost.unlink()
    run(config(), out, "g")
    assert lost.is_file() and len(results(out)) == 4  # one item re-edited, its new row appended
    assert_like_reference(out, reference)


def test_a_torn_last_line_is_dropped_and_the_item_redone(tmp_path, reference, caplog):
    out = tmp_path / "run"
    run(config(), out, "g")
    data = (out / "results.csv").read_bytes()
    (out / "results.csv").write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 40])  # the last row cut short
    run(config(), out, "g")
    assert "dropped a torn last line" in caplog.text
    lines = (out / "results.csv").read_bytes().splitlines()
    assert len(lines) == 4 and all(line.count(b",") == lines[0].count(b",") for line in lines)
    assert_like_reference(out, reference)


def test_rows_stay_one_line_whatever_their_error_text(tmp_path):
    path = tmp_path / "results.csv"
    file = ResultsFile(path)
    file.append({"image_id": "1", "error": "ValueError: first line\nsecond line\r\nthird", "note": "a\nb"})
    assert path.read_bytes().count(b"\n") == 2
    row = file.read().iloc[0]
    assert row["error"] == "ValueError: first line second line third" and row["note"] == "a b"


def test_results_from_another_version_are_not_appended_to(tmp_path):
    (tmp_path / "results.csv").write_text("image_id,score\n1,2\n")
    with pytest.raises(RunError, match="other columns"):
        ResultsFile(tmp_path / "results.csv")


# ------------------------------------------------------------------------------------------------ changed config


def test_rerun_with_another_config_refuses_and_restart_moves_the_old_results_aside(tmp_path):
    out = tmp_path / "run"
    run(config(), out, "g")
    before = (out / "results.csv").read_bytes()
    with pytest.raises(RunError, match=r"editor.name: 'ddim_p2p' -> 'npi'") as info:
        run(config("editor=npi"), out, "g")
    assert "restart=true" in str(info.value) and (out / "results.csv").read_bytes() == before
    with pytest.raises(RunError, match=r"editor.guidance_scale: 7.5 -> 5"):
        run(config("editor.guidance_scale=5"), out, "g")
    run(config("dataset.limit=4"), out, "g")  # picking more items is a resume, not another configuration
    assert len(results(out)) == 4

    run(config("editor=npi", "restart=true"), out, "g")
    (aside,) = out.glob("superseded_*")
    assert (aside / "results.csv").read_bytes()[: len(before)] == before and len(images(aside)) == 4
    assert set(results(out)["editor"]) == {"npi"} and len(results(out)) == 3
    from editlab.evaluation.aggregate import collect

    assert set(collect(out)["editor"]) == {"npi"}  # reports leave the moved-aside results out


def test_an_unreadable_job_json_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    run(config(), out, "g")
    (out / "job.json").write_text('{"config": {"editor.na')  # as a kill mid-write of an older version left it
    with pytest.raises(RunError, match="job.json cannot be read"):
        run(config(), out, "g")


def test_results_without_job_json_are_checked_by_their_rows(tmp_path):
    out = tmp_path / "run"
    run(config(), out, "g")
    (out / "job.json").unlink()  # as written by an earlier version of editlab
    with pytest.raises(RunError, match="editor.name: 'ddim_p2p' -> 'npi'"):
        run(config("editor=npi"), out, "g")
    run(config(), out, "g")  # the same editor resumes and records job.json again
    assert (out / "job.json").is_file()


# ------------------------------------------------------------------------------------------------ bad paths


def _mapping_with(root: Path, **changes) -> Path:
    write_piebench(root, n_per_type=1, size=64, edit_types=("1", "6"))
    mapping = json.loads((root / "mapping_file.json").read_text())
    first = sorted(mapping)[0]
    mapping[first].update(changes)
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_image_paths_never_lead_a_write_outside_the_output_directory(tmp_path, escape):
    victim = tmp_path / "precious.png"
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(victim)
    original = victim.read_bytes()
    path = str(victim) if escape == "absolute" else "../../precious.png"
    root = _mapping_with(tmp_path / "bench", image_path=path)
    out = tmp_path / "bench_out" / "run"
    with pytest.raises(RunError, match="must be a path relative to annotation_images"):
        run(config("dataset=pie_bench", f"dataset.root={root}", "metrics=offline"), out, "g")
    assert victim.read_bytes() == original and not (out / "results.csv").exists()


def test_an_output_directory_inside_the_benchmark_is_refused(tmp_path):
    root = _mapping_with(tmp_path / "bench")
    sources = {p: p.read_bytes() for p in (root / "annotation_images").rglob("*.png")}
    for out in (root, root / "outputs"):
        with pytest.raises(RunError, match="inside dataset.root"):
            run(config("dataset=pie_bench", f"dataset.root={root}", "metrics=offline"), out, "g")
    assert {p: p.read_bytes() for p in (root / "annotation_images").rglob("*.png")} == sources


# ------------------------------------------------------------------------------------------------ NaN and garbage


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_decode_is_an_error_row_not_a_black_or_white_success(tmp_path, monkeypatch, value):
    from diffusers import AutoencoderKL

    decode = AutoencoderKL.decode

    def broken(self, z, *args, **kwargs):
        out = decode(self, z, *args, **kwargs)
        out.sample[:, :, :2] = value
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", broken)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="every item failed"):
        run(config(), out, "g")
    frame = results(out)
    assert (frame["error"].str.contains("VAE decoder returned NaN/inf")).all()
    assert frame["error"].str.contains("no precision overflow").all()  # fp32: half precision is not blamed
    assert not (out / "annotation_images").exists()


def test_nan_latents_blame_half_precision_only_in_half_precision(tiny_components):
    latents = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(FloatingPointError, match="float32, so this is no precision overflow"):
        tiny_components.decode_latents(latents)
    with pytest.raises(FloatingPointError, match="float16, whose range overflowed"):
        dataclasses.replace(tiny_components, dtype=torch.float16).decode_latents(latents)


def test_a_malformed_mask_is_an_error_row_and_the_wandb_table_still_builds(tmp_path):
    root = _mapping_with(tmp_path / "bench", mask=[5])
    out = tmp_path / "run"
    run(config("dataset=pie_bench", f"dataset.root={root}", "metrics=offline", "logger=wandb",
               "logger.mode=offline"), out, "g")
    errors = results(out).set_index("image_id")["error"]
    assert "pairs" in errors.iloc[0] and errors.iloc[1] == ""


def test_empty_prompts_are_noted(tmp_path):
    root = _mapping_with(tmp_path / "bench", original_prompt="")
    out = tmp_path / "run"
    run(config("dataset=pie_bench", f"dataset.root={root}", "metrics=offline"), out, "g")
    notes = results(out).set_index("image_id")["note"]
    assert notes.iloc[0] == "empty source prompt" and notes.iloc[1] == ""


# ------------------------------------------------------------------------------------------------ bad configuration


@pytest.mark.parametrize(("override", "message"), [
    ("editor.guidance_scale=abc", "editor.guidance_scale='abc' must be a finite number"),
    ("editor.guidance_scale=inf", "editor.guidance_scale=inf must be a finite number"),
    ("editor.num_steps=0", "editor.num_steps=0 is out of range"),
    ("editor.num_steps=2.5", "editor.num_steps=2.5 must be an integer"),
    ("editor.p2p.cross_replace_steps=1.5", "editor.p2p.cross_replace_steps=1.5 is out of range"),
    ("editor.p2p.mode=swap", "editor.p2p.mode='swap' must be one of refine, replace, auto"),
    ("editor.p2p.local_blend=maybe", "editor.p2p.local_blend='maybe' must be true or false"),
    ("device=cuda:7", "device=cuda:7"),
    ("device=gpu", "device='gpu' is not a torch device"),
])
def test_a_bad_value_stops_the_job_before_the_first_item(tmp_path, override, message):
    if override.startswith("device=cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    out = tmp_path / "run"
    with pytest.raises(RunError) as info:
        run(config(override), out, "g")
    assert message in str(info.value)
    assert not (out / "results.csv").exists()


def test_editor_parameters_are_checked_when_the_editor_is_built(tiny_components):
    from editlab.editors.base import build_editor

    with pytest.raises(EditorConfigError, match="editor.reverse_steps=1200 is out of range"):
        build_editor({"name": "icd", "reverse_steps": [259, 1200]}, tiny_components)
    with pytest.raises(EditorConfigError, match="editor.method='pnp' must be one of p2p, prompt_switch"):
        build_editor({"name": "icd", "method": "pnp"}, tiny_components)


def test_run_py_exits_non_zero_with_one_clear_line(tmp_path, call_main):
    """The first as a true subprocess (the exit status a shell sees), the second in this process (run.py's main as
    the command line calls it)."""
    env = {**os.environ, "EDITLAB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    for in_process, override, message in ((False, "editor.num_steps=0", "editor.num_steps=0 is out of range"),
                                          (True, "editor.guidance_scale=inf",
                                           "guidance_scale=inf must be a finite number")):
        args = [*FAST, override, f"hydra.run.dir={tmp_path / 'run'}"]
        if in_process:
            proc = call_main("run", *args)
        else:
            proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=300)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stdout + proc.stderr


def test_a_job_whose_every_item_failed_exits_non_zero(tmp_path):
    root = _mapping_with(tmp_path / "bench")
    for image in (root / "annotation_images").rglob("*.png"):
        image.write_bytes(b"not a png")
    with pytest.raises(RunError, match=r"every item failed \(2 of 2; the first: ValueError: cannot read image"):
        run(config("dataset=pie_bench", f"dataset.root={root}", "metrics=offline"), tmp_path / "run", "g")


# ------------------------------------------------------------------------------------------------ offline hub


def test_an_unreachable_hub_is_one_clear_line_at_once(monkeypatch):
    from huggingface_hub import constants

    from editlab.models import hub as paths
    from editlab.models.loading import load_components

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(paths, "hub_reachable", lambda: False)
    with pytest.raises(paths.HubUnreachableError, match="model.path='org/absent-model' is a hub id, but the hub"):
        load_components({"name": "x", "kind": "pretrained", "path": "org/absent-model", "resolution": 64},
                        {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}, "cpu")
    assert paths.hub_kwargs("./weights/toy", "model.path") == {}  # local folders never ask the hub
    assert paths.hub_kwargs("editlab/weights/toy", "model.path") == {}  # an existing relative folder


# ------------------------------------------------------------------------------------------------ the toy set cache


def test_toy_sets_of_other_parameters_live_apart(tmp_path, own_cache):
    small = harness.build_dataset(config("dataset.size=32").dataset)
    before = {p: p.read_bytes() for p in small.root.rglob("*") if p.is_file()}
    large = harness.build_dataset(config("dataset.size=64").dataset)
    assert small.root == builtin_folder(own_cache / "builtin_piebench", 1, 32, 0) and large.root != small.root
    assert {p: p.read_bytes() for p in small.root.rglob("*") if p.is_file()} == before  # untouched
    with Image.open(large.image_file(large[0])) as image:
        assert image.size == (64, 64)
    staging = [p for p in (own_cache / "builtin_piebench").iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    assert not staging  # no staging folder left (the writers' lock files stay: a lock is never unlinked)


def test_a_toy_set_write_is_all_or_nothing(tmp_path, monkeypatch):
    from editlab.evaluation import toyset

    kill_at(monkeypatch, toyset, "_publish", 1)
    with pytest.raises(Killed):
        write_piebench(tmp_path / "set", n_per_type=1, size=32)
    assert not (tmp_path / "set").exists()  # a reader never finds a half-written set
    monkeypatch.undo()
    write_piebench(tmp_path / "set", n_per_type=1, size=32)
    assert (tmp_path / "set" / "toyset.json").is_file() and sorted(os.listdir(tmp_path)) == [".set.lock", "set"]


# ------------------------------------------------------------------------------------------------ W&B


def test_one_job_is_one_wandb_run_whose_history_and_table_cover_every_item(tmp_path, monkeypatch):
    from editlab.experiments.wandb_logger import RunLogger, attempt_folders

    logged, tables = [], []
    log_item, make_table = RunLogger.log_item, RunLogger._table
    monkeypatch.setattr(RunLogger, "log_item", lambda self, row: (logged.append(row["image_id"]), log_item(self, row)))
    monkeypatch.setattr(RunLogger, "_table", lambda self, *a: tables.append(make_table(self, *a)) or tables[-1])
    out, wandb_on = tmp_path / "run", ("logger=wandb", "logger.mode=offline")
    with monkeypatch.context() as patch:
        kill_at(patch, ResultsFile, "append", 3)  # two items committed, the third edited but not
        with pytest.raises(Killed):
            run(config(*wandb_on), out, "g")
    first_attempt = list(logged)
    logged.clear()
    (attempt,) = (out / "wandb").glob("offline-run-*")  # named as W&B names an attempt begun in a taken second
    attempt.rename(attempt.with_name(f"{attempt.name}-1"))
    run(config(*wandb_on), out, "g")

    run_id = json.loads((out / "job.json").read_text())["wandb_id"]
    assert len(attempt_folders(out / "wandb", run_id)) == len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert len(attempt_folders(out / "wandb" / "superseded", run_id)) == 1
    ids = list(results(out)["image_id"])
    assert first_attempt == ids[:2] and logged == ids  # the resumed run's history holds every item
    assert sorted(row[0] for row in tables[-1].data) == sorted(ids)  # and so does its table, with images
    columns = tables[-1].columns
    for key in ("source", "edited", "ground_truth", "mask"):
        assert all(row[columns.index(key)] is not None for row in tables[-1].data), key
    assert {"edit_type_name", "structure_distance", "gt_psnr", "peak_mem_mb"} <= set(columns)
