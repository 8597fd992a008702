"""Local weight paths: ``./weights/toy`` means the working directory's, else the repository's shipped copy."""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
from pathlib import Path

from editlab.models.errors import ModelLoadError

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


def local_or_hub(path: str, key: str) -> str:
    """An absolute or ./relative path must be a directory (a clear error now beats a hub lookup); else a hub id."""
    if is_local(path):
        local = resolve_local(path)
        if not local.is_dir():
            raise ModelLoadError(f"{key}={path!r} is not a directory; point {key} at a diffusers model folder")
        return str(local)
    return path


class HubUnreachableError(OSError):
    """A hub id was asked for, the hub cannot be reached, and the local cache does not have it."""


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set, as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within ``timeout`` seconds (asked once per process):
    offline, the hub client would otherwise spend half a minute in retries before a misleading error."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _proxied() -> bool:
    """Behind an HTTP(S) proxy a direct connection says nothing: leave reachability to the hub client."""
    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                           "all_proxy"))


def _cached(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False
    return True


def hub_kwargs(path: str, key: str) -> dict[str, bool]:
    """``from_pretrained`` keyword arguments for weights at ``path`` (config key ``key``): none for a local folder
    or a reachable hub; ``local_files_only`` when the hub is out of reach but the cache holds ``path``; otherwise a
    one-line `HubUnreachableError` that says what to set."""
    if is_local(path) or Path(path).expanduser().exists() or hub_offline() or _proxied() or hub_reachable():
        return {}
    if _cached(path):
        return {"local_files_only": True}
    from huggingface_hub import constants

    raise HubUnreachableError(
        f"{key}={path!r} is a hub id, but the hub ({constants.ENDPOINT}) cannot be reached from here and the local "
        f"cache ({constants.HF_HUB_CACHE}) does not hold it: download it where there is network (then set "
        f"HF_HUB_OFFLINE=1 here), or set {key} to a local folder"
    )
