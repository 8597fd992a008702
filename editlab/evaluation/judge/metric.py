"""The judge as a metric set (``metrics=gedit_judge`` / ``metrics=imgedit_judge``): run.py judges each edit as it
makes it, through the metric protocol (`evaluation.protocol`).

Columns are numbers only (results.csv and the summaries average numeric columns): GEdit ``gedit_sc, gedit_pq,
gedit_o`` and the four sub-scores; ImgEdit ``imgedit_s1..s3`` (the type's three criteria in its prompt's order),
``imgedit_avg`` and ``imgedit_cap_violation`` (1 when the reply broke the rubric's cap). A failed judgement leaves
the scores NaN and puts its status on the row's note ("gedit_o failed (judge parse_error: ...)"), which the summary
counts (``n_gedit_o``: the items its mean is over). Every call goes to ``calls_log`` (the job's
``judge_calls.jsonl``, so a resumed job repeats no call) and ``judge.json`` beside it records the judge, the
protocol's hashes and the status counts of every item the log's final records hold for this judge (the whole job,
resumed runs included), rewritten after each batch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from editlab.evaluation import backbones
from editlab.evaluation.files import atomic_write_json
from editlab.evaluation.judge.backends import BACKEND_KEYS, build_backend
from editlab.evaluation.judge.protocols import protocol as make_protocol
from editlab.evaluation.judge.record import CallLog, pass_record
from editlab.evaluation.judge.scoring import Judge, logged_statuses, status_of
from editlab.evaluation.protocol import Column, Metric, Sample


class JudgeMetric(Metric):
    needs = frozenset({"edited", "source", "instruction"})

    def __init__(self, judge: Judge | None, protocol, backend_info: dict, label: str = "") -> None:
        """``judge`` None: the judge could not be loaded (``on_missing: warn``), every column is unavailable."""
        self.judge, self.protocol, self.backend_info, self.label = judge, protocol, backend_info, label
        scores = protocol.scores
        self.columns = tuple(Column(c, higher_is_better=True if c in scores else None) for c in protocol.columns)
        self.headline = scores[:3]

    @property
    def unavailable(self) -> list[str]:
        return [] if self.judge else list(self.columns)

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        if self.judge is None:
            return [dict.fromkeys(self.columns, math.nan) for _ in samples]
        rows = []
        for sample in samples:
            if not sample.key or sample.source is None:
                raise ValueError("the judge needs each item's key and source image (a Sample with key and source)")
            parsed = self.judge.judge(sample.key, sample.edit_type, sample.instruction,
                                      Image.fromarray(sample.source), Image.fromarray(sample.edited))
            row = self.judge.protocol.row(parsed)
            status, message = status_of(parsed)
            for column in self.judge.protocol.scores:
                if row[column] != row[column]:  # NaN: a case it needs failed
                    sample.failures[column] = f"judge {status}: {message[:160]}"
            rows.append(row)
        self._write_record()
        return rows

    def _write_record(self) -> None:
        # counted from the log, by key (run.py's untimed warm-up scores its first item twice)
        statuses = logged_statuses(self.judge.calls, self.judge.protocol, self.judge.identity)
        record = pass_record(self.judge.protocol, self.backend_info, Counter(statuses.values()), [],
                             self.judge.max_attempts,
                             self.judge.calls, self.judge.new_calls, label=self.label,
                             mode="run.py metric (source and edit as the harness prepared them)")
        atomic_write_json(self.judge.calls.path.with_name("judge.json"), record)


def build_judge_metric(benchmark: str, cfg: Mapping, device, names: Mapping[str, str] | None,
                       prefix: str) -> JudgeMetric:
    """``cfg``: ``calls_log`` (path), ``max_attempts``, ``judge_label`` (what the judge is, for judge.json; not
    ``label``, which marks toy backbones in the tables), ``on_missing`` (a local judge that cannot be loaded: stop,
    or with ``warn`` score nothing, its columns unavailable), ``backend`` (`backends.build_backend`)."""
    names = names or {}
    name = {key: names.get(key, f"{prefix}.{key}") for key in ("calls_log", "on_missing")}
    on_missing = backbones.check_on_missing(cfg)
    if not cfg.get("calls_log"):
        raise ValueError(f"{name['calls_log']} is not set: the judge's calls log (judge_calls.jsonl in the job's "
                         "folder)")
    section = cfg.get("backend") or {}
    backend_names = {key[len("backend."):]: flag for key, flag in names.items() if key.startswith("backend.")}
    backend_names = backend_names or {key: f"{prefix}.backend.{key}" for key in BACKEND_KEYS}
    if section.get("name") == "transformers" and section.get("path"):  # weights that may be missing
        backend = backbones.try_load(f"the {benchmark} judge", repr(section["path"]),
                                     backbones.HF_HINT(backend_names["path"]),
                                     lambda: build_backend(section, str(device), backend_names), on_missing,
                                     name["on_missing"])
    else:  # a configuration problem: always stops
        backend = build_backend(section, str(device), backend_names)
    protocol = make_protocol(benchmark)
    if backend is None:
        return JudgeMetric(None, protocol, {}, cfg.get("judge_label") or "")
    judge = Judge(protocol, backend, CallLog(Path(cfg["calls_log"])), cfg.get("max_attempts", 3))
    return JudgeMetric(judge, protocol, backend.describe(), cfg.get("judge_label") or "")


def build_gedit_judge(cfg: Mapping, device="cpu", names: Mapping[str, str] | None = None,
                      prefix: str = "metrics") -> JudgeMetric:
    return build_judge_metric("gedit", cfg, device, names, prefix)


def build_imgedit_judge(cfg: Mapping, device="cpu", names: Mapping[str, str] | None = None,
                        prefix: str = "metrics") -> JudgeMetric:
    return build_judge_metric("imgedit", cfg, device, names, prefix)
