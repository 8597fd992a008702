import os

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
