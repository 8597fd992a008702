"""The editor protocol every method implements, and the registry that maps ``editor.name`` to a class.

An editor is built once per run from the loaded components and its own config, then called per item:

    editor = build_editor(cfg.editor, components)
    result = editor.edit(EditRequest(image, source_prompt, target_prompt, ...))

It returns the edited image (and the reconstruction where the method has one) with the number of UNet forward
calls and the seconds the edit took; the harness measures memory around it. Methods that can also invert an image
and decode it back, or generate from text, list those tasks in ``tasks`` and implement `_reconstruct` /
`_generate`; ``editor.run(task, request)`` calls the one a task needs, timed and counted the same way.

``editor.run_batch(task, requests)`` does a task on several requests; by default one at a time. An editor that
batches for real (`editors.ddim`) runs them as one computation and shares its seconds and calls equally among the
results (``EditResult.batch_size``). Randomness comes from each request's own generator (`EditRequest.generator`),
never from the global seed, so an item draws the same noise alone and in a batch.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import math
import pkgutil
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from PIL import Image

from editlab.models.components import Components, count_forward_calls
from editlab.models.safe_load import safe_loading

TASKS = ("edit", "inversion", "generation")


@dataclass
class EditRequest:
    image: Image.Image | None  # RGB, already at the model's resolution (None for text-to-image generation)
    source_prompt: str  # brackets stripped
    target_prompt: str
    instruction: str = ""
    blend_words: tuple[str, str] | None = None  # (word in source prompt, word in target prompt)
    seed: int = 0

    def generator(self) -> torch.Generator:
        """The request's own random stream: a CPU generator seeded with ``seed`` (CPU noise is the same on every
        device, and the same stream ``torch.manual_seed(seed)`` gave before requests had their own)."""
        return torch.Generator().manual_seed(self.seed)


@dataclass
class EditResult:
    edited: Image.Image  # the edit; the reconstruction (inversion task); the generated image (generation task)
    reconstruction: Image.Image | None = None
    nfe: float = 0  # UNet forward calls (of a batch: its calls / batch_size)
    seconds: float = 0.0  # (of a batch: its seconds / batch_size)
    batch_size: int = 1  # the requests computed together, whose cost this result shares
    extras: dict[str, Any] = field(default_factory=dict)  # per-method figures, e.g. inversion seconds


class Editor:
    """Base class: subclasses implement `_edit` (and `_reconstruct` / `_generate` for the ``tasks`` they list);
    `run` adds timing and UNet-call counting; an editor that batches for real overrides `run_batch`."""

    name: str = ""
    tasks: tuple[str, ...] = ("edit",)  # of TASKS: what the method does
    families: tuple[str, ...] | None = None  # the model families it runs on (`models.families`); None: any
    parameter_choices: dict[str, tuple[str, ...]] = {}  # the allowed string values of parameters, by name
    # what of an item the method reads besides its image ("prompts": the source and target captions; "instruction":
    # the editing instruction); a dataset whose items lack it is refused before the model loads
    needs: frozenset[str] = frozenset({"prompts"})
    # True: takes the source at its own size and sizes it as its model wants (an instruction editor that keeps the
    # aspect); False: the harness fits it to the model's square resolution (short side, centre crop)
    native_size: bool = False

    def __init__(self, components: Components):
        self.components = components

    def _edit(self, request: EditRequest) -> EditResult:
        raise NotImplementedError

    def _reconstruct(self, request: EditRequest) -> EditResult:
        """Invert ``request.image`` with the source prompt and decode it back with the same prompt."""
        raise NotImplementedError

    def _generate(self, request: EditRequest) -> EditResult:
        """Text-to-image from ``request.source_prompt``, its noise from ``request.generator()``."""
        raise NotImplementedError

    def networks(self) -> list[torch.nn.Module]:
        """The networks whose forward calls are an edit's NFE: the denoiser, plus any an editor owns (its derived
        model's copy, a ControlNet counts separately)."""
        return [self.components.denoiser]

    def close(self) -> None:
        """Release what the editor holds beyond the shared model (a pipeline, hooks); it never changes the shared
        model, whose modules an editor does not assign, cast or patch (it derives a model of its own instead)."""

    def __enter__(self) -> "Editor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def edit(self, request: EditRequest) -> EditResult:
        return self.run("edit", request)

    def run(self, task: str, request: EditRequest) -> EditResult:
        """``task`` (one of ``tasks``) on ``request``: the result with its seconds and UNet forward calls."""
        self.check_task(task)
        method = {"edit": self._edit, "inversion": self._reconstruct, "generation": self._generate}[task]
        (result,) = self._measured(lambda: [method(request)])
        return result

    def run_batch(self, task: str, requests: list[EditRequest]) -> list[EditResult]:
        """``task`` on each of ``requests``, results in order. By default one `run` after another (each result
        with its own cost); an editor that batches for real overrides this and measures the batch (`_measured`)."""
        return [self.run(task, request) for request in requests]

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"editor {self.name} does not do task={task}; it does: {', '.join(self.tasks)}")

    def _measured(self, compute: Callable[[], list[EditResult]]) -> list[EditResult]:
        """``compute()``'s results, each with an equal share of the seconds it took and the UNet forward calls it
        made: a batch is one computation, so an item's cost is the batch's divided by its size."""
        device = self.components.device
        _sync(device)
        start = time.perf_counter()
        with count_forward_calls(*self.networks()) as calls:
            results = compute()
        _sync(device)
        seconds, size = time.perf_counter() - start, len(results)
        for result in results:
            result.seconds, result.batch_size = seconds / size, size
            result.nfe = calls["n"] / size if size > 1 else calls["n"]  # alone: a whole number, as results.csv had
        return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def pipeline_latents(pipe: Callable, generator: torch.Generator, num_steps: int, guidance_scale: float,
                     **inputs: Any) -> torch.Tensor:
    """The final latents (compute dtype) of a diffusers pipeline's ``num_steps`` steps at ``guidance_scale`` from
    ``generator``'s noise, for an editor that samples with one: it stops before the pipeline's own decode, so the
    editor decodes with the components' VAE (in ``precision.vae_dtype``, NaN-checked). ``inputs``: the pipeline's
    others (prompt, image, ...)."""
    return pipe(**inputs, num_inference_steps=num_steps, guidance_scale=guidance_scale, generator=generator,
                output_type="latent").images


def required_instruction(request: EditRequest, editor: str) -> str:
    """The request's editing instruction, or a ValueError (the item's failure row) for an item without one."""
    if not request.instruction.strip():
        raise ValueError(f"the item has no editing instruction (the benchmark's editing_instruction is empty), and "
                         f"editor {editor} edits from an instruction only")
    return request.instruction


EDITORS: dict[str, type[Editor]] = {}


def _import_editor_modules() -> None:
    """Import every module of the ``editors`` package; each registers its editors with `register`."""
    from editlab import editors

    for module in pkgutil.iter_modules(editors.__path__):
        importlib.import_module(f"{editors.__name__}.{module.name}")


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


class EditorConfigError(ValueError):
    """An editor parameter of the wrong type or out of range; raised before the first edit."""


# Ranges of the parameters the editors share, by name: (lowest, highest), None = unbounded.
PARAMETER_RANGES: dict[str, tuple[float | None, float | None]] = {
    "num_steps": (1, 1000), "num_inner_steps": (0, None), "num_reg_steps": (0, None), "num_ac_rolls": (0, None),
    "guidance_scale": (0, None), "code_guidance_scale": (0, None), "image_guidance_scale": (0, None),
    "xa_guidance": (0, None),
    "cross_replace_steps": (0, 1), "self_replace_steps": (0, 1), "blend_start": (0, 1), "blend_threshold": (0, 1),
    "tau": (0, 1), "amplify": (0, None), "learning_rate": (0, None), "early_stop_epsilon": (0, None),
    "lambda_ac": (0, None), "lambda_kl": (0, None), "lora_rank": (1, None), "lora_alpha": (0, None),
    "controlnet_conditioning_scale": (0, None), "canny_low": (0, 255), "canny_high": (0, 255),
    "reverse_steps": (0, 999), "forward_steps": (0, 999),  # each timestep of the list
    "inversion_guidance_scale": (0, None), "true_cfg_scale": (0, None), "max_area": (1, None),
    "gamma": (0, 1), "eta": (0, 1), "eta_start": (0, 1), "eta_stop": (0, 1), "eta_decay_power": (0, None),
}


def _inits(cls: type[Editor]) -> list[Callable]:
    """The ``__init__`` functions an editor class defines along its MRO, base classes first."""
    return [vars(k)["__init__"] for k in reversed(cls.__mro__) if "__init__" in vars(k) and k is not object]


def _defaults(cls: type[Editor]) -> dict[str, Any]:
    """The constructor defaults of an editor class (the most derived class's where several set one)."""
    return {p.name: p.default for init in _inits(cls) for p in inspect.signature(init).parameters.values()
            if p.default is not p.empty}


def _annotations(cls: type[Editor]) -> dict[str, Any]:
    return {name: hint for init in _inits(cls) for name, hint in typing.get_type_hints(init).items()}


def _checked(name: str, value: Any, kind: Any, choices: Mapping[str, tuple[str, ...]], default: Any = None) -> Any:
    """``value`` as the annotated ``kind`` (int, float, bool, str, a sequence of one of them, or any of them | None,
    or a settings dataclass); raises `EditorConfigError` naming ``editor.<name>`` when it is not one, or out of its
    range."""
    if dataclasses.is_dataclass(kind):  # a settings object, e.g. editor.p2p: its fields, checked one by one
        return _checked_settings(name, value, kind, default if isinstance(default, kind) else kind())
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) in (collections.abc.Sequence, list, tuple):
        if not isinstance(value, (list, tuple)):
            raise EditorConfigError(f"editor.{name}={value!r} must be a list")
        return [_checked(name, v, typing.get_args(kind)[0], choices) for v in value]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and not isinstance(value, bool):
        raise EditorConfigError(f"editor.{name}={value!r} must be true or false")
    if kind is int and not (is_number and float(value).is_integer()):
        raise EditorConfigError(f"editor.{name}={value!r} must be an integer")
    if kind is float and not (is_number and math.isfinite(value)):
        raise EditorConfigError(f"editor.{name}={value!r} must be a finite number")
    if kind is str and not isinstance(value, str):
        raise EditorConfigError(f"editor.{name}={value!r} must be a string")
    low, high = PARAMETER_RANGES.get(name.rsplit(".", 1)[-1], (None, None))
    if is_number and (low is not None and value < low or high is not None and value > high):
        bound = f"between {low} and {high}" if low is not None and high is not None else \
            f"at least {low}" if low is not None else f"at most {high}"
        raise EditorConfigError(f"editor.{name}={value!r} is out of range: it must be {bound}")
    field = name.rsplit(".", 1)[-1]
    if field in choices and value not in choices[field]:
        raise EditorConfigError(f"editor.{name}={value!r} must be one of {', '.join(choices[field])}")
    return int(value) if kind is int else float(value) if kind is float else value


def _checked_settings(name: str, value: Any, kind: type, default: Any) -> Any:
    """A mapping of some of ``kind``'s fields -> ``default`` with those fields replaced, each checked."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, Mapping):
        raise EditorConfigError(f"editor.{name}={value!r} must be a mapping of {kind.__name__} fields")
    fields = {f.name for f in dataclasses.fields(kind)}
    if unknown := sorted(set(value) - fields):
        raise EditorConfigError(f"editor.{name} has no field {', '.join(unknown)}; "
                                f"it takes: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(kind)
    choices = getattr(kind, "choices", {})
    return dataclasses.replace(default, **{k: _checked(f"{name}.{k}", v, hints[k], choices) for k, v in value.items()})


def editor_arguments(cfg: Mapping[str, Any]) -> tuple[type[Editor], dict[str, Any]]:
    """``cfg`` is the ``editor`` config: ``name`` picks the class, every other key is a constructor parameter (1:1),
    checked against its annotation and range. Returns the class and its checked keyword arguments."""
    _import_editor_modules()
    params = dict(cfg)
    name = params.pop("name")
    if name not in EDITORS:
        raise KeyError(f"unknown editor {name!r}; available: {', '.join(sorted(EDITORS))}")
    cls = EDITORS[name]
    accepted = _parameters(cls)
    if unknown := sorted(set(params) - set(accepted)):  # e.g. debug's editor.num_steps on an editor without steps
        raise TypeError(f"editor {name} has no parameter {', '.join(unknown)}; "
                        f"it takes: {', '.join(accepted) or 'none'}")
    hints, defaults = _annotations(cls), _defaults(cls)
    return cls, {k: _checked(k, v, hints[k], cls.parameter_choices, defaults.get(k)) if k in hints else v
                 for k, v in params.items()}


@safe_loading
def build_editor(cfg: Mapping[str, Any], components: Components) -> Editor:
    """The editor the ``editor`` config describes (`editor_arguments`), on ``components``; bad values raise before
    it is built."""
    cls, params = editor_arguments(cfg)
    check_family(cls, components.family.name)
    return cls(components, **params)


def check_family(cls: type[Editor], family: str) -> None:
    """Stop before building an editor on a model family it does not support, naming the editors that fit (an editor
    for any family fits those with ``generic_editors``)."""
    from editlab.models.families import FAMILIES

    def fits(editor: type[Editor]) -> bool:
        return family in editor.families if editor.families is not None else FAMILIES[family].generic_editors

    if not fits(cls):
        runs_on = ", ".join(cls.families) if cls.families is not None else "generic"
        raise EditorConfigError(f"editor {cls.name} runs on the {runs_on} model families, not on {family}; editors "
                                f"for {family} models: {', '.join(sorted(n for n, e in EDITORS.items() if fits(e)))}")
