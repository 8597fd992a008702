"""run.py / train.py --help: each lists its own config groups (run.py not train.py's train/*, train.py not the
editors), the experiments and three example commands, without loading torch (which took most of the 30-40 s)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the program as `python <script>.py --help` runs it, then whether torch got imported on the way
HELP = """import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:  # Hydra exits after the help
    print("torch loaded:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("script,own,foreign", [
    ("run.py", ("editor: ", "dataset: ", "experiment: ", "experiment/paper: ", "model: "), ("train/",)),
    ("train.py", ("train/teacher: ", "train/data: ", "train/experiment: ", "model: ", "precision: "),
     ("editor", "dataset: ", "metrics: ")),
])
def test_help_lists_the_programs_own_groups_and_examples_without_loading_torch(script, own, foreign):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", HELP.format(script=script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    print(f"{script} --help: {time.perf_counter() - start:.1f} s")  # was 22-40 s on two cores; now a few
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = proc.stdout.split("== Config groups (group=option) ==")[1].split("==")[0]
    assert all(f"\n{group}" in groups for group in own)
    assert not any(f"\n{group}" in groups for group in foreign)
    examples = proc.stdout.split("== Examples ==")[1]
    assert examples.count(f"\npython {script} ") == 3
    assert proc.stdout.rstrip().endswith("torch loaded: False")
