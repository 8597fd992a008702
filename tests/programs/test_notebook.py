"""notebooks/toy_world.ipynb runs top to bottom on the toy world (offline, CPU) and ends with its metrics table."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_toy_world_notebook_runs_to_its_metrics_table():
    notebook = nbformat.read(ROOT / "notebooks" / "toy_world.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [cell.outputs for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not any(o.output_type == "error" for o in out) for out in outputs)
    table = outputs[-1][-1]["data"]["text/plain"]
    assert "clip_gain" in table and "icd" in table and "gt_psnr" in table
    strips = [o for out in outputs for o in out if "image/png" in o.get("data", {})]
    assert len(strips) == 2  # the scene strip and the editors' strip
