"""The paper experiments (conf/experiment/paper/**): every job of every sweep composes in-process, names its table
row, and builds its editor's arguments; a row whose files are not given names the key, and the toy variants need
none."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationToMissingValueError

from editlab.editors.base import editor_arguments
from editlab.experiments.harness import RunError, check_given

CONF = Path(__file__).resolve().parents[2] / "editlab" / "conf"
EXPERIMENTS = sorted("paper/" + str(p.relative_to(CONF / "experiment/paper").with_suffix(""))
                     for p in (CONF / "experiment/paper").rglob("*.yaml"))


def jobs(name: str) -> list[tuple[str, ...]]:
    """The overrides of jobs of the experiment's sweep that, together, use every value of every swept key: the
    first job, and each other value with the rest at their first (one job when it is not a sweep)."""
    cfg = compose("run", [f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    choices = [[f"{key}={v}" for v in str(values).split(",")] for key, values in params.items()]
    first = tuple(values[0] for values in choices)
    return [first] + [first[:k] + (value,) + first[k + 1:] for k, values in enumerate(choices) for value in values[1:]]


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        yield


def test_every_paper_experiment_has_a_toy_variant_or_says_why():
    real = {e for e in EXPERIMENTS if "/toy/" not in e}
    toy = {e.replace("/toy/", "/") for e in EXPERIMENTS if "/toy/" in e}
    # no SDXL-family toy model (fast_editing*, icd_table3) and no toy instruction editor (gedit, imgedit): those run
    # on real weights only
    assert real - toy == {"paper/fast_editing", "paper/fast_editing_reference", "paper/icd_table3", "paper/gedit",
                          "paper/imgedit"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_composes_and_names_its_row(hydra_conf, name):
    rows = []
    for overrides in jobs(name):
        cfg = compose("run", [f"experiment={name}", *overrides])
        assert cfg.task.name in ("edit", "inversion", "generation")
        try:
            editor = OmegaConf.to_container(cfg.editor, resolve=True)
        except InterpolationToMissingValueError as err:  # a file the user gives (adapters, teachers, benchmarks)
            assert "/toy/" not in name, f"{overrides}: the toy world has every file ({err})"
            assert "paper." in str(err)
            with pytest.raises(RunError, match=r"paper\.[\w.]+ is not set: give it on the command line"):
                check_given(cfg)
            continue
        editor_arguments(editor)  # every key is a checked constructor argument
        rows.append(cfg.paper_row or editor["name"])
    assert len(rows) == len(set(rows)), f"two jobs of {name} make the same row: {rows}"
    if "/toy/" in name:
        assert rows and len(rows) == len(jobs(name))
