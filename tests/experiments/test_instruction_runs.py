"""The trained instruction editors through run.py, on the tiny random models: the built-in set's instructions as
prompts, their NFE formulas in results.csv, a clean console, and an item without an instruction as its own failure
row (the run goes on)."""

import json

import pytest

from editlab.evaluation.summary import read_results
from editlab.evaluation.toyset import write_piebench

RUNS = [  # model, editor, overrides, NFE per edit
    ("tiny_flux_kontext", "flux_kontext", ["editor.num_steps=3"], 3),
    ("tiny_flux_kontext", "flux_kontext", ["editor.num_steps=2", "editor.true_cfg_scale=2",
                                           "editor.negative_prompt=x"], 2 * 2),
    ("tiny_qwen_image_edit", "qwen_image_edit", ["editor.num_steps=2"], 2 * 2),
    ("tiny_qwen_image_edit", "qwen_image_edit", ["editor.num_steps=3", "editor.true_cfg_scale=1"], 3),
]


@pytest.fixture
def run_py(call_main, own_cache):
    """``python run.py ~experiment args`` in this process (conftest's call_main), which must succeed."""
    def run_(*args: str):
        proc = call_main("run", "~experiment", "logger=none", "warmup=false", *args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    return run_


@pytest.mark.parametrize(("model", "editor", "overrides", "nfe"), RUNS,
                         ids=["kontext", "kontext_true_cfg", "qwen", "qwen_without_cfg"])
def test_an_instruction_editor_runs_on_the_builtin_set(tmp_path, model, editor, overrides, nfe, run_py):
    out = tmp_path / "run"
    proc = run_py(f"model={model}", f"editor={editor}", *overrides, "dataset=builtin", "dataset.limit=2",
                  f"hydra.run.dir={out}")
    results = read_results(out / "results.csv")
    assert len(results) == 2 and (results["error"] == "").all(), results["error"].tolist()
    assert (results["nfe"] == nfe).all() and (results["seconds"] > 0).all() and (results["peak_mem_mb"] > 0).all()
    assert (results["model"] == model).all() and len(list((out / "annotation_images").rglob("*.png"))) == 2
    console = proc.stdout + proc.stderr
    assert "Traceback" not in console and "warn" not in console.lower(), console[-2000:]


def test_an_item_without_an_instruction_fails_alone(tmp_path, run_py):
    root, out = tmp_path / "set", tmp_path / "run"
    write_piebench(root, n_per_type=1, size=64, seed=0, edit_types=("1", "2"))
    mapping = json.loads((root / "mapping_file.json").read_text())
    first, second = sorted(mapping)
    mapping[first]["editing_instruction"] = ""
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    run_py("model=tiny_flux_kontext", "editor=flux_kontext", "editor.num_steps=2", "dataset=pie_bench",
           f"dataset.root={root}", "metrics=offline", f"hydra.run.dir={out}")
    rows = read_results(out / "results.csv").set_index("image_id")
    assert "has no editing instruction" in rows.loc[first, "error"] and rows.loc[second, "error"] == ""
    assert rows.loc[second, "nfe"] == 2
