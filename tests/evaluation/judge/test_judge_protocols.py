"""The judged benchmarks' protocols: the prompts are the original scorers' byte for byte, images go as the scorers
send them, and every reply the official GEdit parser mishandles (judge_helpers' GEDIT_REPLIES) gets a status, never a
made-up score."""

import hashlib
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from judge_helpers import GEDIT_REPLIES
from PIL import Image

from editlab.evaluation.judge.protocols import (
    PROMPTS,
    GEditProtocol,
    ImgEditProtocol,
    Parsed,
    parse_gedit,
    parse_imgedit,
)

ROOT = Path(__file__).resolve().parents[3]
GEDIT_SC_SHA256 = "8f529562c2f89f8db51a3f7cc4d487686f676909c21010b67b0e65ec78150de5"
GEDIT_PQ_SHA256 = "2473ff2c7406e06545c5c039ceb039ff2604ebacf150868a48f0bf07c9e733b0"
# PKU-YuanGroup/ImgEdit@547185d Benchmark/Basic/prompts.json, hashed as fetched (f9468dc8…27b5a0)
IMGEDIT_PROMPTS_SHA256 = "f9468dc848776ee0a6c2e2c31e678c7224e9cb61b013747c8c52d4a05627b5a0"


def test_gedits_types_and_languages_are_the_readers_and_gedit_does_not_import_the_judge():
    from editlab.evaluation import gedit
    from editlab.evaluation.judge import layouts

    assert layouts.GEDIT_TASK_TYPES is gedit.TASK_TYPES and layouts.GEDIT_LANGUAGES is gedit.LANGUAGES
    code = ("import sys, editlab.evaluation.gedit; "
            "sys.exit(any(m.startswith('editlab.evaluation.judge') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}
                          ).returncode == 0


def test_the_prompts_sources_name_the_test_that_checks_them():
    named = re.findall(r"`(tests/[^`]+\.py)`", (PROMPTS / "SOURCES.md").read_text())
    assert named and all((ROOT / path).is_file() for path in named)


def test_gedit_templates_are_viescores_byte_for_byte():
    assert hashlib.sha256(GEditProtocol.templates["SC"].encode()).hexdigest() == GEDIT_SC_SHA256
    assert hashlib.sha256(GEditProtocol.templates["PQ"].encode()).hexdigest() == GEDIT_PQ_SHA256
    assert GEditProtocol().template_hashes() == {"SC": GEDIT_SC_SHA256, "PQ": GEDIT_PQ_SHA256}
    # the SC template ends with the instruction's placeholder, the PQ template has none
    assert GEditProtocol.templates["SC"].endswith("Editing instruction: <instruction>\n")
    assert "<instruction>" not in GEditProtocol.templates["PQ"]


def test_imgedit_prompts_file_is_the_benchmarks():
    digest = hashlib.sha256((PROMPTS / "imgedit_basic_prompts.json").read_bytes()).hexdigest()
    assert digest == IMGEDIT_PROMPTS_SHA256
    assert digest.startswith("f9468dc8") and digest.endswith("27b5a0")
    assert ImgEditProtocol().template_hashes()["prompts.json"] == IMGEDIT_PROMPTS_SHA256


@pytest.mark.parametrize(("edit_type", "criteria"), [
    ("replace", ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")),
    ("remove", ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity")),
    ("add", ("Prompt Compliance", "Visual Naturalness", "Physical & Detail Coherence")),
    ("adjust", ("Prompt Compliance", "Visual Seamlessness", "Physical & Detail Fidelity")),
    ("style", ("Style Fidelity", "Content Preservation", "Rendering Quality")),
    ("action", ("Action Fidelity", "Identity Preservation", "Visual & Anatomical Coherence")),
    ("extract", ("Object Identity", "Mask Precision", "Visual Quality")),
    ("background", ("Instruction Compliance", "Visual Seamlessness", "Physical Consistency")),
    ("compose", ("Instruction Compliance", "Visual Naturalness", "Physical Consistency & Fine Detail")),
])
def test_imgedit_criteria_per_type(edit_type, criteria):
    assert ImgEditProtocol.criteria(edit_type) == criteria


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def test_gedit_transport_resizes_the_edit_bicubic_to_the_source_and_sends_png():
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    edit = Image.fromarray(rng.integers(0, 256, (100, 120, 4), dtype=np.uint8), "RGBA")
    sc, pq = GEditProtocol().render("color_alter", "make it blue", source, edit)
    assert (sc.name, pq.name) == ("SC", "PQ")
    assert sc.prompt == GEditProtocol.templates["SC"].replace("<instruction>", "make it blue")
    assert pq.prompt == GEditProtocol.templates["PQ"]
    expected = np.asarray(edit.convert("RGB").resize((64, 48), Image.Resampling.BICUBIC))
    assert len(sc.images) == 2 and len(pq.images) == 1
    assert np.array_equal(np.asarray(decode(sc.images[0])), np.asarray(source))  # the source first
    assert np.array_equal(np.asarray(decode(sc.images[1])), expected)
    assert pq.images[0] == sc.images[1]  # PQ sees the same resized edit
    assert decode(sc.images[1]).mode == "RGB"
    assert not sc.text_first and not pq.text_first


def test_imgedit_transport_text_then_original_then_result():
    source, edit = Image.new("RGB", (30, 20), "red"), Image.new("RGB", (40, 40), "blue")
    (case,) = ImgEditProtocol().render("add", "add a cat", source, edit)
    assert case.text_first and case.name == "imgedit"
    assert case.prompt == ImgEditProtocol.templates["add"].replace("<edit_prompt>", "add a cat")
    assert decode(case.images[0]).size == (30, 20) and decode(case.images[1]).size == (40, 40)  # no resizing
    with pytest.raises(ValueError, match="unknown ImgEdit edit type 'paint'"):
        ImgEditProtocol().render("paint", "x", source, edit)


@pytest.mark.parametrize(("reply", "status", "scores"), GEDIT_REPLIES)
def test_gedit_reply_status(reply, status, scores):
    parsed = parse_gedit(reply)
    assert (parsed.status, parsed.scores) == (status, scores)
    assert bool(parsed.message) == (status != "ok")


def imgedit_reply(s1, s2, s3, names=("Prompt Compliance", "Visual Naturalness", "Physical & Detail Coherence")):
    return "\n".join(["Brief reasoning: the cat is there, a bit blurry.", f"{names[0]}: {s1}", f"{names[1]}: {s2}",
                      f"{names[2]}: {s3}"])


ADD = ImgEditProtocol.criteria("add")


@pytest.mark.parametrize(("reply", "status", "scores", "flags"), [
    (imgedit_reply(4, 3, 4), "ok", (4, 3, 4), ()),
    (imgedit_reply(3, 4, 3), "ok", (3, 4, 3), ("cap_violation",)),  # second above first: kept, flagged
    (imgedit_reply(2, 2, 5), "ok", (2, 2, 5), ("cap_violation",)),  # third above first
    (imgedit_reply(5, 5, 5), "ok", (5, 5, 5), ()),
    (imgedit_reply(0, 1, 1), "out_of_range", (0, 1, 1), ()),
    (imgedit_reply(6, 5, 5), "out_of_range", (6, 5, 5), ()),
    (imgedit_reply("4/5", 3, 3), "parse_error", (), ()),  # the official step1 silently drops such a line
    (imgedit_reply(4.5, 3, 3), "parse_error", (), ()),
    (imgedit_reply("**4**", 3, 3), "parse_error", (), ()),
    (imgedit_reply("A number from 1 to 5.", 3, 3), "parse_error", (), ()),  # the template echoed
    ("Prompt Compliance: 4\nVisual Naturalness: 3", "parse_error", (), ()),  # one criterion missing
    (imgedit_reply(4, 3, 3) + "\nPrompt Compliance: 5", "parse_error", (), ()),  # given twice
    (imgedit_reply(4, 3, 3, ("Style Fidelity", "Content Preservation", "Rendering Quality")), "parse_error", (), ()),
    ("Prompt Compliance:4\n  Visual Naturalness :  3 \nPhysical & Detail Coherence: 2", "ok", (4, 3, 2), ()),
    ("", "parse_error", (), ()),
])
def test_imgedit_reply_status(reply, status, scores, flags):
    assert parse_imgedit(reply, ADD) == Parsed(status, scores, parse_imgedit(reply, ADD).message, flags)
    assert bool(parse_imgedit(reply, ADD).message) == (status != "ok")


def test_gedit_row_takes_minima_and_is_nan_where_a_case_failed():
    protocol = GEditProtocol()
    row = protocol.row({"SC": Parsed("ok", (6, 9)), "PQ": Parsed("ok", (8, 4))})
    assert (row["gedit_sc"], row["gedit_pq"]) == (6.0, 4.0)
    assert row["gedit_o"] == pytest.approx(math.sqrt(24))
    assert (row["gedit_sc_success"], row["gedit_sc_overedit"]) == (6.0, 9.0)
    failed = protocol.row({"SC": Parsed("parse_error", message="x"), "PQ": Parsed("ok", (8, 4))})
    # the item failed: no headline score at all (PQ parsed, but the summary's means leave the item out), while the
    # parsed case's sub-scores stay
    assert all(math.isnan(failed[c]) for c in protocol.scores)
    assert (failed["gedit_pq_naturalness"], failed["gedit_pq_artifacts"]) == (8.0, 4.0)
    assert math.isnan(failed["gedit_sc_success"])
    out = protocol.row({"SC": Parsed("ok", (6, 9)), "PQ": Parsed("out_of_range", (12, 3), "x")})
    assert all(math.isnan(out[c]) for c in protocol.scores) and out["gedit_sc_success"] == 6.0
    assert math.isnan(out["gedit_pq_naturalness"])  # no score from a bad reply


def test_imgedit_row_is_the_mean_of_three_with_the_cap_flag():
    protocol = ImgEditProtocol()
    row = protocol.row({"imgedit": Parsed("ok", (3, 4, 2), flags=("cap_violation",))})
    assert row == {"imgedit_s1": 3.0, "imgedit_s2": 4.0, "imgedit_s3": 2.0, "imgedit_avg": 3.0,
                   "imgedit_cap_violation": 1.0}
    assert all(math.isnan(v) for v in protocol.row({"imgedit": Parsed("refused", message="x")}).values())
