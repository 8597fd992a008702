"""The judged benchmarks' protocols: what each judge call (a *case*) shows the judge, and how its reply is read.

GEdit-Bench (VIEScore, task ``tie``, as ``stepfun-ai/Step1X-Edit`` GEdit-Bench/ scores it): two cases per item.
``SC`` sends the source, then the edit converted to RGB and resized (bicubic) to the source's size, with the SC
template and the instruction; ``PQ`` sends the edit alone with the PQ template. Each reply holds two 0-10 scores;
per item SC = min(SC pair), PQ = min(PQ pair), O = sqrt(SC * PQ).

ImgEdit-Bench Basic (``PKU-YuanGroup/ImgEdit`` Benchmark/Basic): one case per item, the edit type's rubric prompt
with the instruction, then the original, then the result (two images for every type, as the official script sends
them, though the extract and style prompts speak of one and three); the reply names three criteria with 1-5 scores,
and the item's score is their mean (unrounded here; the official step1 rounds it to 2 decimals).

Images go to the judge as PNG bytes (both benchmarks' scorers send PNG); the SHA-256 of each is recorded.

Parsing is strict (the official GEdit parser inserts a random score when it cannot read a reply):
- GEdit: the reply must hold exactly one JSON object (text around it, such as a ```json fence or a sentence, is
  ignored, as the official parser ignores what lies outside the first ``{`` and last ``}``), whose ``score`` is a
  list of exactly two JSON integers. Floats (even ``7.0``), strings, booleans, a bare list (``[6, 0]``), a bare
  number, a scalar ``score``, single-quoted or otherwise invalid JSON and two objects are ``parse_error``; two
  integers outside 0-10 are ``out_of_range``.
- ImgEdit: each of the type's three criteria must appear once as a line ``<Criterion>: <N>`` (spaces around the
  colon and the number allowed) with N a whole number; a missing, repeated or non-integer criterion (``4/5``,
  ``4.5``, ``**4**``) is ``parse_error``, a number outside 1-5 ``out_of_range``. The rubric says the second and third
  scores must not exceed the first; a reply that breaks this keeps its scores (the official scorer counts them as
  they are) and is flagged ``cap_violation``, counted in every summary, never fixed.
A reply is never turned into a default score: a failed case has no scores, and an item with a failed case has NaN
headline scores (GEdit SC, PQ, O; ImgEdit s1-s3 and avg), whichever case failed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

PROMPTS = Path(__file__).resolve().parent / "prompts"
STATUSES = ("ok", "parse_error", "api_error", "refused", "out_of_range")
FAILURES = STATUSES[1:]


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Parsed:
    """A reply read by a protocol: its status, the scores (empty unless ``ok``), why it failed, its flags."""

    status: str
    scores: tuple[int, ...] = ()
    message: str = ""
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    """One judge call of an item: the rendered prompt and the PNG images, in the protocol's order."""

    name: str
    prompt: str
    images: tuple[bytes, ...]
    text_first: bool

    @property
    def fingerprint(self) -> dict[str, object]:
        return {"prompt_sha256": sha256(self.prompt), "image_sha256": [sha256(image) for image in self.images]}


def json_objects(text: str) -> list[object]:
    """Every JSON value that decodes from a ``{`` of ``text`` not inside an earlier decoded one."""
    decoder, found, start = json.JSONDecoder(), [], text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        found.append(value)
        start = text.find("{", end)
    return found


def parse_gedit(reply: str) -> Parsed:
    """A VIEScore reply: exactly one JSON object with ``score`` = two integers in 0-10."""
    objects = json_objects(reply)
    if len(objects) != 1:
        return Parsed("parse_error", message=f"{len(objects)} JSON objects in the reply; expected exactly one")
    score = objects[0].get("score")
    if not (isinstance(score, list) and len(score) == 2 and all(type(s) is int for s in score)):
        return Parsed("parse_error", message=f"'score' is {json.dumps(score)}; expected a list of two integers")
    if not all(0 <= s <= 10 for s in score):
        return Parsed("out_of_range", tuple(score), f"score {score} outside 0-10")
    return Parsed("ok", tuple(score))


def parse_imgedit(reply: str, criteria: tuple[str, ...]) -> Parsed:
    """An ImgEdit reply: one ``<Criterion>: <N>`` line per criterion, N a whole number in 1-5."""
    values: dict[str, str] = {}
    for line in reply.splitlines():
        name, colon, value = line.partition(":")
        if colon and name.strip() in criteria:
            if name.strip() in values:
                return Parsed("parse_error", message=f"'{name.strip()}' is given twice")
            values[name.strip()] = value.strip()
    if missing := [c for c in criteria if c not in values]:
        return Parsed("parse_error", message=f"no line '<name>: <score>' for {', '.join(map(repr, missing))}")
    if bad := [f"{c}: {values[c]!r}" for c in criteria if not re.fullmatch(r"\d+", values[c])]:
        return Parsed("parse_error", message=f"not a whole number: {'; '.join(bad)}")
    scores = tuple(int(values[c]) for c in criteria)
    if not all(1 <= s <= 5 for s in scores):
        return Parsed("out_of_range", scores, f"scores {list(scores)} outside 1-5")
    capped = scores[1] > scores[0] or scores[2] > scores[0]
    return Parsed("ok", scores, flags=("cap_violation",) if capped else ())


def nan_row(columns: tuple[str, ...]) -> dict[str, float]:
    return dict.fromkeys(columns, math.nan)


class GEditProtocol:
    """VIEScore ``tie`` as GEdit-Bench runs it (module docstring)."""

    name = "gedit"
    title = "GEdit-Bench (VIEScore tie: SC, PQ, O)"
    cases = ("SC", "PQ")
    templates = {"SC": (PROMPTS / "gedit_tie_sc.txt").read_bytes().decode(),
                 "PQ": (PROMPTS / "gedit_tie_pq.txt").read_bytes().decode()}
    scores = ("gedit_sc", "gedit_pq", "gedit_o")  # per item, from the parts below
    parts = {"SC": ("gedit_sc_success", "gedit_sc_overedit"), "PQ": ("gedit_pq_naturalness", "gedit_pq_artifacts")}
    columns = (*scores, *parts["SC"], *parts["PQ"])
    transport = {"format": "PNG", "order": "SC: source, edit, then the prompt; PQ: edit, then the prompt",
                 "resize": "edit converted to RGB and resized to the source's size (bicubic); source as RGB"}

    def check_type(self, task_type: str) -> None:
        """Any type is accepted here (the prompt does not depend on it); readers check GEdit's own types."""

    def render(self, task_type: str, instruction: str, source: Image.Image, edit: Image.Image) -> list[Case]:
        source = source.convert("RGB")
        edit = edit.convert("RGB")
        if edit.size != source.size:
            edit = edit.resize(source.size, Image.Resampling.BICUBIC)
        source_png, edit_png = png_bytes(source), png_bytes(edit)
        # the official open judge's path (Qwen2.5-VL) puts the images before the text
        return [Case("SC", self.templates["SC"].replace("<instruction>", instruction), (source_png, edit_png), False),
                Case("PQ", self.templates["PQ"], (edit_png,), False)]

    def parse(self, case: str, reply: str, task_type: str) -> Parsed:
        return parse_gedit(reply)

    def row(self, parsed: Mapping[str, Parsed]) -> dict[str, float]:
        """The item's scores. The sub-scores of a case that parsed are kept; SC, PQ and O only when every case is
        ``ok`` (the item's status), so each per-item mean is over the same items the summary counts as scored."""
        row = nan_row(self.columns)
        for case, names in self.parts.items():
            if parsed[case].status == "ok":
                row |= dict(zip(names, map(float, parsed[case].scores)))
        if all(parsed[case].status == "ok" for case in self.cases):
            row["gedit_sc"], row["gedit_pq"] = (float(min(parsed[case].scores)) for case in self.cases)
            row["gedit_o"] = math.sqrt(row["gedit_sc"] * row["gedit_pq"])
        return row

    def template_hashes(self) -> dict[str, str]:
        return {case: sha256(text) for case, text in self.templates.items()}


class ImgEditProtocol:
    """ImgEdit-Bench Basic's per-type rubric (module docstring)."""

    name = "imgedit"
    title = "ImgEdit-Bench Basic (three 1-5 criteria per edit type)"
    cases = ("imgedit",)
    prompts_file = PROMPTS / "imgedit_basic_prompts.json"
    templates: dict[str, str] = json.loads(prompts_file.read_bytes())
    scores = ("imgedit_s1", "imgedit_s2", "imgedit_s3", "imgedit_avg")
    columns = (*scores, "imgedit_cap_violation")
    transport = {"format": "PNG", "order": "the prompt, then the original, then the result", "resize": "none"}

    @classmethod
    def criteria(cls, task_type: str) -> tuple[str, ...]:
        """The three criterion names of the type's prompt, from its 'Example Response Format' lines."""
        cls().check_type(task_type)
        tail = cls.templates[task_type].split("Example Response Format:", 1)[1]
        return tuple(re.findall(r"^(.+?): A number from 1 to 5\.$", tail, flags=re.M))

    def check_type(self, task_type: str) -> None:
        if task_type not in self.templates:
            raise ValueError(f"unknown ImgEdit edit type {task_type!r}; expected one of {', '.join(self.templates)}")

    def render(self, task_type: str, instruction: str, source: Image.Image, edit: Image.Image) -> list[Case]:
        self.check_type(task_type)
        prompt = self.templates[task_type].replace("<edit_prompt>", instruction)
        return [Case("imgedit", prompt, (png_bytes(source.convert("RGB")), png_bytes(edit.convert("RGB"))), True)]

    def parse(self, case: str, reply: str, task_type: str) -> Parsed:
        return parse_imgedit(reply, self.criteria(task_type))

    def row(self, parsed: Mapping[str, Parsed]) -> dict[str, float]:
        row = nan_row(self.columns)
        if (result := parsed["imgedit"]).status == "ok":
            row |= dict(zip(self.scores, map(float, result.scores)))
            row["imgedit_avg"] = sum(result.scores) / 3
            row["imgedit_cap_violation"] = float("cap_violation" in result.flags)
        return row

    def template_hashes(self) -> dict[str, str]:
        return {"prompts.json": sha256(self.prompts_file.read_bytes())} | {
            edit_type: sha256(text) for edit_type, text in self.templates.items()}


PROTOCOLS = {"gedit": GEditProtocol, "imgedit": ImgEditProtocol}


def protocol(benchmark: str) -> GEditProtocol | ImgEditProtocol:
    if benchmark not in PROTOCOLS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected {' or '.join(PROTOCOLS)}")
    return PROTOCOLS[benchmark]()
