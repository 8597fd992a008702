"""Local weight paths: ``./weights/toy`` means the working directory's, else the repository's shipped copy."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def is_local(path: str) -> bool:
    """Absolute and ./relative paths name local folders; anything else is a hub id."""
    return Path(path).expanduser().is_absolute() or path.startswith(".")


def resolve_local(path: str) -> Path:
    """The folder ``path`` names: as given, or (for a relative path missing from the working directory) under the
    repository root, so shipped weights load from any directory. Returned as given when neither exists."""
    local = Path(path).expanduser()
    if not local.is_absolute() and not local.exists() and (REPO_ROOT / local).exists():
        return REPO_ROOT / local
    return local
