"""``judge_calls.jsonl``: the append-only record of every judge call, and the resume point of a judging pass.

One line per call attempt: the item's key, task type and language, the case (SC | PQ | imgedit), the attempt, the
judge's identity (``judge``: backend, model, revision or endpoint, settings hash) and plain id (``judge_id``), the
SHA-256 of each image as sent and of the rendered prompt, the raw reply, what the backend said
(``backend_status``, ``message``, the model it named, tokens, latency), the parsed sub-scores, the status and
whether the line ends its case (``final``: ok, or the last attempt allowed). When ``max_attempts`` is lowered below
the attempts a case already has, a line that is no call ends it: a copy of its last attempt with ``final`` true and
``closes`` (that attempt's number).

A case is done when a final line with the same judge, prompt hash and image hashes exists: a rerun reuses it (its
reply is parsed again, so a rerun and a replay give the very same scores) and continues an unfinished case at its
next attempt, so a pass killed at any point loses no reply and repeats no call. Lines are only ever appended;
a line torn by a kill, or any line that is not a JSON object, is skipped and reported, and the next line starts on
a line of its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class CallLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self._by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.skipped: list[int] = []  # line numbers that are not records (torn by a kill, or edited by hand)
        data = self.path.read_bytes() if self.path.is_file() else b""
        self._needs_newline = bool(data) and not data.endswith(b"\n")
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and {"key", "case", "attempt", "final"} <= record.keys():
                self._add(record)
            elif line.strip():
                self.skipped.append(number)
        if self.skipped:
            log.warning("%s: %d line(s) that are not call records skipped (line %s; a line torn by a kill is one): "
                        "their calls are made again", self.path, len(self.skipped),
                        ", ".join(map(str, self.skipped[:5])))

    def attempts(self, key: str, case: str, match: dict[str, Any]) -> list[dict[str, Any]]:
        """The records of ``key``/``case`` made with the same judge, prompt and images (``match``), in order."""
        return [r for r in self._by_case.get((key, case), []) if all(r.get(k) == v for k, v in match.items())]

    def _add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._by_case.setdefault((record["key"], record["case"]), []).append(record)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(("\n" if self._needs_newline else "") + line)
            f.flush()
            os.fsync(f.fileno())
        self._needs_newline = False
        self._add(record)

    def finals(self) -> Iterator[dict[str, Any]]:
        return (r for r in self.records if r["final"])


def versions() -> dict[str, str]:
    """The versions a judged score depends on (the judge's own library versions are in its backend's entry)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("editlab", "torch", "transformers", "pillow", "httpx", "vllm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def pass_record(protocol, backend_info: dict[str, Any], statuses: Mapping[str, int], languages: list[str],
                max_attempts: int, calls: CallLog, new_calls: int, **extra: Any) -> dict[str, Any]:
    """``judge.json``: how a scoring pass was made (no secret), and how many items it scored or not, by status.
    ``backend_fields`` names the keys that describe the judge (`replayed_judge` copies them into a replay's)."""
    return {
        "benchmark": protocol.title, "protocol": protocol.name, "template_sha256": protocol.template_hashes(),
        "image_transport": protocol.transport, **backend_info, "backend_fields": list(backend_info),
        "max_attempts": max_attempts, "repetitions": 1,
        "languages": sorted({x for x in languages if x}), "n_total": int(sum(statuses.values())),
        "n_scored": int(statuses.get("ok", 0)),
        "failures": {k: int(v) for k, v in sorted(statuses.items()) if k != "ok"},
        "calls_log": str(calls.path), "calls_this_pass": new_calls, "log_lines_skipped": calls.skipped,
        "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }


def replay_judge(calls: CallLog, wanted: str | None = None) -> str:
    """The identity of the judge whose final replies a replay re-scores: ``wanted`` (its identity, or its plain id
    when that names one identity), else the log's only judge; several judges and no choice is refused."""
    judges = sorted({str(r.get("judge", "")) for r in calls.finals()})
    if not judges:
        raise ValueError(f"{calls.path} holds no final judge reply to re-score")
    if wanted is not None:
        chosen = sorted({str(r.get("judge", "")) for r in calls.finals() if wanted in (r.get("judge"),
                                                                                        r.get("judge_id"))})
        if len(chosen) != 1:
            raise ValueError(f"--judge {wanted!r} names {len(chosen) or 'no'} judge(s) of {calls.path}; give one of "
                             f"the judges found there: {', '.join(judges)}")
        return chosen[0]
    if len(judges) > 1:
        raise ValueError(f"{calls.path} holds the replies of {len(judges)} judges ({', '.join(judges)}): choose whose "
                         "replies to re-score with --judge")
    return judges[0]


def replayed_judge(calls: CallLog, identity: str, stored: Mapping[str, Any]) -> dict[str, Any]:
    """What a replay's ``judge.json`` says of the judge: the stored ``judge.json``'s description when it is of the
    same judge, else what the log knows (its plain id, its backend and identity)."""
    if stored.get("identity") == identity and isinstance(stored.get("backend_fields"), list):
        return {key: stored[key] for key in stored["backend_fields"] if key in stored}
    ids = {r.get("judge_id") for r in calls.finals() if r.get("judge") == identity} - {None, ""}
    return {"judge": ids.pop() if len(ids) == 1 else identity, "backend": identity.split(":", 1)[0],
            "identity": identity}
