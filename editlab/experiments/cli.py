"""What run.py and train.py say before a job starts; it imports nothing heavy, so ``--help`` returns before torch
would load.

- ``--help`` (``conf/hydra/help/<program>.yaml``) is Hydra's help template, whose ``${program_groups:}`` lists the
  config groups the program composes, with their subgroups, as Hydra's ``$APP_CONFIG_GROUPS`` lists every group
  under ``conf/`` (which both programs share). Importing this module registers that resolver, and
  ``path_safe``, which makes a sweep value one folder name.
- ``needs_launcher``: Hydra's launcher plugins are extras of this package; a missing one stops with the extra to
  install (Hydra itself only says that it cannot find ``hydra/launcher/<name>``)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from omegaconf import DictConfig, OmegaConf


def _with_subgroups(repository, group: str) -> Iterator[str]:
    if repository.get_group_options(group, ObjectType.CONFIG):
        yield group
    for subgroup in repository.get_group_options(group, ObjectType.GROUP):
        yield from _with_subgroups(repository, f"{group}/{subgroup}")


def program_groups(*, _root_: DictConfig) -> str:
    """``group: option, ...`` for the groups of this composition's defaults list (Hydra's own left out)."""
    chosen = {key.split("@")[0] for key in _root_.hydra.runtime.choices}  # editor_settings@editor: a package
    # the loader's repository, not its per-call copies: Hydra's own listing takes seconds on this many groups
    repository = GlobalHydra.instance().config_loader().repository
    groups = sorted({g for own in chosen if own != "hydra" and not own.startswith("hydra/")
                     for g in _with_subgroups(repository, own)})
    return "\n".join(f"{g}: {', '.join(sorted(repository.get_group_options(g, ObjectType.CONFIG)))}" for g in groups)


OmegaConf.register_new_resolver("program_groups", program_groups, replace=True)


def path_safe(value: Any) -> str:
    """A sweep value as one folder name (the ``path_safe`` resolver of the job folders' names): path separators and
    ``%`` percent-encoded, so ``x/../../escaped`` stays inside the sweep folder; over-long names end in a hash."""
    text = str(value).replace("%", "%25").replace("/", "%2F").replace("\\", "%5C").replace("\0", "%00")
    if len(text.encode()) > 200:
        text = f"{text.encode()[:180].decode(errors='ignore')}~{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return text


OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)


def run_names(experiment: str, what: str, output_dir: Path, job_num: int | None = None,
              started: str | None = None) -> tuple[str, str]:
    """The W&B group and run name of an editing or a training run, one convention for both: in a sweep, the
    experiment and the sweep's start (``toy_tour 2026-12-01 10-06-15``) and the job number and what runs
    (``3 ddim_p2p toy fp32``); a single run: the experiment and its folder's date, what runs and its folder's time."""
    if job_num is not None:
        return f"{experiment} {started}", f"{job_num} {what}"
    return f"{experiment} {output_dir.parent.name}", f"{what} {output_dir.name.split('_', 1)[0]}"


# hydra/launcher=<name>: (the plugin's module, the extra of pyproject.toml that installs it)
LAUNCHERS = {"joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
             "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
             "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm")}


def needs_launcher(main: Callable) -> Callable:
    """Wraps a ``@hydra.main`` function: a ``hydra/launcher=`` on the command line whose plugin is not installed
    stops with the install command."""

    @functools.wraps(main)
    def checked(*args, **kwargs):
        for arg in sys.argv[1:]:
            name = arg.split("=", 1)[1] if arg.startswith("hydra/launcher=") else None
            if name in LAUNCHERS and importlib.util.find_spec(LAUNCHERS[name][0]) is None:
                extra = LAUNCHERS[name][1]
                sys.exit(f"error: hydra/launcher={name} needs Hydra's launcher plugin, which is not installed: "
                         f'pip install -e ".[{extra}]" in the repository (or pip install "editlab[{extra}]")')
        return main(*args, **kwargs)

    return checked
