"""The import graph follows the layers (README, "Layers"): a package imports only the layers below it.

    python -m pytest tests/programs/test_layers.py -q   # fails on an upward import, naming the file, line and module
    python tests/programs/test_layers.py              # prints the package graph by layer
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "editlab"  # every module lives under editlab/: layers are its subpackages

# Lowest first; each package may import any package listed under an earlier layer, and its own package.
LAYERS = (
    ("diffusion", "toyworld"),  # the diffusion math (torch only); the toy world's scenes (numpy / PIL only)
    ("models",),  # model loading: families, architectures, the hub, the Components face
    ("icd", "editors"),  # methods: iCD math + training; the editors (editors may use iCD's math, not the reverse)
    ("evaluation",),  # PIE-Bench reader, metrics, summaries, scoring: none of icd / editors
    ("experiments",),  # the run harness, W&B logging, the console, the toy-world build
)
TOP_LEVEL = ("run", "train", "scripts", "benchmarks")  # programs: may import every layer
# Imports a package may not make although their layer is below it.
FORBIDDEN = {"icd": {"editors"}, "evaluation": {"icd", "editors", "diffusion"}}
# What the bottom layer may import from outside the project.
BOTTOM_THIRD_PARTY = {"diffusion": {"torch", "math", "typing", "dataclasses", "__future__"},
                      "toyworld": {"numpy", "PIL", "dataclasses", "typing", "__future__"}}

LAYER_OF = {package: i for i, packages in enumerate(LAYERS) for package in packages}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: ``editlab.models.hub`` -> ``models``, ``torch.nn`` -> ``torch``."""
    parts = module.split(".")
    return parts[1] if parts[0] == PACKAGE and len(parts) > 1 else parts[0]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, layer unit) of every import in ``path``, including those inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _unit(alias.name)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == PACKAGE:
            found += [(node.lineno, alias.name) for alias in node.names]  # from editlab import editors
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, _unit(node.module)))
    return found


def package_files() -> dict[str, list[Path]]:
    return {package: sorted((REPO / PACKAGE / package).rglob("*.py")) for package in LAYER_OF}


def violations() -> list[str]:
    problems = []
    for package, files in package_files().items():
        for path in files:
            for line, module in imports(path):
                where = f"{path.relative_to(REPO)}:{line} imports {module}"
                if module in TOP_LEVEL or (module in LAYER_OF and LAYER_OF[module] > LAYER_OF[package]):
                    problems.append(f"{where}: an upward import ({package} is below {module})")
                elif module in FORBIDDEN.get(package, ()):
                    problems.append(f"{where}: {package} may not import {module}")
                elif package in BOTTOM_THIRD_PARTY and module not in LAYER_OF \
                        and module not in BOTTOM_THIRD_PARTY[package] and module not in sys.stdlib_module_names:
                    allowed = ", ".join(sorted(BOTTOM_THIRD_PARTY[package]))
                    problems.append(f"{where}: {package} is the bottom layer (it may use {allowed})")
    return problems


def graph() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for package, files in package_files().items():
        for path in files:
            edges[package] |= {m for _, m in imports(path) if m in LAYER_OF and m != package}
    return edges


def test_no_upward_imports():
    assert violations() == []


def module_circles(package: str) -> list[list[str]]:
    """Import circles between the modules of ``package`` (imports inside functions included), each as a path."""
    modules = {f"{PACKAGE}.{package}.{path.stem}": path for path in (REPO / PACKAGE / package).glob("*.py")}
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                edges[name].add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.module == f"{PACKAGE}.{package}":
                edges[name] |= {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
    circles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circles.append(path[path.index(name):] + [name])
        elif name not in done:
            for target in sorted(edges[name]):
                visit(target, [*path, name])
            done.add(name)

    for name in sorted(modules):
        visit(name, [])
    return circles


def test_no_import_circle_in_evaluation():
    """aggregate <-> tables and metrics <-> paper_metrics were circles (issue 27); none may come back."""
    assert module_circles("evaluation") == []


def test_every_project_package_has_a_layer():
    packages = {p.parent.name for p in (REPO / PACKAGE).glob("*/__init__.py")} - {"conf", "weights"}
    assert packages <= set(LAYER_OF), f"packages without a layer in LAYERS: {sorted(packages - set(LAYER_OF))}"


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a diffusion module that imports editors is reported."""
    bad = tmp_path / "diffusion" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import torch\n\ndef f():\n    from editlab.editors.base import Editor\n")
    monkeypatch.setattr(sys.modules[__name__], "package_files", lambda: {"diffusion": [bad]})
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations() == ["diffusion/bad.py:4 imports editors: an upward import (diffusion is below editors)"]


if __name__ == "__main__":
    edges = graph()
    for i, packages in enumerate(LAYERS):
        for package in packages:
            print(f"layer {i}  {package:<12} -> {', '.join(sorted(edges[package])) or '(nothing of the project)'}")
    print("programs     editlab.run, editlab.train, scripts/, benchmarks/ -> any layer")
    print("\n".join(violations()) or "no upward import")
