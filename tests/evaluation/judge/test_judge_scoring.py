"""Judging items: bounded retries, failures as NaN with their status, the calls log as the resume point (a kill loses
no reply and repeats no call), replay from stored replies bit-identical, and the macro / micro summary."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from judge_helpers import (
    GEDIT_REPLIES,
    GOOD_PQ,
    GOOD_SC,
    Killed,
    KilledAfter,
    gedit_tree,
    picture,
    read_jsonl,
    scripted,
)

from editlab.evaluation.judge import cli
from editlab.evaluation.judge.backends import ScriptedBackend
from editlab.evaluation.judge.protocols import GEditProtocol, ImgEditProtocol, sha256
from editlab.evaluation.judge.record import CallLog
from editlab.evaluation.judge.scoring import Judge
from editlab.evaluation.judge.summary import summarize


def judge_one(tmp_path, backend, max_attempts=3):
    judge = Judge(GEditProtocol(), backend, CallLog(tmp_path / "judge_calls.jsonl"), max_attempts)
    return judge, judge.judge("k1", "color_alter", "make it blue", picture(0), picture(1, (80, 60)))


def test_a_failing_case_is_tried_max_attempts_times_then_its_last_status_is_final(tmp_path):
    backend = scripted({("k1", "SC"): ["[6, 0]", "", '{"score": [11, 3]}']})
    judge, parsed = judge_one(tmp_path, backend)
    assert parsed["SC"].status == "out_of_range" and parsed["SC"].scores == (11, 3)
    assert parsed["PQ"].status == "ok"
    assert backend.calls == 4  # three SC attempts, one PQ
    records = read_jsonl(tmp_path / "judge_calls.jsonl")
    sc = [r for r in records if r["case"] == "SC"]
    assert [(r["attempt"], r["status"], r["final"]) for r in sc] == [
        (1, "parse_error", False), (2, "parse_error", False), (3, "out_of_range", True)]
    row = GEditProtocol().row(parsed)
    assert all(math.isnan(row[c]) for c in ("gedit_sc", "gedit_pq", "gedit_o")) and row["gedit_pq_artifacts"] == 6.0


def test_a_retry_that_succeeds_ends_the_case(tmp_path):
    backend = scripted({("k1", "SC"): ["I cannot rate this.", GOOD_SC]})
    _, parsed = judge_one(tmp_path, backend, max_attempts=5)
    assert parsed["SC"].status == "ok" and parsed["SC"].scores == (7, 9)
    assert backend.calls == 3


@pytest.mark.parametrize(("entry", "status"), [
    ({"status": "api_error", "message": "HTTP 429: rate limit"}, "api_error"),
    ({"status": "refused", "message": "content_filter"}, "refused"),
])
def test_backend_failures_keep_their_status_and_message(tmp_path, entry, status):
    _, parsed = judge_one(tmp_path, scripted({("k1", "SC"): [entry]}), max_attempts=2)
    assert parsed["SC"].status == status and parsed["SC"].message == entry["message"] and not parsed["SC"].scores


def test_an_exception_in_the_backend_is_an_api_error_not_a_crash(tmp_path):
    class Broken(ScriptedBackend):
        def ask(self, request):
            self.calls += 1
            raise RuntimeError("CUDA out of memory")

    backend = Broken()
    _, parsed = judge_one(tmp_path, backend, max_attempts=2)
    assert parsed["SC"].status == parsed["PQ"].status == "api_error"
    assert "RuntimeError: CUDA out of memory" in parsed["SC"].message and backend.calls == 4


def test_max_attempts_must_be_a_whole_number_of_at_least_one(tmp_path):
    with pytest.raises(ValueError, match="max_attempts=0"):
        Judge(GEditProtocol(), scripted(), CallLog(tmp_path / "log.jsonl"), 0)


def test_the_record_holds_the_hashes_of_what_was_sent_and_the_raw_reply(tmp_path):
    judge_one(tmp_path, scripted())
    sc, pq = read_jsonl(tmp_path / "judge_calls.jsonl")
    cases = GEditProtocol().render("color_alter", "make it blue", picture(0), picture(1, (80, 60)))
    assert sc["prompt_sha256"] == sha256(cases[0].prompt) and pq["prompt_sha256"] == sha256(cases[1].prompt)
    assert sc["image_sha256"] == [sha256(image) for image in cases[0].images]
    assert pq["image_sha256"] == [sc["image_sha256"][1]]
    assert (sc["reply"], pq["reply"]) == (GOOD_SC, GOOD_PQ)
    assert sc["scores"] == [7, 9] and sc["status"] == "ok" and sc["final"] and sc["judge"] == "scripted"
    assert {"latency_s", "tokens", "model", "task_type", "key", "attempt", "time"} <= sc.keys()


def test_a_changed_edit_or_another_judge_is_judged_again(tmp_path):
    log = CallLog(tmp_path / "judge_calls.jsonl")
    first = scripted()
    Judge(GEditProtocol(), first, log).judge("k1", "color_alter", "x", picture(0), picture(1))
    Judge(GEditProtocol(), first, log).judge("k1", "color_alter", "x", picture(0), picture(1))
    assert first.calls == 2  # the same judge, prompt and images: reused
    Judge(GEditProtocol(), first, log).judge("k1", "color_alter", "x", picture(0), picture(2))
    assert first.calls == 4

    class Other(ScriptedBackend):
        def identity(self):
            return "scripted:other"

    other = Other(default={"SC": [GOOD_SC], "PQ": [GOOD_PQ]})
    Judge(GEditProtocol(), other, log).judge("k1", "color_alter", "x", picture(0), picture(2))
    assert other.calls == 2


def gedit_pass(tmp_path, out, backend, *extra):
    model, metadata, _ = gedit_tree(tmp_path, per_type=3)
    return cli.main(["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out", str(out),
                     *extra], backend=backend)


def flaky():
    """Some items need several attempts, one never parses: the pass has multi-attempt cases to be killed inside."""
    return scripted({("en/" + f"{1:032x}", "SC"): ["7", GOOD_SC], ("en/" + f"{2:032x}", "PQ"): ["[6, 0]"],
                     ("en/" + f"{4:032x}", "SC"): ["", "", GOOD_SC]})


@pytest.mark.parametrize("kill_after", [1, 4, 7, 11])
def test_resume_after_a_kill_loses_no_reply_and_repeats_no_call(tmp_path, kill_after):
    reference = gedit_pass(tmp_path / "ref", tmp_path / "ref_out", flaky())
    total = len(read_jsonl(tmp_path / "ref_out" / "judge_calls.jsonl"))
    out = tmp_path / "out"
    with pytest.raises(Killed):
        gedit_pass(tmp_path / "run", out, KilledAfter(flaky(), kill_after))
    before = read_jsonl(out / "judge_calls.jsonl")
    assert len(before) == kill_after
    resumed = flaky()
    scores = gedit_pass(tmp_path / "run", out, resumed)
    after = read_jsonl(out / "judge_calls.jsonl")
    assert after[:kill_after] == before  # nothing lost or rewritten
    assert resumed.calls == total - kill_after  # nothing repeated
    attempts = [(r["key"], r["case"], r["attempt"]) for r in after]
    assert len(attempts) == len(set(attempts)) == total
    pd.testing.assert_frame_equal(scores, reference)


def test_an_unreached_judge_is_asked_again_by_the_next_pass_and_an_answer_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    down = scripted(sc=[{"status": "api_error", "message": "ConnectError: no route to host"}])
    first = gedit_pass(tmp_path / "run", out, down)
    assert (first["status"] == "api_error").all() and down.calls == 6 * 3 + 6  # 3 SC attempts each; PQ answered
    assert "6 items: the judge was not reached (SC: ConnectError: no route to host); run the same command again" in \
        capsys.readouterr().out
    up = scripted()
    second = gedit_pass(tmp_path / "run", out, up)
    assert up.calls == 6 and (second["status"] == "ok").all()  # only the unreached SC calls are made again
    records = read_jsonl(out / "judge_calls.jsonl")
    attempts = [(r["key"], r["case"], r["attempt"]) for r in records]
    assert len(attempts) == len(set(attempts)) and max(a for _, case, a in attempts if case == "SC") == 4
    third = scripted()
    pd.testing.assert_frame_equal(gedit_pass(tmp_path / "run", out, third), second)
    assert third.calls == 0  # answered cases are final
    replayed = cli.main(["--benchmark", "gedit", "--edits", str(tmp_path / "run" / "model"), "--metadata",
                         str(tmp_path / "run" / "gedit_meta.json"), "--out", str(out), "--from-log"])
    pd.testing.assert_frame_equal(replayed, second)


def test_a_torn_last_line_is_skipped_reported_and_its_call_made_again(tmp_path, caplog):
    out = tmp_path / "out"
    gedit_pass(tmp_path / "run", out, scripted())
    log = out / "judge_calls.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill in the middle of the last line
    again = scripted()
    gedit_pass(tmp_path / "run", out, again)
    assert again.calls == 1
    assert "not call records skipped" in caplog.text
    text = log.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == len(lines) + 1
    assert len(CallLog(log).records) == len(lines) and CallLog(log).skipped == [len(lines)]


def test_replay_from_the_log_is_bit_identical_and_calls_no_judge(tmp_path):
    out = tmp_path / "out"
    gedit_pass(tmp_path / "run", out, flaky())
    scores, summary = (out / "judge_scores.csv").read_bytes(), (out / "judge_summary.csv").read_bytes()
    calls = (out / "judge_calls.jsonl").read_bytes()
    assert set(pd.read_csv(out / "judge_scores.csv")["status"]) == {"ok", "parse_error"}  # failures replay too
    gedit_pass(tmp_path / "run", out, None, "--from-log")
    assert (out / "judge_scores.csv").read_bytes() == scores
    assert (out / "judge_summary.csv").read_bytes() == summary
    assert (out / "judge_calls.jsonl").read_bytes() == calls  # nothing called, nothing appended


class OtherJudge(ScriptedBackend):
    """A second judge (another identity and model id) with its own replies."""

    def identity(self):
        return "scripted:other"

    def describe(self):
        return super().describe() | {"judge": "other-model", "endpoint": "http://other"}


def test_replay_of_a_log_of_two_judges_takes_the_chosen_judges_replies_and_keeps_its_description(tmp_path):
    out = tmp_path / "out"
    first = gedit_pass(tmp_path / "run", out, scripted())
    first_record = json.loads((out / "judge.json").read_text())
    other = OtherJudge(default={"SC": ['{"score": [3, 2]}'], "PQ": ['{"score": [5, 5]}']})
    second = gedit_pass(tmp_path / "run", out, other)
    second_scores = (out / "judge_scores.csv").read_bytes()
    assert second["gedit_sc"].tolist() == [2.0] * 6 and first["gedit_sc"].tolist() == [7.0] * 6
    with pytest.raises(SystemExit, match=r"holds the replies of 2 judges \(scripted, scripted:other\): choose .* "
                                         "--judge"):
        gedit_pass(tmp_path / "run", out, None, "--from-log")
    with pytest.raises(SystemExit, match="--judge 'gpt-4.1' names no judge.*judges found there: scripted, "
                                         "scripted:other"):
        gedit_pass(tmp_path / "run", out, None, "--from-log", "--judge", "gpt-4.1")

    replayed = gedit_pass(tmp_path / "run", out, None, "--from-log", "--judge", "other-model")  # by its plain id
    assert (out / "judge_scores.csv").read_bytes() == second_scores  # only that judge's replies, none mixed in
    record = json.loads((out / "judge.json").read_text())
    assert record["mode"] == "replay of stored replies" and record["judge"] == "other-model"
    assert (record["identity"], record["endpoint"], record["backend"]) == ("scripted:other", "http://other",
                                                                           "scripted")
    assert record["n_scored"] == len(replayed) == 6
    gedit_pass(tmp_path / "run", out, None, "--from-log", "--judge", "scripted:other")  # a replay of a replay
    assert {k: v for k, v in json.loads((out / "judge.json").read_text()).items() if k != "time"} == \
        {k: v for k, v in record.items() if k != "time"}

    replayed = gedit_pass(tmp_path / "run", out, None, "--from-log", "--judge", "scripted")
    pd.testing.assert_frame_equal(replayed, first)
    record = json.loads((out / "judge.json").read_text())  # the stored judge.json describes the other judge
    assert (record["judge"], record["backend"], record["identity"]) == ("scripted", "scripted", "scripted")
    assert first_record["judge"] == "scripted" and "endpoint" not in record


def test_judge_without_from_log_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gedit_pass(tmp_path / "run", tmp_path / "out", scripted(), "--judge", "scripted")
    assert "--judge chooses whose stored replies --from-log re-scores" in capsys.readouterr().err


def test_max_attempts_lowered_below_the_logged_attempts_ends_the_case_with_its_last_one(tmp_path):
    """Killed after two of three SC attempts, resumed with --max-attempts 1: the second attempt is final (a closing
    line, no call), and a replay gives the very same scores."""
    out = tmp_path / "out"
    failing = {("en/" + f"{0:032x}", "SC"): ["7", "", GOOD_SC]}
    with pytest.raises(Killed):
        gedit_pass(tmp_path / "run", out, KilledAfter(scripted(failing), 2))
    resumed = scripted(failing)
    scores = gedit_pass(tmp_path / "run", out, resumed, "--max-attempts", "1")
    assert scores.loc[0, "status"] == "parse_error" and math.isnan(scores.loc[0, "gedit_o"])
    assert "0 JSON objects" in scores.loc[0, "message"]  # the second attempt's reply ("") is the outcome
    first_sc = [r for r in read_jsonl(out / "judge_calls.jsonl") if r["key"].endswith(f"{0:032x}") and
                r["case"] == "SC"]
    assert [(r["attempt"], r["final"], r.get("closes")) for r in first_sc] == [(1, False, None), (2, False, None),
                                                                               (2, True, 2)]
    assert resumed.calls == 2 * 6 - 1  # every case but the closed one (item 0 SC), whose close made no call
    written = (out / "judge_scores.csv").read_bytes(), (out / "judge_summary.csv").read_bytes()
    replayed = gedit_pass(tmp_path / "run", out, None, "--from-log")
    assert list(replayed["status"]).count("api_error") == 0  # no "no final call"
    assert ((out / "judge_scores.csv").read_bytes(), (out / "judge_summary.csv").read_bytes()) == written
    again = scripted(failing)
    gedit_pass(tmp_path / "run", out, again)  # the default max_attempts again: the case stays closed
    assert again.calls == 0 and (out / "judge_scores.csv").read_bytes() == written[0]


def test_replay_of_an_item_the_log_lacks_is_a_counted_failure(tmp_path):
    out = tmp_path / "out"
    model, metadata, keys = gedit_tree(tmp_path, per_type=2)
    argv = ["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out", str(out)]
    cli.main([*argv, "--limit", "2"], backend=scripted())
    scores = cli.main([*argv, "--from-log"])
    assert list(scores["status"]) == ["ok", "ok", "api_error", "api_error"]
    assert "--from-log calls no judge" in scores["message"].iloc[2]


def synthetic_11_types() -> pd.DataFrame:
    """11 GEdit types with 1..11 items each; type t's items score SC = PQ = t (O = t); one failed item in type 0."""
    rows = []
    for t in range(11):
        for i in range(t + 1):
            rows.append({"key": f"{t}-{i}", "task_type": f"type{t:02d}", "language": "en", "intersection": None,
                         "gedit_sc": float(t), "gedit_pq": float(t), "gedit_o": float(t), "status": "ok"})
    rows.append({"key": "bad", "task_type": "type00", "language": "en", "intersection": None, "gedit_sc": np.nan,
                 "gedit_pq": np.nan, "gedit_o": np.nan, "status": "parse_error"})
    return pd.DataFrame(rows)


def test_macro_and_micro_differ_on_11_types_with_exact_values():
    summary = summarize(synthetic_11_types(), GEditProtocol()).set_index("task_type")
    assert len(summary) == 13
    # macro: the mean of the type means 0..10 = 5; micro: sum t*(t+1) / sum (t+1) = 440 / 66 = 20/3
    assert summary.loc["all_macro", "gedit_o"] == pytest.approx(5.0)
    assert summary.loc["all_micro", "gedit_o"] == pytest.approx(20 / 3)
    assert summary.loc["all_macro", "gedit_sc"] != summary.loc["all_micro", "gedit_sc"]
    assert summary.loc["type00", ["n_total", "n_scored", "n_parse_error"]].tolist() == [2, 1, 1]
    assert summary.loc["all_micro", ["n_total", "n_scored", "n_parse_error"]].tolist() == [67, 66, 1]
    assert summary.loc["type10", "gedit_o"] == 10.0


def test_macro_is_nan_when_a_type_has_no_scored_item():
    frame = synthetic_11_types()
    frame.loc[frame["task_type"] == "type03", ["gedit_sc", "gedit_pq", "gedit_o"]] = np.nan
    frame.loc[frame["task_type"] == "type03", "status"] = "api_error"
    summary = summarize(frame, GEditProtocol()).set_index("task_type")
    assert math.isnan(summary.loc["all_macro", "gedit_o"]) and not math.isnan(summary.loc["all_micro", "gedit_o"])
    assert summary.loc["type03", "n_api_error"] == 4


def test_imgedit_summary_means_the_three_criteria_and_counts_cap_violations():
    frame = pd.DataFrame([
        {"key": "1", "task_type": "add", "language": "", "intersection": None, "imgedit_s1": 4.0, "imgedit_s2": 3.0,
         "imgedit_s3": 2.0, "imgedit_avg": 3.0, "imgedit_cap_violation": 0.0, "status": "ok"},
        {"key": "2", "task_type": "add", "language": "", "intersection": None, "imgedit_s1": 2.0, "imgedit_s2": 4.0,
         "imgedit_s3": 3.0, "imgedit_avg": 3.0, "imgedit_cap_violation": 1.0, "status": "ok"},
        {"key": "3", "task_type": "style", "language": "", "intersection": None, "imgedit_s1": 5.0,
         "imgedit_s2": 5.0, "imgedit_s3": 2.0, "imgedit_avg": 4.0, "imgedit_cap_violation": 0.0, "status": "ok"},
    ])
    summary = summarize(frame, ImgEditProtocol()).set_index("task_type")
    assert summary.loc["add", "imgedit_s1"] == 3.0 and summary.loc["add", "n_cap_violation"] == 1
    assert summary.loc["all_macro", "imgedit_avg"] == pytest.approx(3.5)  # (3 + 4) / 2
    assert summary.loc["all_micro", "imgedit_avg"] == pytest.approx(10 / 3)


@pytest.mark.parametrize(("reply", "status", "scores"), GEDIT_REPLIES)
def test_every_trap_table_reply_through_the_scripted_judge(tmp_path, reply, status, scores):
    """The official parser's hard cases end to end: the reply as a judge gives it, retried, recorded; never a score
    unless ok."""
    backend = scripted({("k1", "SC"): [reply]})
    _, parsed = judge_one(tmp_path, backend, max_attempts=2)
    assert parsed["SC"].status == status
    assert backend.calls == (2 if status == "ok" else 3)  # one SC call when it parses, else both attempts
    row = GEditProtocol().row(parsed)
    assert (row["gedit_sc"] == min(scores)) if status == "ok" else math.isnan(row["gedit_sc"])
    assert [r["status"] for r in read_jsonl(tmp_path / "judge_calls.jsonl") if r["case"] == "SC"][-1] == status
