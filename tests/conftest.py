import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

# Tests never touch the network or a W&B server. Tiny models are overhead-bound: one thread is faster on 2 shared
# cores (and subprocesses such as run.py inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CONF = Path(__file__).resolve().parents[1] / "editlab" / "conf"
TINY = {"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64}
FP32 = {"dtype": "float32", "vae_dtype": "float32"}
NO_OFFLOAD = {"mode": "none"}
# the colour swap the tiny model's editor tests make: source and target prompts, and their blend words
PROMPTS = ["a red circle on a gray background", "a blue circle on a gray background"]
BLEND = ("red", "blue")


def random_image(seed: int = 0) -> Image.Image:
    """A 64² image (the tiny model's resolution) of uniformly random pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def unet_batches(unet, run) -> list[int]:
    """The batch of every forward call of ``unet`` that ``run()`` makes."""
    batches = []
    handle = unet.register_forward_pre_hook(lambda m, args, kwargs: batches.append(
        (args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return batches


def compose_config(*overrides: str, name: str = "run", hydra: bool = False):
    """The program's config (run.py's, or ``name="train"``) as Hydra composes it for these command-line overrides;
    ``hydra``: with its ``hydra`` node."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """The test's own cache of generated benchmarks (EDITLAB_CACHE), so no test sees another's sets."""
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_components():
    from editlab.models.loading import load_components

    return load_components(TINY, FP32, NO_OFFLOAD, "cpu")


class Finished(NamedTuple):
    """What a program run gave: its exit status and what it printed (like subprocess.CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def call_main(monkeypatch, capsys):
    """``call_main(script, *args)`` runs ``python <script>.py args`` in this process: the script's ``@hydra.main``
    function parses ``sys.argv`` as on the command line (multiruns included, with their callbacks), without paying
    a new interpreter's imports. Exit status as Python gives it (``sys.exit(str)``: 1 with the text on stderr, an
    uncaught exception: 1 with its traceback); the root logger's handlers and level (Hydra configures logging per
    job), the environment and Hydra's global state are restored afterwards."""
    root = logging.getLogger()
    handlers, level, environ = root.handlers[:], root.level, dict(os.environ)

    def call(script: str, *args: str) -> Finished:
        module = importlib.import_module(script)
        monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
        capsys.readouterr()  # only what this run prints
        code, trace = 0, ""
        try:
            module.main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            if isinstance(exit_.code, str):
                trace = exit_.code + "\n"
        except Exception:  # noqa: BLE001 - as the interpreter reports an uncaught exception
            code, trace = 1, traceback.format_exc()
        finally:
            GlobalHydra.instance().clear()
        out = capsys.readouterr()
        return Finished(code, out.out, out.err + trace)

    yield call
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    os.environ.clear()
    os.environ.update(environ)
