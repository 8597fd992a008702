"""The editor protocol every method implements, and the registry that maps ``editor.name`` to a class.

An editor is built once per run from the loaded components and its own config, then called per item:

    editor = build_editor(cfg.editor, components)
    result = editor.edit(EditRequest(image, source_prompt, target_prompt, ...))

It returns the edited image (and the reconstruction where the method has one) with the number of UNet forward
calls and the seconds the edit took; the harness measures memory around it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from PIL import Image

from editors.models import Components, count_unet_calls


@dataclass
class EditRequest:
    image: Image.Image  # RGB, already at the model's resolution
    source_prompt: str  # brackets stripped
    target_prompt: str
    instruction: str = ""
    blend_words: tuple[str, str] | None = None  # (word in source prompt, word in target prompt)
    seed: int = 0


@dataclass
class EditResult:
    edited: Image.Image
    reconstruction: Image.Image | None = None
    nfe: int = 0  # UNet forward calls
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)  # per-method figures, e.g. inversion seconds


class Editor:
    """Base class: subclasses implement `_edit`; `edit` adds seeding, timing and UNet-call counting."""

    name: str = ""

    def __init__(self, components: Components, **params: Any):
        self.components = components
        self.params = params

    def _edit(self, request: EditRequest) -> EditResult:
        raise NotImplementedError

    def edit(self, request: EditRequest) -> EditResult:
        torch.manual_seed(request.seed)
        device = self.components.device
        _sync(device)
        start = time.perf_counter()
        with count_unet_calls(self.components.unet) as calls:
            result = self._edit(request)
        _sync(device)
        result.seconds = time.perf_counter() - start
        result.nfe = calls["n"]
        return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


EDITORS: dict[str, type[Editor]] = {}


def _import_editor_modules() -> None:
    """Import every module of the ``editors`` package; each registers its editors with `register`."""
    import editors

    for module in pkgutil.iter_modules(editors.__path__):
        importlib.import_module(f"editors.{module.name}")


def register(name: str) -> Callable[[type[Editor]], type[Editor]]:
    def wrap(cls: type[Editor]) -> type[Editor]:
        cls.name = name
        EDITORS[name] = cls
        return cls

    return wrap


def _parameters(cls: type[Editor]) -> list[str]:
    """The constructor parameters of an editor class, following ``**kwargs`` passed on to its parent classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in ("self", "components") and p.name not in names]
        if klass is Editor or not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def build_editor(cfg: Mapping[str, Any], components: Components) -> Editor:
    """``cfg`` is the ``editor`` config: ``name`` picks the class, every other key is a constructor parameter."""
    _import_editor_modules()
    params = dict(cfg)
    name = params.pop("name")
    if name not in EDITORS:
        raise KeyError(f"unknown editor {name!r}; available: {', '.join(sorted(EDITORS))}")
    accepted = _parameters(EDITORS[name])
    if unknown := sorted(set(params) - set(accepted)):  # e.g. debug's editor.num_steps on an editor without steps
        raise TypeError(f"editor {name} has no parameter {', '.join(unknown)}; "
                        f"it takes: {', '.join(accepted) or 'none'}")
    return EDITORS[name](components, **params)
