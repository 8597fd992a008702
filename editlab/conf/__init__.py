"""The Hydra config groups (one folder each); `group_config` reads one option as plain data, outside a composition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parent


def group_config(group: str, name: str) -> dict[str, Any]:
    """``<group>/<name>.yaml`` resolved, without its Hydra ``defaults`` list (what it would override is the
    composing config's to give); FileNotFoundError when the group has no such option."""
    from omegaconf import OmegaConf

    loaded = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"), resolve=True)
    return {key: value for key, value in loaded.items() if key != "defaults"}
