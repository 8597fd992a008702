"""The sweep report's files: comparison.png's legend and headers, files replaced whole, the sweep's own W&B run."""

from __future__ import annotations

import builtins
import errno
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from editlab.evaluation import aggregate
from editlab.evaluation.toyset import write_piebench

GROUP = "paper/toy/icd_table2 2026-12-01 10-06-15"


def sweep_of_two_runs(tmp_path: Path) -> Path:
    """A sweep folder with two jobs that edited the same two toy items (the second failed on one)."""
    root = write_piebench(tmp_path / "bench", n_per_type=1, size=32, edit_types=("1", "6"))
    mapping = json.loads((root / "mapping_file.json").read_text())
    sweep = tmp_path / "sweep"
    for job, (run, error) in enumerate([("teacher_guided_dcfg", ""), ("teacher_unguided", "OOM")]):
        folder = sweep / f"{job}_paper_row={run}"
        frame = pd.DataFrame({"run": run, "editor": "ddim_p2p", "model": "toy", "precision": "fp32",
                              "image_id": sorted(mapping), "edit_type": "1", "error": ["", error],
                              "clip_similarity_target_image": 90.6, "psnr_unedit_part": 24.13, "gt_psnr": 14.9})
        (folder / "annotation_images").mkdir(parents=True)
        frame.to_csv(folder / "results.csv", index=False)
        (folder / "job.json").write_text(json.dumps({"dataset_root": str(root), "wandb_group": GROUP}))
        for entry in mapping.values():
            target = folder / "annotation_images" / Path(entry["image_path"]).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(target)
    return sweep


# ------------------------------------------------------------------------------------------------ comparison grid
def test_grid_captions_name_their_metrics_and_the_legend_explains_every_label():
    row = {"error": "", "clip_similarity_target_image": 90.63, "psnr_unedit_part": 24.13, "gt_psnr": 14.9}
    assert aggregate.caption(row) == ["CLIP: 90.6", "bg PSNR: 24.1", "GT PSNR: 14.9"]
    assert aggregate.caption({"error": "OOM"}) == ["failed: OOM"] and aggregate.caption(None) == ["not edited"]
    legend = aggregate.legend([row, None, {"error": "OOM", "clip_t": 30.0}])
    assert "CLIP: CLIP score of the edit and the target prompt" in legend
    assert "bg PSNR: PSNR of the unedited part against the source (dB)" in legend
    assert "GT PSNR: PSNR against the ground-truth edit (dB)" in legend
    assert "gray: failed or not edited" in legend and "CLIP-T" not in legend  # only the labels the grid shows


@pytest.mark.parametrize("text", ["teacher_guided_dcfg", "paper_row=teacher_guided_dcfg,precision=bf16",
                                  "editor=direct_inversion/guidance", "a long prompt with many words in it"])
@pytest.mark.parametrize("width", [40, 90, 128])
def test_grid_text_wraps_only_between_words(text, width):
    words = re.split("[ _/,=]+", text)
    lines = aggregate.wrap(text, aggregate._font(12), width)
    assert re.sub(" ", "", "".join(lines)) == re.sub(" ", "", text)
    assert [w for line in lines for w in re.split("[ _/,=]+", line) if w] == words  # no word cut in two


def test_the_grid_has_its_legend_above_the_headers(tmp_path):
    sweep = sweep_of_two_runs(tmp_path)
    grid = aggregate.comparison_grid(sweep)
    with Image.open(grid) as image:
        legend_height = image.height - aggregate.HEADER - 2 * (128 + aggregate.CAPTION)
        band = np.asarray(image.convert("L"))[:legend_height]
    assert legend_height >= 14 and (band < 128).any()  # a band of text above the headers


# ------------------------------------------------------------------------------------------------ files replaced whole
def _disk_fills_while_writing(monkeypatch, name: str) -> None:
    """Every file opened for writing whose name holds ``name`` (its temporary name too) gets half of what is written
    to it, then the error of a full disk."""
    real = io.open

    class HalfWritten:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, attr):
            return getattr(self.file, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def opener(file, mode="r", *args, **kwargs):
        opened = real(file, mode, *args, **kwargs)
        return HalfWritten(opened) if set(mode) & set("wa+") and name in Path(str(file)).name else opened

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)


@pytest.mark.parametrize("name", ["report.txt", "aggregate_summary.csv", "comparison.png"])
def test_a_report_stopped_mid_write_leaves_the_old_files(tmp_path, monkeypatch, name):
    sweep = sweep_of_two_runs(tmp_path)
    aggregate.report(sweep)
    before = (sweep / name).read_bytes()
    with monkeypatch.context() as patch:
        _disk_fills_while_writing(patch, name)
        with pytest.raises(OSError):
            aggregate.report(sweep)
    assert (sweep / name).read_bytes() == before  # the old file, whole
    assert not [p.name for p in sweep.iterdir() if p.name.endswith(".tmp")]  # and no temporary one left


# ------------------------------------------------------------------------------------------------ the sweep's W&B run
def test_every_sweep_gets_a_wandb_run_with_its_report_table_grid_and_group(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = sweep_of_two_runs(tmp_path)
    aggregate.report(sweep, wandb={"mode": "offline", "project": None, "entity": None})
    (run,) = (sweep / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    assert [p.name.split("_")[0] for p in sorted((media / "table" / "report").glob("*.table.json"))] == [
        "headline", "summary"]
    headline = json.loads(next((media / "table" / "report").glob("headline_*.table.json")).read_text())
    assert "teacher_guided_dcfg" in str(headline["data"])
    assert [p.name.split("_")[0] for p in (media / "images" / "images").glob("*.png")] == ["comparison"]
    assert GROUP.encode() in next(run.glob("*.wandb")).read_bytes()  # the jobs' group
    out = capsys.readouterr().out
    assert f"W&B: the sweep's run {run} (group {GROUP!r})" in out and aggregate.sync_command(sweep) in out
    assert aggregate.sync_command(sweep) in (sweep / "report.txt").read_text()


def test_the_sync_command_finds_the_sweeps_run_and_every_jobs_but_no_superseded_one(tmp_path):
    import glob
    import shlex

    sweep = tmp_path / "multirun" / "2026-12-01" / "10-06-15"
    runs = [sweep / "wandb" / "offline-run-1-sweep", sweep / "0_a" / "wandb" / "offline-run-1-a",
            sweep / "1_b" / "wandb" / "offline-run-1-b"]
    for folder in [*runs, sweep / "0_a" / "wandb" / "superseded" / "offline-run-0-a"]:
        folder.mkdir(parents=True)
    found = {Path(p) for pattern in shlex.split(aggregate.sync_command(sweep))[2:] for p in glob.glob(pattern)}
    assert found == set(runs)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert aggregate.sync_command(Path("multirun/<date>/<sweep>")) in readme
