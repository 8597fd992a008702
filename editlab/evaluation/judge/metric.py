"""The judge as a metric set (``metrics=gedit_judge`` / ``metrics=imgedit_judge``): run.py judges each edit as it
makes it, through the metric protocol (`evaluation.protocol`).

Columns are numbers only (results.csv and the summaries average numeric columns): GEdit ``gedit_sc, gedit_pq,
gedit_o`` and the four sub-scores; ImgEdit ``imgedit_s1..s3`` (the type's three criteria in its prompt's order),
``imgedit_avg`` and ``imgedit_cap_violation`` (1 when the reply broke the rubric's cap). A failed judgement leaves
the scores NaN and puts its status on the row's note ("gedit_o failed (judge parse_error: ...)"), which the summary
counts (``n_gedit_o``: the items its mean is over). Every call goes to ``calls_log`` (the job's
``judge_calls.jsonl``, so a resumed job repeats no call) and ``judge.json`` beside it records the judge, the
protocol's hashes and the status counts, rewritten after each item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from editlab.evaluation.files import atomic_write_json
from editlab.evaluation.judge.backends import BACKEND_KEYS, build_backend
from editlab.evaluation.judge.protocols import protocol as make_protocol
from editlab.evaluation.judge.record import CallLog, pass_record
from editlab.evaluation.judge.scoring import Judge, status_of
from editlab.evaluation.protocol import Column, Metric, Sample


class JudgeMetric(Metric):
    needs = frozenset({"edited", "source", "instruction"})

    def __init__(self, judge: Judge, backend_info: dict, label: str = "") -> None:
        self.judge, self.backend_info, self.label = judge, backend_info, label
        scores = judge.protocol.scores
        self.columns = tuple(Column(c, higher_is_better=True if c in scores else None) for c in judge.protocol.columns)
        self.headline = scores[:3]
        self.statuses: Counter[str] = Counter()

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        rows = []
        for sample in samples:
            if not sample.key or sample.source is None:
                raise ValueError("the judge needs each item's key and source image (a Sample with key and source)")
            parsed = self.judge.judge(sample.key, sample.edit_type, sample.instruction,
                                      Image.fromarray(sample.source), Image.fromarray(sample.edited))
            row = self.judge.protocol.row(parsed)
            status, message = status_of(parsed)
            self.statuses[status] += 1
            for column in self.judge.protocol.scores:
                if row[column] != row[column]:  # NaN: a case it needs failed
                    sample.failures[column] = f"judge {status}: {message[:160]}"
            rows.append(row)
        self._write_record()
        return rows

    def _write_record(self) -> None:
        record = pass_record(self.judge.protocol, self.backend_info, self.statuses, [], self.judge.max_attempts,
                             self.judge.calls, self.judge.new_calls, label=self.label,
                             mode="run.py metric (source and edit as the harness prepared them)")
        atomic_write_json(self.judge.calls.path.with_name("judge.json"), record)


def build_judge_metric(benchmark: str, cfg: Mapping, device, names: Mapping[str, str] | None,
                       prefix: str) -> JudgeMetric:
    """``cfg``: ``calls_log`` (path), ``max_attempts``, ``label``, ``backend`` (`backends.build_backend`)."""
    names = names or {}
    if not cfg.get("calls_log"):
        raise ValueError(f"{names.get('calls_log', f'{prefix}.calls_log')} is not set: the judge's calls log "
                         "(judge_calls.jsonl in the job's folder)")
    backend_names = {key[len("backend."):]: flag for key, flag in names.items() if key.startswith("backend.")}
    backend = build_backend(cfg.get("backend") or {}, str(device),
                            backend_names or {key: f"{prefix}.backend.{key}" for key in BACKEND_KEYS})
    judge = Judge(make_protocol(benchmark), backend, CallLog(Path(cfg["calls_log"])), cfg.get("max_attempts", 3))
    return JudgeMetric(judge, backend.describe(), cfg.get("label") or "")


def build_gedit_judge(cfg: Mapping, device="cpu", names: Mapping[str, str] | None = None,
                      prefix: str = "metrics") -> JudgeMetric:
    return build_judge_metric("gedit", cfg, device, names, prefix)


def build_imgedit_judge(cfg: Mapping, device="cpu", names: Mapping[str, str] | None = None,
                        prefix: str = "metrics") -> JudgeMetric:
    return build_judge_metric("imgedit", cfg, device, names, prefix)
