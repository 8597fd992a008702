"""``editlab-judge`` over the three layouts with the scripted judge, its input checks and the EvalScope export; the
judge as run.py's metric set (``metrics=gedit_judge`` / ``imgedit_judge``)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from judge_helpers import (
    GOOD_PQ,
    GOOD_SC,
    gedit_job_folder,
    gedit_tree,
    imgedit_flat,
    picture,
    read_jsonl,
    scripted,
)
from omegaconf import OmegaConf

from editlab.evaluation.backbones import failure_notes
from editlab.evaluation.judge import cli
from editlab.evaluation.judge.backends import ScriptedBackend
from editlab.evaluation.protocol import Sample, build_metrics
from editlab.evaluation.toyset import write_piebench
from editlab.experiments.job_folder import check_output_folder

CONF = Path(__file__).resolve().parents[3] / "editlab" / "conf"
IMGEDIT_OK = "Brief reasoning: fine.\n{}: 4\n{}: 3\n{}: 4"


def test_gedit_tree_pass_writes_scores_summary_record_and_prints_the_table(tmp_path, capsys):
    model, metadata, keys = gedit_tree(tmp_path, missing=(f"{3:032x}",))
    out = tmp_path / "judged"
    backend = scripted({("en/" + keys[1], "SC"): ["7", "[6, 0]", "no"]})
    scores = cli.main(["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out",
                       str(out), "--max-attempts", "3"], backend=backend)
    assert list(scores["status"]) == ["ok", "parse_error", "ok", "input_error"]
    assert "image not found" in scores["message"].iloc[3]
    assert scores.loc[0, ["gedit_sc", "gedit_pq"]].tolist() == [7.0, 6.0]
    assert {p.name for p in out.iterdir()} >= {"judge_calls.jsonl", "judge_scores.csv", "judge_summary.csv",
                                               "judge.json"}
    summary = pd.read_csv(out / "judge_summary.csv", keep_default_na=False, na_values=["nan", ""])
    full = summary[summary["subset"] == "full"].set_index("task_type")
    assert full.loc["all_micro", ["n_total", "n_scored", "n_parse_error", "n_input_error"]].tolist() == [4, 2, 1, 1]
    assert set(summary["subset"]) == {"full", "intersection"}  # the metadata carries the flag
    record = json.loads((out / "judge.json").read_text())
    assert record["n_total"] == 4 and record["n_scored"] == 2
    assert record["failures"] == {"input_error": 1, "parse_error": 1}
    assert record["template_sha256"]["SC"].startswith("8f529562") and record["languages"] == ["en"]
    assert record["calls_this_pass"] == backend.calls == 3 * 2 + 2  # 3 items judged, one SC thrice
    printed = capsys.readouterr().out
    assert "all_macro" in printed and "all_micro" in printed and "2/4" in printed and "n_parse_error" in printed


def test_per_item_scores_and_the_summary_average_the_same_items(tmp_path):
    """An item whose SC failed has no PQ either: averaging judge_scores.csv gives the summary's micro mean."""
    model, metadata, keys = gedit_tree(tmp_path, per_type=3)
    out = tmp_path / "judged"
    backend = scripted({("en/" + keys[1], "SC"): ["7"], ("en/" + keys[2], "PQ"): ['{"score": [1, 1]}'],
                        ("en/" + keys[4], "PQ"): [{"status": "refused", "message": "blocked"}]})
    cli.main(["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out", str(out),
              "--max-attempts", "1"], backend=backend)
    scores = pd.read_csv(out / "judge_scores.csv")
    summary = pd.read_csv(out / "judge_summary.csv", keep_default_na=False, na_values=["nan", ""])
    micro = summary[(summary["subset"] == "full") & (summary["task_type"] == "all_micro")].iloc[0]
    assert list(scores["status"]) == ["ok", "parse_error", "ok", "ok", "refused", "ok"]
    for column in ("gedit_sc", "gedit_pq", "gedit_o"):
        assert scores[column].notna().tolist() == (scores["status"] == "ok").tolist()
        assert scores[column].mean() == pytest.approx(micro[column])
    assert scores.loc[1, "gedit_pq_naturalness"] == 8.0 and np.isnan(scores.loc[1, "gedit_sc_success"])


def test_gedit_language_filter_and_bad_metadata(tmp_path):
    model, metadata, _ = gedit_tree(tmp_path)
    argv = ["--benchmark", "gedit", "--edits", str(model), "--out", str(tmp_path / "o"), "--backend", "scripted"]
    with pytest.raises(SystemExit, match="--replies: the scripted judge needs a JSONL file of replies"):
        cli.main([*argv, "--metadata", str(metadata)])  # the scripted backend needs its replies file
    with pytest.raises(SystemExit, match="no items to judge in .* for --language cn"):
        cli.main([*argv, "--metadata", str(metadata), "--language", "cn"], backend=scripted())
    entries = json.loads(metadata.read_text())
    del entries[2]["instruction"]
    metadata.write_text(json.dumps(entries))
    with pytest.raises(SystemExit, match=r"gedit_meta.json entry 3 \(.*\): no instruction"):
        cli.main([*argv, "--metadata", str(metadata)], backend=scripted())
    metadata.write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read the metadata file"):
        cli.main([*argv, "--metadata", str(metadata)], backend=scripted())
    with pytest.raises(SystemExit, match="no fullset/ folder"):
        cli.main([*argv, "--metadata", str(metadata), "--edits", str(tmp_path)], backend=scripted())


def test_an_unknown_gedit_type_is_that_items_failure(tmp_path):
    model, metadata, _ = gedit_tree(tmp_path)
    entries = json.loads(metadata.read_text())
    entries[0]["task_type"] = "colour_alter"
    metadata.write_text(json.dumps(entries))
    scores = cli.main(["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out",
                       str(tmp_path / "o")], backend=scripted())
    assert list(scores["status"]) == ["input_error", "ok", "ok", "ok"]
    assert "unknown GEdit task type 'colour_alter'" in scores["message"].iloc[0]


def test_out_folder_with_foreign_files_is_refused(tmp_path):
    model, metadata, _ = gedit_tree(tmp_path)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files the judge did not write"):
        cli.main(["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out",
                  str(tmp_path / "o")], backend=scripted())
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_imgedit_flat_layout(tmp_path):
    edits, metadata, images, keys = imgedit_flat(tmp_path, ("add", "style", "extract", "paint"))
    from editlab.evaluation.judge.protocols import ImgEditProtocol

    by_case = {(keys[0], "imgedit"): [IMGEDIT_OK.format(*ImgEditProtocol.criteria("add"))],
               (keys[1], "imgedit"): ["Style Fidelity: 2\nContent Preservation: 5\nRendering Quality: 1"],
               (keys[2], "imgedit"): [{"status": "refused", "message": "blocked"}]}
    out = tmp_path / "o"
    scores = cli.main(["--benchmark", "imgedit", "--edits", str(edits), "--metadata", str(metadata), "--images",
                       str(images), "--out", str(out), "--max-attempts", "1"], backend=ScriptedBackend(by_case))
    assert list(scores["status"]) == ["ok", "ok", "refused", "input_error"]
    assert scores.loc[0, ["imgedit_s1", "imgedit_s2", "imgedit_s3"]].tolist() == [4.0, 3.0, 4.0]
    assert scores.loc[0, "imgedit_avg"] == pytest.approx(11 / 3)
    assert scores.loc[1, "imgedit_cap_violation"] == 1.0  # kept, flagged
    assert "unknown ImgEdit edit type 'paint'" in scores["message"].iloc[3]
    (call, *_) = read_jsonl(out / "judge_calls.jsonl")
    assert call["case"] == "imgedit" and len(call["image_sha256"]) == 2
    summary = pd.read_csv(out / "judge_summary.csv").set_index("task_type")
    assert summary.loc["all_micro", "n_cap_violation"] == 1 and summary.loc["all_micro", "n_refused"] == 1
    with pytest.raises(SystemExit, match="needs --images"):
        cli.main(["--benchmark", "imgedit", "--edits", str(edits), "--metadata", str(metadata), "--out", str(out)],
                 backend=scripted())


def test_imgedit_metadata_paths_must_stay_inside(tmp_path):
    edits, metadata, images, _ = imgedit_flat(tmp_path, ("add",))
    metadata.write_text(json.dumps({"1": {"id": "../../etc/passwd", "prompt": "x", "edit_type": "add"}}))
    with pytest.raises(SystemExit, match="not a plain relative path"):
        cli.main(["--benchmark", "imgedit", "--edits", str(edits), "--metadata", str(metadata), "--images",
                  str(images), "--out", str(tmp_path / "o")], backend=scripted())


def job_folder(tmp_path: Path) -> Path:
    """A run.py job folder over a generated PIE-Bench-format set: results.csv, job.json, annotation_images/; one
    item's edit failed in the run."""
    root, job = tmp_path / "bench", tmp_path / "job"
    write_piebench(root, n_per_type=1, size=64, seed=0, edit_types=("1", "2", "3"))
    mapping = json.loads((root / "mapping_file.json").read_text())
    rows = []
    for number, (image_id, entry) in enumerate(sorted(mapping.items())):
        failed = number == 1
        if not failed:
            target = job / "annotation_images" / Path(entry["image_path"]).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            picture(number).save(target)
        rows.append({"run": "default", "editor": "x", "model": "tiny", "precision": "fp32", "image_id": image_id,
                     "edit_type": entry["editing_type_id"], "error": "ValueError: NaN latents" if failed else "",
                     "note": ""})
    pd.DataFrame(rows).to_csv(job / "results.csv", index=False)
    (job / "job.json").write_text(json.dumps({"config": {}, "dataset_root": str(root)}))
    return job


def test_editlab_job_folder_pass_goes_into_the_job_folder(tmp_path):
    job = job_folder(tmp_path)
    scores = cli.main(["--benchmark", "gedit", "--edits", str(job)], backend=scripted())
    assert list(scores["status"]) == ["ok", "input_error", "ok"]
    assert "the run's edit failed: ValueError: NaN latents" in scores["message"].iloc[1]
    assert (job / "judge_gedit" / "judge_scores.csv").is_file()
    calls = read_jsonl(job / "judge_gedit" / "judge_calls.jsonl")
    assert {c["key"] for c in calls} == set(scores.loc[scores["status"] == "ok", "key"])
    check_output_folder(job)  # run.py may still resume into the job folder the judge wrote into


@pytest.mark.parametrize("language", ["en", "cn"])
def test_language_filters_a_job_folders_items_and_metadata_or_images_are_refused(tmp_path, language):
    job, keys = gedit_job_folder(tmp_path, language)
    scores = cli.main(["--benchmark", "gedit", "--edits", str(job), "--language", language], backend=scripted())
    assert list(scores["key"]) == keys and set(scores["language"]) == {language} and set(scores["status"]) == {"ok"}
    record = json.loads((job / "judge_gedit" / "judge.json").read_text())
    assert record["subset"] == f"language={language}" and record["languages"] == [language]
    other = "cn" if language == "en" else "en"
    with pytest.raises(SystemExit, match=f"no items to judge in .* for --language {other}"):
        cli.main(["--benchmark", "gedit", "--edits", str(job), "--language", other], backend=scripted())
    with pytest.raises(SystemExit, match="--metadata and --images: not for an editlab job folder"):
        cli.main(["--benchmark", "gedit", "--edits", str(job), "--metadata", str(tmp_path / "m.json"), "--images",
                  str(tmp_path)], backend=scripted())
    with pytest.raises(SystemExit, match="--images: not for an editlab job folder"):
        cli.main(["--benchmark", "gedit", "--edits", str(job), "--images", str(tmp_path)], backend=scripted())


def test_language_is_refused_for_imgedit(tmp_path, capsys):
    edits, metadata, images, _ = imgedit_flat(tmp_path, ("add",))
    with pytest.raises(SystemExit):
        cli.main(["--benchmark", "imgedit", "--edits", str(edits), "--metadata", str(metadata), "--images",
                  str(images), "--out", str(tmp_path / "o"), "--language", "en"], backend=scripted())
    assert "ImgEdit-Bench's have no language" in capsys.readouterr().err


def test_export_evalscope_writes_absolute_paths_of_existing_edits(tmp_path, capsys):
    model, metadata, keys = gedit_tree(tmp_path, missing=(f"{0:032x}",))
    out = tmp_path / "o"
    assert cli.main(["--benchmark", "gedit", "--edits", str(model), "--metadata", str(metadata), "--out", str(out),
                     "--export", "evalscope"]) is None
    lines = read_jsonl(out / "evalscope_en.jsonl")
    assert [line["id"] for line in lines] == keys[1:]
    assert all(Path(line["image_path"]).is_absolute() and Path(line["image_path"]).is_file() for line in lines)
    assert "1 items have no edit image" in capsys.readouterr().out
    assert not (out / "judge_calls.jsonl").exists()
    edits, imeta, images, _ = imgedit_flat(tmp_path / "i", ("add",))
    with pytest.raises(SystemExit, match="EvalScope has no ImgEdit"):
        cli.main(["--benchmark", "imgedit", "--edits", str(edits), "--metadata", str(imeta), "--images",
                  str(images), "--out", str(out), "--export", "evalscope"])


# ---------------------------------------------------------------------------------------------------------------
# the metric sets


def replies_file(path: Path) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in [
        {"key": "bad", "case": "SC", "reply": "great edit!"}, {"case": "SC", "reply": GOOD_SC},
        {"case": "PQ", "reply": GOOD_PQ}]) + "\n")
    return path


def test_every_backend_setting_is_a_flag_and_comes_back_under_its_config_key():
    from editlab.evaluation.judge.backends import BACKEND_KEYS, BACKEND_SETTINGS

    values = {"str": "x", "int": "3", "float": "0.5"}
    argv = [arg for key, kind in BACKEND_SETTINGS.items()
            for arg in (f"--{cli.FLAG_OF.get(key, key).replace('_', '-')}", values[kind.__name__])]
    config = cli.backend_config(cli.parse_args(["--benchmark", "gedit", "--edits", ".", "--backend", "scripted",
                                                *argv]))
    assert tuple(config) == BACKEND_KEYS and config["path"] == "x" and config["max_tokens"] == 3


@pytest.mark.parametrize("option", ["gedit_judge", "imgedit_judge"])
def test_the_metric_configs_compose_with_their_kind(option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"metrics={option}"])
    GlobalHydra.instance().clear()
    metrics = OmegaConf.to_container(cfg.metrics, resolve=False)
    assert metrics["kind"] == option and metrics["calls_log"].endswith("/judge_calls.jsonl")
    assert metrics["backend"]["name"] == "transformers" and metrics["judge_label"]
    assert "label" not in metrics  # metrics.label marks toy backbones: the tables would call the judge a toy


def test_gedit_judge_metric_scores_samples_and_notes_failures(tmp_path):
    cfg = {"kind": "gedit_judge", "calls_log": str(tmp_path / "judge_calls.jsonl"), "max_attempts": 2,
           "backend": {"name": "scripted", "replies": str(replies_file(tmp_path / "r.jsonl"))}}
    metric = build_metrics(cfg)
    assert metric.columns[:3] == ("gedit_sc", "gedit_pq", "gedit_o") and metric.headline == metric.columns[:3]
    source, edit = np.asarray(picture(0)), np.asarray(picture(1))
    good = Sample(edit, source, instruction="make it blue", key="good", edit_type="1")
    bad = Sample(edit, source, instruction="make it blue", key="bad", edit_type="1")
    rows = metric.score([good, bad])
    assert (rows[0]["gedit_sc"], rows[0]["gedit_pq"]) == (7.0, 6.0) and not good.failures
    assert all(np.isnan(rows[1][c]) for c in ("gedit_sc", "gedit_pq", "gedit_o"))  # the item failed: no headline
    assert rows[1]["gedit_pq_artifacts"] == 6.0  # the parsed case's sub-scores stay
    assert set(bad.failures) == {"gedit_sc", "gedit_pq", "gedit_o"}
    notes = failure_notes(bad.failures)
    assert notes[0].startswith("gedit_sc failed (judge parse_error: SC: 0 JSON objects")
    assert notes[1].startswith("gedit_pq failed (judge parse_error: SC: ")
    record = json.loads((tmp_path / "judge.json").read_text())
    assert (record["n_total"], record["n_scored"], record["failures"]) == (2, 1, {"parse_error": 1})
    with pytest.raises(ValueError, match="needs each item's key"):
        metric.score([Sample(edit, source, instruction="x")])


def test_the_metrics_judge_json_counts_every_item_of_the_job_after_a_resume(tmp_path):
    """A resumed job's judge.json counts the items judged before the resume too (from the calls log)."""
    cfg = {"kind": "gedit_judge", "calls_log": str(tmp_path / "judge_calls.jsonl"), "max_attempts": 1,
           "backend": {"name": "scripted", "replies": str(replies_file(tmp_path / "r.jsonl"))}}
    source, edit = np.asarray(picture(0)), np.asarray(picture(1))

    def sample(key):
        return Sample(edit, source, instruction="make it blue", key=key, edit_type="1")

    build_metrics(cfg).score([sample("a"), sample("bad")])
    resumed = build_metrics(cfg)  # a new process
    resumed.score([sample("a")])  # the warm-up edit: judged again, counted once
    resumed.score([sample("c")])
    record = json.loads((tmp_path / "judge.json").read_text())
    assert (record["n_total"], record["n_scored"], record["failures"]) == (3, 2, {"parse_error": 1})
    assert record["identity"] == "scripted" and record["calls_this_pass"] == 2


def test_imgedit_judge_metric_refuses_a_type_it_does_not_know(tmp_path):
    cfg = {"kind": "imgedit_judge", "calls_log": str(tmp_path / "judge_calls.jsonl"),
           "backend": {"name": "scripted", "replies": str(replies_file(tmp_path / "r.jsonl"))}}
    metric = build_metrics(cfg)
    sample = Sample(np.asarray(picture(1)), np.asarray(picture(0)), instruction="x", key="k", edit_type="3")
    with pytest.raises(ValueError, match="unknown ImgEdit edit type '3'"):
        metric.score([sample])


def test_run_py_judges_each_edit_as_it_makes_it_and_resumes_without_calling_again(tmp_path, call_main,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    for key, value in {"EDITLAB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(key, value)
    # with the untimed warm-up edit, whose judgement of the first item the real pass reuses
    args = ["~experiment", "model=tiny", "editor.num_steps=2", "logger=none", "metrics=gedit_judge",
            "metrics.backend.name=scripted", f"metrics.backend.replies={replies_file(tmp_path / 'r.jsonl')}",
            f"hydra.run.dir={out}"]
    finished = call_main("run", *args, "dataset.limit=2")
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = pd.read_csv(out / "results.csv")
    assert results[["gedit_sc", "gedit_pq"]].values.tolist() == [[7.0, 6.0], [7.0, 6.0]]
    calls = read_jsonl(out / "judge_calls.jsonl")
    record = json.loads((out / "judge.json").read_text())
    assert len(calls) == 4 and (record["n_total"], record["n_scored"]) == (2, 2)
    summary = pd.read_csv(out / "summary.csv", dtype={"edit_type": str})
    assert summary.loc[summary["edit_type"] == "all", "gedit_o"].iloc[0] == pytest.approx(np.sqrt(42))
    finished = call_main("run", *args, "dataset.limit=3")  # a resume: the first two items are not judged again
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(read_jsonl(out / "judge_calls.jsonl")) == 6


def test_a_judge_that_cannot_be_loaded_stops_or_with_warn_leaves_its_columns_unavailable(tmp_path):
    cfg = {"kind": "gedit_judge", "calls_log": str(tmp_path / "judge_calls.jsonl"),
           "backend": {"name": "transformers", "path": str(tmp_path / "no_such_judge")}}
    with pytest.raises(RuntimeError, match=r"cannot load the backbone of the gedit judge .* metrics.on_missing=warn"):
        build_metrics(cfg)
    metric = build_metrics(cfg | {"on_missing": "warn"})
    assert metric.unavailable == list(metric.columns)
    (row,) = metric.score([Sample(np.asarray(picture(1)), np.asarray(picture(0)), key="k", edit_type="1")])
    assert all(np.isnan(v) for v in row.values()) and not (tmp_path / "judge_calls.jsonl").exists()
    with pytest.raises(ValueError, match="metrics.backend.replies: the scripted judge needs"):
        build_metrics(cfg | {"on_missing": "warn", "backend": {"name": "scripted"}})  # a config error always stops


def test_the_command_exits_1_when_the_judge_was_not_reached_for_some_items(monkeypatch):
    unreached = pd.DataFrame({"status": ["ok", "api_error"], "message": ["", "HTTP 429"]})
    monkeypatch.setattr(cli, "main", lambda: unreached)
    with pytest.raises(SystemExit) as exited:
        cli.cli()
    assert exited.value.code == 1
    monkeypatch.setattr(cli, "main", lambda: pd.DataFrame({"status": ["ok", "parse_error"], "message": ["", "x"]}))
    cli.cli()  # a reply that does not parse is the judge's answer: counted, not an error of the command
