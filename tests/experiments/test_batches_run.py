"""``batch_size``: the harness edits that many items per editor call, writes each row as its batch finishes, lets
a bad item fail alone and resumes from the items left. In-process through the harness (what run.py calls), the DDIM
editor (it batches for real) on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from editlab.evaluation.summary import read_results
from editlab.evaluation.toyset import write_piebench
from editlab.experiments.harness import RunError, run

ROOT = Path(__file__).resolve().parents[2]
FAST = ["~experiment", "model=tiny", "editor=ddim", "editor.num_steps=3", "warmup=false", "logger=none"]
COSTS = ["seconds", "nfe", "peak_mem_mb", "batch_size"]  # what batching changes in a row


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "editlab" / "conf"), version_base="1.3"):
        return compose("run", overrides=[*FAST, *overrides])


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))


def results(out: Path) -> pd.DataFrame:
    return read_results(out / "results.csv").set_index("image_id")  # an error row's costs: NaN


def images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=int) for p in (out / "annotation_images").rglob("*.png")}


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """The rows of one run as another's, but for the costs batching shares: labels and errors exactly, metrics to
    float rounding (a batch's edits may differ from the lone ones by one grey level), UNet calls in shares."""
    assert list(got.index) == list(want.index)
    labels = ["edit_type", "error", "note", "inputs", "backward_passes"]
    pd.testing.assert_frame_equal(got[labels], want[labels])
    metrics = [c for c in want.columns if c not in {*labels, *COSTS, "run", "editor", "model", "precision"}]
    pd.testing.assert_frame_equal(got[metrics], want[metrics], rtol=0.02, atol=0.05)
    ok = want["error"] == ""
    assert (got.loc[ok, "nfe"] * got.loc[ok, "batch_size"] == want.loc[ok, "nfe"]).all()


def test_batches_of_two_write_the_rows_one_at_a_time_writes(tmp_path):
    alone, paired = tmp_path / "alone", tmp_path / "paired"
    run(config("dataset.limit=5"), alone, "g")
    run(config("dataset.limit=5", "batch_size=2"), paired, "g")
    got, want = results(paired), results(alone)
    assert_same_rows(got, want)
    assert list(got["batch_size"]) == [2, 2, 2, 2, 1] and (want["batch_size"] == 1).all()
    assert (want["nfe"] == 2 + 3).all() and list(got["nfe"]) == [2.5, 2.5, 2.5, 2.5, 5]  # 5 calls per batch
    assert (got["seconds"] > 0).all()
    edited, lone = images(paired), images(alone)
    assert edited.keys() == lone.keys()
    assert all(np.abs(edited[name] - lone[name]).max() <= 1 for name in lone)


def test_a_resumed_run_forms_its_batches_from_the_items_left(tmp_path):
    out = tmp_path / "run"
    run(config("dataset.limit=1", "batch_size=2"), out, "g")
    run(config("dataset.limit=4", "batch_size=2"), out, "g")  # more items: a resume of the one that is done
    rows = results(out)
    assert len(rows) == 4 and (rows["error"] == "").all()
    assert list(rows["batch_size"]) == [1, 2, 2, 1]


def _bench(root: Path, bad: str) -> Path:
    """Three items, the first of them bad: a prompt the text encoder would have to cut (the editor fails), or an
    image that cannot be read (the item fails before the editor)."""
    write_piebench(root, n_per_type=1, size=64, edit_types=("1", "6", "8"))
    mapping = json.loads((root / "mapping_file.json").read_text())
    first = mapping[sorted(mapping)[0]]
    if bad == "prompt":
        first["editing_prompt"] = " ".join(["a very long prompt"] * 40)
    else:
        (root / "annotation_images" / first["image_path"]).write_bytes(b"not a png")
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


@pytest.mark.parametrize(("bad", "batches"), [("prompt", [1, 1]), ("image", [2, 2])])
def test_a_bad_item_in_a_batch_fails_alone(tmp_path, bad, batches):
    root = _bench(tmp_path / "bench", bad)
    data = ["dataset=pie_bench", f"dataset.root={root}", "metrics=offline"]
    alone, together = tmp_path / "alone", tmp_path / "together"
    run(config(*data), alone, "g")
    run(config(*data, "batch_size=3"), together, "g")
    got, want = results(together), results(alone)
    assert want["error"].iloc[0] != "" and (want["error"].iloc[1:] == "").all()
    assert_same_rows(got, want)  # the bad item's error row exactly as alone, the others edited
    # a batch the editor fails is edited again one item at a time; an item that fails before the editor leaves
    # the others their batch
    assert list(got["batch_size"].iloc[1:]) == batches


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two", "true"])
def test_batch_size_is_a_whole_number_of_items(tmp_path, value):
    out = tmp_path / "run"
    with pytest.raises(RunError, match="batch_size=.*: give a whole number of items >= 1"):
        run(config(f"batch_size={value}"), out, "g")
    assert not (out / "results.csv").exists()
