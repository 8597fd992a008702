import os
from pathlib import Path

import pytest

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
    from models.loading import load_components

    return load_components(TINY, FP32, NO_OFFLOAD, "cpu")


@pytest.fixture
def editor_config():
    """``editor_config(name)``: the composed ``editor`` config of ``editor=<name>`` on the plain defaults (a dict)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    def compose_editor(name: str) -> dict:
        conf = Path(__file__).resolve().parents[1] / "conf"
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="run", overrides=["~experiment", f"editor={name}"])
        return OmegaConf.to_container(cfg.editor, resolve=True)

    return compose_editor
