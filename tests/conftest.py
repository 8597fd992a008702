import importlib
import logging
import os
import sys
import traceback
from typing import NamedTuple

import pytest
from hydra.core.global_hydra import GlobalHydra

# Tests never touch the network or a W&B server. Tiny models are overhead-bound: one thread is faster on 2 shared
# cores (and subprocesses such as run.py inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TINY = {"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64}
FP32 = {"dtype": "float32", "vae_dtype": "float32"}
NO_OFFLOAD = {"mode": "none"}


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
