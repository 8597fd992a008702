"""Judging items: each case of an item goes to the judge up to ``max_attempts`` times, every attempt is recorded in
``judge_calls.jsonl`` before the next, and the item's row holds its scores or NaN with the failure's status.

A reader of any layout hands `judge_items` an iterable of `JudgeItem` (key, task type, instruction, source and edit
paths, language, intersection flag): that is the whole boundary between benchmarks' file layouts and the judge.
With ``backend=None`` the `Judge` replays the stored replies of one judge (``replay_judge``, the identity its
calls were logged with): it parses them again and calls nothing (``--from-log``); a case without a final record of
that judge is then an ``api_error`` saying so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm import tqdm

from editlab.evaluation.judge.backends import Request, timed
from editlab.evaluation.judge.protocols import GEditProtocol, ImgEditProtocol, Parsed
from editlab.evaluation.judge.record import CallLog
from editlab.evaluation.piebench import load_rgb_image

log = logging.getLogger(__name__)
STATUS_INPUT = "input_error"  # an item that could not be judged at all (missing or unreadable image, unknown type)
STATUS_UNREACHED = "api_error"  # the judge gave no answer (network, rate limit, server): asked again on a later pass


@dataclass(frozen=True)
class JudgeItem:
    key: str
    task_type: str
    instruction: str
    source_path: Path | None
    edit_path: Path | None
    language: str = ""
    intersection: bool | None = None
    error: str = ""  # a reader's reason why the item cannot be judged

    @property
    def log_key(self) -> str:
        """The item's key in the calls log: GEdit's keys repeat across languages."""
        return f"{self.language}/{self.key}" if self.language else self.key


def parsed_of(record: Mapping[str, Any], protocol: GEditProtocol | ImgEditProtocol) -> Parsed:
    """A stored call's outcome, from its raw reply alone (live scoring and replay both come through here)."""
    if record["backend_status"] != "ok":
        return Parsed(record["backend_status"], message=record["backend_message"])
    return protocol.parse(record["case"], record["reply"], record["task_type"])


class Judge:
    def __init__(self, protocol: GEditProtocol | ImgEditProtocol, backend, calls: CallLog,
                 max_attempts: int = 3, replay_judge: str | None = None) -> None:
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts!r}: give a whole number >= 1")
        if (backend is None) == (replay_judge is None):
            raise ValueError("a Judge either calls a backend or replays the stored replies of one judge, not both")
        self.protocol, self.backend, self.calls, self.max_attempts = protocol, backend, calls, max_attempts
        self.identity = backend.identity() if backend is not None else replay_judge
        self.judge_id = str(backend.describe().get("judge", "")) if backend is not None else ""  # the plain model id
        self.new_calls = 0

    def judge(self, key: str, task_type: str, instruction: str, source: Image.Image, edit: Image.Image,
              language: str = "") -> dict[str, Parsed]:
        """Every case's final outcome for the item."""
        cases = self.protocol.render(task_type, instruction, source, edit)
        return {case.name: self._case(key, task_type, language, case) for case in cases}

    def _case(self, key: str, task_type: str, language: str, case) -> Parsed:
        replay = self.backend is None
        previous = self.calls.attempts(key, case.name, case.fingerprint | {"judge": self.identity})
        finals = [k for k, r in enumerate(previous) if r["final"]]
        if finals and (replay or previous[finals[-1]]["status"] != STATUS_UNREACHED):
            return parsed_of(previous[finals[-1]], self.protocol)
        if replay:
            return Parsed("api_error", message="no final call in the log for this item and case (--from-log calls "
                                               "no judge: run without it to judge the item)")
        # a case whose judge was never reached (network, rate limit, server) is asked again by a later pass, in a
        # round of max_attempts attempts of its own; a reply, even an unparseable one, is the judge's answer
        pending = previous[finals[-1] + 1:] if finals else previous  # the attempts of the open round
        last_attempt = len(previous) - len(pending) + self.max_attempts
        if len(pending) >= self.max_attempts:  # max_attempts lowered below the attempts made: the last one is final
            return self._close(pending[-1])
        parsed = None
        for attempt in range(len(previous) + 1, last_attempt + 1):
            request = Request(key, case.name, attempt, case.prompt, case.images, case.text_first)
            reply, seconds = timed(self.backend, request)
            self.new_calls += 1
            record = {"key": key, "task_type": task_type, "language": language, "case": case.name,
                      "attempt": attempt, "judge": self.identity, "judge_id": self.judge_id, **case.fingerprint,
                      "reply": reply.text, "backend_status": reply.status, "backend_message": reply.message,
                      "model": reply.model, "tokens": reply.tokens, "latency_s": round(seconds, 4)}
            parsed = parsed_of(record, self.protocol)
            final = parsed.status == "ok" or attempt == last_attempt
            self.calls.append(record | {"scores": list(parsed.scores), "flags": list(parsed.flags),
                                        "status": parsed.status, "message": parsed.message, "final": final,
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            if final:
                break
        return parsed

    def _close(self, last: dict[str, Any]) -> Parsed:
        """End a case whose logged attempts reach ``max_attempts`` with a final line repeating its last attempt (no
        call is made), so a replay, a resume and the counts all see the case as done, with that attempt's outcome."""
        parsed = parsed_of(last, self.protocol)
        self.calls.append(last | {"scores": list(parsed.scores), "flags": list(parsed.flags), "status": parsed.status,
                                  "message": parsed.message, "final": True, "closes": last["attempt"],
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return parsed


def status_of(parsed: Mapping[str, Parsed]) -> tuple[str, str]:
    """The item's status (its first failed case's, else ok) and that case's message."""
    failed = [(case, p) for case, p in parsed.items() if p.status != "ok"]
    if not failed:
        return "ok", ""
    case, first = failed[0]
    return first.status, f"{case}: {first.message}"


def logged_statuses(calls: CallLog, protocol: GEditProtocol | ImgEditProtocol, identity: str) -> dict[str, str]:
    """Each item's status from the log's final records of the judge ``identity`` (a case's last one): every item that
    judge has finished in this log, in this process or an earlier one (a resumed job's count covers the whole job)."""
    cases: dict[str, dict[str, Parsed]] = {}
    for record in calls.finals():
        if record.get("judge") == identity:
            cases.setdefault(record["key"], {})[record["case"]] = Parsed(record["status"],
                                                                         message=record.get("message", ""))
    return {key: status_of({case: parsed[case] for case in protocol.cases})[0] for key, parsed in cases.items()
            if set(protocol.cases) <= parsed.keys()}


def item_row(item: JudgeItem, protocol, parsed: Mapping[str, Parsed] | None, error: str = "") -> dict[str, Any]:
    row = {"key": item.key, "task_type": item.task_type, "language": item.language,
           "intersection": item.intersection}
    row |= protocol.row(parsed) if parsed else dict.fromkeys(protocol.columns, float("nan"))
    if parsed is None:
        status, message = STATUS_INPUT, error
    else:
        status, message = status_of(parsed)
    row |= {f"status_{case.lower()}": parsed[case].status if parsed else "" for case in protocol.cases
            if len(protocol.cases) > 1}
    return row | {"status": status, "message": message}


def judge_items(items: Iterable[JudgeItem], judge: Judge) -> pd.DataFrame:
    """One row per item, in the items' order; an item whose images cannot be read is an ``input_error`` row."""
    rows = []
    for item in tqdm(list(items), desc="judging", unit="item"):
        try:
            if item.error:
                raise ValueError(item.error)
            judge.protocol.check_type(item.task_type)
            if item.source_path is None or item.edit_path is None:
                raise FileNotFoundError("no source or edit image path")
            source, _ = load_rgb_image(item.source_path)
            edit, _ = load_rgb_image(item.edit_path)
        except (OSError, ValueError) as err:
            log.warning("item %s not judged: %s", item.log_key, err)
            rows.append(item_row(item, judge.protocol, None, str(err)))
            continue
        parsed = judge.judge(item.log_key, item.task_type, item.instruction, source, edit, item.language)
        rows.append(item_row(item, judge.protocol, parsed))
    return pd.DataFrame(rows)
