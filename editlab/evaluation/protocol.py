"""What a metric is to the harness, the scoring CLI and the reports, so that a new metric is one file and one config.

A `Metric` (one score, or a set sharing its backbones) declares its ``columns`` in results.csv's order (each a
`Column`: its name, whether higher is better, how summaries print it; a plain string is a column with none of these),
what it ``needs`` of a `Sample` (`NEEDS`: a metric needing the source image cannot score a generation), which columns
it cannot compute (``unavailable``: a backbone switched off or missing is NaN, never faked), and scores a batch of
samples, one row each. One with set-level scores (FID) also declares ``set_columns`` and scores the job's saved
outputs against reference images in ``finish``; ``headline`` names the columns the sweep report shows.

Summaries and reports read results files, not metrics: they know the declarations of the metric sets editlab ships
(`evaluation.summary.SHIPPED`, the ground-truth comparison included); another metric's columns are averaged under
their own names.

``metrics=<name>`` picks conf/metrics/<name>.yaml, whose ``kind`` (absent: piebench) is a name in `BUILDERS` or a
``module:function`` path to a builder ``(cfg, device, names, prefix) -> Metric``; a config with ``sets`` (one entry
per metric config, e.g. conf/metrics/piebench_icd_paper.yaml) combines them, columns in the order of the entries.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

NEEDS = frozenset({"source", "edited", "prompts", "instruction", "mask", "ground_truth", "references"})
# metric kind -> its builder; a config may also name any "module:function"
BUILDERS = {"piebench": "editlab.evaluation.metrics:build_piebench_metrics",
            "icd_paper": "editlab.evaluation.paper_metrics:build_icd_metrics",
            "gedit_judge": "editlab.evaluation.judge.metric:build_gedit_judge",
            "imgedit_judge": "editlab.evaluation.judge.metric:build_imgedit_judge",
            "none": "editlab.evaluation.protocol:no_metrics"}


class Column(str):
    """A metric's column: its name in results.csv (a Column is that string, so it keys rows and frames as the name
    does), whether a higher value is better (None: neither, a score kept for context), and how summary.csv prints it
    as the papers' tables do: under the name ``paper`` and times ``factor`` (PIE-Bench's ``structure_distance`` is
    ``struct_x1e3``, its value x 1000); without ``paper``, under its own name and unscaled."""

    higher_is_better: bool | None
    paper: str
    factor: float

    def __new__(cls, name: str, higher_is_better: bool | None = None, paper: str = "", factor: float = 1.0) -> Column:
        column = super().__new__(cls, name)
        column.higher_is_better, column.paper, column.factor = higher_is_better, paper, factor
        return column

    @property
    def summary_name(self) -> str:
        """Its name in summary.csv."""
        return self.paper or str(self)


@dataclass
class Sample:
    """One item to score: uint8 HWC images, the (H, W) 0/1 edit mask (1 = edited), the prompts the output was made
    with. A metric records in ``failures`` which of its columns' backbones failed for it, and why (a note on the
    row: `evaluation.backbones.failure_notes`). ``key`` and ``edit_type`` name the item (a judge records its calls
    by key and picks its rubric by type)."""

    edited: np.ndarray
    source: np.ndarray | None = None
    mask: np.ndarray | None = None
    source_prompt: str = ""
    target_prompt: str = ""
    instruction: str = ""
    ground_truth: np.ndarray | None = None
    failures: dict[str, str] = field(default_factory=dict)
    key: str = ""
    edit_type: str = ""


class Metric:
    """The protocol, with the defaults of a metric that has no set-level score and no backbone to miss."""

    columns: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset({"edited"})
    set_columns: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()  # of its columns, those the sweep report's line per run shows, in that order

    @property
    def unavailable(self) -> list[str]:
        return []

    @property
    def set_unavailable(self) -> list[str]:
        return []

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        """One ``{column: value}`` per sample, with every column of ``columns``."""
        raise NotImplementedError

    def finish(self, outputs: Sequence[Path], references: Sequence[Path]) -> dict[str, float]:
        """``{set column: value}`` of the saved outputs against the reference images."""
        return {}


class MetricSets(Metric):
    """Several metrics scored as one: their columns in order, their needs together."""

    def __init__(self, metrics: Sequence[Metric]) -> None:
        self.metrics = list(metrics)
        self.columns = tuple(c for m in self.metrics for c in m.columns)
        self.set_columns = tuple(c for m in self.metrics for c in m.set_columns)
        self.headline = tuple(c for m in self.metrics for c in m.headline)
        self.needs = frozenset().union(*(m.needs for m in self.metrics))
        if len(set(self.columns + self.set_columns)) < len(self.columns + self.set_columns):
            raise ValueError(f"metric sets with a column in common: {', '.join(self.columns + self.set_columns)}")

    @property
    def unavailable(self) -> list[str]:
        return [c for m in self.metrics for c in m.unavailable]

    @property
    def set_unavailable(self) -> list[str]:
        return [c for m in self.metrics for c in m.set_unavailable]

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        rows: list[dict[str, float]] = [{} for _ in samples]
        for metric in self.metrics:
            for row, part in zip(rows, metric.score(samples), strict=True):
                row.update(part)
        return rows

    def finish(self, outputs: Sequence[Path], references: Sequence[Path]) -> dict[str, float]:
        return {k: v for m in self.metrics if m.set_columns for k, v in m.finish(outputs, references).items()}


def no_metrics(cfg: Mapping, device: str | torch.device = "cpu", names: Mapping[str, str] | None = None,
               prefix: str = "metrics") -> Metric:
    """``metrics=none``: no score, the outputs and their costs only (a judged benchmark's scores come from its judge,
    afterwards)."""
    return NoMetrics()


class NoMetrics(Metric):
    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        return [{} for _ in samples]


def builder(kind: str) -> Callable[..., Metric]:
    module, _, name = BUILDERS.get(kind, kind).partition(":")
    if not name:
        raise ValueError(f"unknown metrics.kind={kind!r}; expected {' or '.join(BUILDERS)} (or a module:function)")
    return getattr(importlib.import_module(module), name)


def build_metrics(cfg: Mapping, device: str | torch.device = "cpu", names: Mapping[str, str] | None = None,
                  prefix: str = "metrics") -> Metric:
    """The metric of a plain config mapping (``metrics``: its ``kind``'s builder loads its backbones), or with
    ``sets`` every entry's, combined. ``names``: what the user sets for each of the builder's keys (default:
    ``<prefix>.<key>``, run.py's config keys; the scoring CLI names its flags), so the messages name what to
    change."""
    if sets := cfg.get("sets"):
        return MetricSets([build_metrics(sub, device, None, f"{prefix}.sets.{name}") for name, sub in sets.items()])
    return builder(cfg.get("kind", "piebench"))(cfg, device, names, prefix)
