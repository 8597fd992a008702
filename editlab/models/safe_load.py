"""Loading weights files without running code from them.

A ``.pt`` / ``.pth`` / ``.bin`` file is a pickle, and unpickling can call any function (``os.system`` included).
``torch.load(weights_only=True)`` unpickles tensors and plain containers only. Our own loads pass it; some libraries
we call do not: ``torch.hub.load_state_dict_from_url`` (torchvision's and piq's backbone weights, torch-fidelity's
InceptionV3 from the hub cache) defaults to ``weights_only=False``, and torch-fidelity loads a user-given Inception
file with ``weights_only=False`` explicitly. `weights_only_loading` closes that door for every load inside it: while
it is active, each ``torch.load`` in the process runs with ``weights_only=True``, and a file that needs more is
refused with `UnsafeWeightsError` naming it. Safetensors files hold no code and are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import threading
from collections.abc import Iterator

import torch

_lock = threading.RLock()
_depth = 0
_original_load = torch.load


class UnsafeWeightsError(pickle.UnpicklingError):
    """A weights file whose pickle builds more than tensors and plain containers (and so could run code)."""


def _describe(f: object) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return getattr(f, "name", None) or type(f).__name__


@functools.wraps(_original_load)
def _weights_only_load(f, *args, **kwargs):
    kwargs["weights_only"] = True
    try:
        return _original_load(f, *args, **kwargs)
    except pickle.UnpicklingError as err:
        raise UnsafeWeightsError(
            f"refused to load {_describe(f)}: it is a pickle that builds objects other than tensors (loading it "
            f"could run code from it; {str(err).splitlines()[0]}). Use a safetensors file or a plain state dict "
            "saved with torch.save(model.state_dict(), ...)") from None


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True`` (nestable, usable as a decorator)."""
    global _depth
    with _lock:
        if _depth == 0:
            torch.load = _weights_only_load
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.load = _original_load


def safe_loading(function):
    """Decorator: run ``function`` inside `weights_only_loading`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with weights_only_loading():
            return function(*args, **kwargs)

    return wrapper
