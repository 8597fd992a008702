"""run.py sweeps through Hydra's launcher plugins (the `slurm` and `joblib` extras, installed by scripts/setup.sh
through `dev`): submitit_local and joblib run each job in its own process; two shards of one configuration are
merged by the sweep report. A launcher whose plugin is missing stops with the extra to install."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARDS = ["-m", "~experiment", "model=tiny", "editor.num_steps=2", "warmup=false", "logger=none", "dataset.limit=2",
          "dataset.num_shards=2", "dataset.shard=0,1"]


@pytest.mark.parametrize("launcher", [["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
                                      ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["submitit_local", "joblib"])
def test_a_sharded_sweep_runs_its_jobs_in_their_own_processes_and_merges(launcher, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "EDITLAB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "run.py", *SHARDS, *launcher, f"hydra.sweep.dir={sweep}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/results.csv"))
    assert len(jobs) == 2
    results = [pd.read_csv(job / "results.csv", dtype={"image_id": str}, keep_default_na=False) for job in jobs]
    assert [len(r) for r in results] == [1, 1] and set(results[0]["image_id"]).isdisjoint(results[1]["image_id"])
    assert all((r["error"] == "").all() for r in results)
    if launcher[0].endswith("submitit_local"):  # each job a process of its own, with its own submitit log
        assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2
    assert "sweep " in proc.stdout and "comparison grid" in proc.stdout  # the report, shards merged


def test_a_missing_launcher_plugin_names_the_extra_to_install(call_main, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else find_spec(name, *a))
    for launcher, extra in (("submitit_local", "slurm"), ("submitit_slurm", "slurm"), ("joblib", "joblib")):
        proc = call_main("run", "-m", "~experiment", f"hydra/launcher={launcher}")
        assert proc.returncode == 1 and f'pip install -e ".[{extra}]"' in proc.stderr, proc.stderr[-2000:]
    assert call_main("train", "-m", "hydra/launcher=joblib").stderr.count('".[joblib]"') == 1
