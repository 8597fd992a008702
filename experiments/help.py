"""The programs' ``--help`` (``conf/hydra/help/<program>.yaml``): Hydra's help template, whose
``${program_groups:}`` lists the config groups the program composes, with their subgroups, as Hydra's
``$APP_CONFIG_GROUPS`` lists every group under ``conf/`` (which run.py and train.py share). Importing this module
registers the resolver; it imports nothing heavy, so ``--help`` returns before torch would load."""

from __future__ import annotations

from collections.abc import Iterator

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
