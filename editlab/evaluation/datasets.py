"""The benchmark a dataset config names, read: PIE-Bench, the built-in toy set (written on first use), iCD's CSVs,
GEdit-Bench and ImgEdit-Bench, with the selection every set has (ids, limit, shards). run.py's harness and the
post-hoc judge (which rebuilds a finished job's benchmark from its job.json) read sets through it."""

from __future__ import annotations

from typing import Any, Mapping

from editlab.evaluation.gedit import GEditDataset
from editlab.evaluation.icd_benchmark import IcdCsvDataset
from editlab.evaluation.imgedit import ImgEditDataset
from editlab.evaluation.instruction_sets import MaskFolder
from editlab.evaluation.piebench import ItemSet, PieBenchDataset
from editlab.evaluation.toyset import dataset_root, write_piebench


def _check_counts(cfg: Mapping[str, Any]) -> None:
    """``dataset.limit`` (null: every item) and the shard settings are whole numbers in range, or the key is named."""
    limit = cfg.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"dataset.limit={limit!r}: give a whole number of items >= 1, or dataset.limit=null for all")
    for key in ("shard", "num_shards"):
        value = cfg.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "num_shards" else 0):
            raise ValueError(f"dataset.{key}={value!r}: give a whole number (shard: 0 <= shard < num_shards)")


def build_dataset(cfg: Mapping[str, Any]) -> ItemSet:
    """The set ``cfg`` (a dataset config) names; a configuration or data problem raises a ValueError naming the key."""
    _check_counts(cfg)
    selection = {"ids": [str(i) for i in cfg["ids"]] if cfg.get("ids") else None, "limit": cfg.get("limit"),
                 "shard": cfg.get("shard", 0), "num_shards": cfg.get("num_shards", 1)}
    if cfg["kind"] in ("gedit", "imgedit"):
        masks = MaskFolder.from_config(cfg.get("masks"), cfg.get("mask_polarity"))
        if cfg["kind"] == "imgedit":
            if not cfg.get("json") or not cfg.get("images"):
                raise ValueError("dataset=imgedit needs dataset.json=/path/to/basic_edit.json and "
                                 "dataset.images=/path/to/its/source/images")
            return ImgEditDataset(cfg["json"], cfg["images"], cfg.get("edit_types"), masks=masks, **selection)
        if not cfg.get("root"):
            raise ValueError("dataset=gedit needs dataset.root=/path/to/GEdit-Bench (python -m "
                             "editlab.evaluation.benchsets download gedit --revision <sha> --to <folder>)")
        return GEditDataset(cfg["root"], cfg["cache"], cfg.get("revision"), cfg.get("language", "en"),
                            cfg.get("subset", "full"), cfg.get("task_types"), masks=masks, **selection)
    if cfg["kind"] == "icd_csv":
        if not cfg.get("csv"):
            raise ValueError(f"dataset={cfg['name']} needs dataset.csv=/path/to/<benchmark>.csv (and dataset.images=)")
        return IcdCsvDataset(cfg["csv"], cfg.get("images"), limit=cfg.get("limit"), shard=cfg.get("shard", 0),
                             num_shards=cfg.get("num_shards", 1))
    root = dataset_root(cfg)
    if root is None:
        raise ValueError(f"dataset={cfg['name']} needs dataset.root=/path/to/the/benchmark (mapping_file.json)")
    if cfg["kind"] == "toyset":
        write_piebench(root, n_per_type=cfg["n_per_type"], size=cfg["size"], seed=cfg["seed"])
    elif cfg["kind"] != "piebench":
        raise ValueError(f"unknown dataset.kind={cfg['kind']!r}; expected piebench, toyset, icd_csv, gedit or "
                         "imgedit")
    edit_types = cfg.get("edit_types")
    return PieBenchDataset(root, edit_types=[str(t) for t in edit_types] if edit_types else None,
                           mask_size=cfg.get("mask_size"), **selection)
