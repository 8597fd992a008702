"""run.py on the instruction benchmarks: the committed demo copies (tests/fixtures, written by
`evaluation.benchset_fixtures`) through identity and InstructPix2Pix, the editors and metrics a set's items cannot
serve refused before anything runs, masks feeding the PIE background metrics, and the hook for editors that take
images at their own size."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from editlab.editors.base import EditResult
from editlab.evaluation import benchset_fixtures as F
from editlab.evaluation.gedit import GEditDataset
from editlab.evaluation.metrics import PieBenchMetrics
from editlab.evaluation.protocol import build_metrics
from editlab.experiments.harness import check_fits_dataset, prepare_item, score_item

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GEDIT = ("dataset=gedit", f"dataset.root={FIXTURES / 'gedit_mini'}")
IMGEDIT = ("dataset=imgedit", f"dataset.json={FIXTURES / 'imgedit_mini' / 'basic_edit.json'}",
           f"dataset.images={FIXTURES / 'imgedit_mini' / 'images'}")
MASKS = (f"dataset.masks={FIXTURES / 'cocoedit_masks_mini'}", "dataset.mask_polarity=white_is_edited")
FAST = ("~experiment", "model=tiny", "logger=none", "warmup=false")


@pytest.fixture
def run_py(call_main, monkeypatch, tmp_path):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))

    def run(*args: str, check: bool = True):
        done = call_main("run", *FAST, *args)
        if check:
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    return run


def results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv", dtype={"image_id": str, "error": str}, keep_default_na=False,
                       na_values={c: ["nan"] for c in ("psnr_unedit_part", "ssim_unedit_part", "mse_unedit_part")})


def test_identity_on_gedit_writes_the_official_tree_and_records_the_revision(run_py, tmp_path):
    before = sorted(p.stat().st_mtime_ns for p in (FIXTURES / "gedit_mini").rglob("*"))
    out = tmp_path / "out"
    run_py("editor=identity", *GEDIT, f"hydra.run.dir={out}")
    rows = results(out)
    assert len(rows) == 5 and (rows["error"] == "").all() and set(rows["nfe"]) == {0}
    assert set(rows["edit_type"]) == {row[0] for row in F.GEDIT_ROWS}
    for key, task in zip(rows["image_id"], rows["edit_type"]):
        edit = out / "annotation_images" / "fullset" / task / "en" / f"{key}.png"
        assert Image.open(edit).size == (64, 64)  # the tiny model's square resolution: the portrait was cropped
        source = edit.with_name(f"{key}_SRCIMG.png")  # the official tree's source, as the editor saw it
        assert np.array_equal(np.asarray(Image.open(source)), np.asarray(Image.open(edit)))  # identity: unchanged
    assert set(rows["note"]) == {"resized 48x80->64x64"}  # no "empty prompt" note: the items have no captions
    job = json.loads((out / "job.json").read_text())
    assert job["dataset_source"] == {"repo": "stepfun-ai/GEdit-Bench", "revision": "editlab-fixture-1"}
    assert sorted(p.stat().st_mtime_ns for p in (FIXTURES / "gedit_mini").rglob("*")) == before
    assert (tmp_path / "cache" / "gedit_images" / "editlab-fixture-1" / "en").is_dir()  # the decoded sources


def test_a_pinned_revision_that_differs_stops_the_run(run_py, tmp_path):
    done = run_py("editor=identity", *GEDIT, "dataset.revision=" + "a" * 40, f"hydra.run.dir={tmp_path / 'o'}",
                  check=False)
    assert done.returncode == 1 and "holds revision editlab-fixture-1" in done.stderr


def test_caption_editors_and_mask_metrics_are_refused_naming_what_runs(run_py, tmp_path):
    p2p = run_py("editor=ddim_p2p", *GEDIT, f"hydra.run.dir={tmp_path / 'a'}", check=False)
    assert p2p.returncode == 1
    assert "editor ddim_p2p reads source and target captions, which the items of dataset=gedit do not have" in \
        p2p.stderr
    assert "editors that run on it: flux_kontext, identity, instruct_pix2pix, qwen_image_edit" in p2p.stderr
    masked = run_py("editor=identity", "metrics=offline", *IMGEDIT, f"hydra.run.dir={tmp_path / 'b'}", check=False)
    assert masked.returncode == 1 and "the metrics need an edit mask" in masked.stderr
    assert "dataset.masks=" in masked.stderr and not (tmp_path / "b" / "results.csv").exists()
    polarity = run_py("editor=identity", "metrics=offline", *GEDIT, MASKS[0], f"hydra.run.dir={tmp_path / 'c'}",
                      check=False)
    assert polarity.returncode == 1 and "dataset.mask_polarity is not set" in polarity.stderr


def test_clip_scores_are_refused_on_items_without_captions(tmp_path):
    data = GEditDataset(FIXTURES / "gedit_mini", tmp_path / "cache")
    cfg = OmegaConf.create({"editor": {"name": "identity"}, "dataset": {"name": "gedit"}})
    offline = {"structure": {"backbone": None}, "lpips": {"net": None}, "clip": {"path": None}}
    check_fits_dataset(cfg, data, build_metrics({**offline, "kind": "none"}))
    with pytest.raises(ValueError, match="the metrics need an edit mask"):
        check_fits_dataset(cfg, data, build_metrics(offline))
    assert "prompts" in PieBenchMetrics(clip=object()).needs and "prompts" not in PieBenchMetrics().needs
    clip = build_metrics(offline)
    clip.needs = clip.needs | {"prompts"}  # as with a CLIP backbone (which cannot load offline)
    with pytest.raises(ValueError, match="need an edit mask, source and target captions, .*metrics=preservation"):
        check_fits_dataset(cfg, data, clip)


def test_masks_give_the_background_metrics_and_instruct_pix2pix_runs_on_imgedit(run_py, tmp_path):
    out = tmp_path / "ip2p"
    run_py("model=tiny_ip2p", "editor=instruct_pix2pix", "editor.num_steps=2", "metrics=offline", *IMGEDIT, *MASKS,
           f"hydra.run.dir={out}")
    rows = results(out)
    assert sorted(rows["image_id"]) == ["12", "3", "40", "7"] and (rows["error"] == "").all()
    assert set(rows["nfe"]) == {2}
    assert all((out / "annotation_images" / f"{key}.png").is_file() for key in rows["image_id"])  # the flat folder
    assert np.isfinite(rows["psnr_unedit_part"]).all() and np.isfinite(rows["ssim_unedit_part"]).all()
    from editlab.evaluation.judge.layouts import editlab_items

    for item in editlab_items(out):  # the judge compares each edit with the square crop the editor saw
        assert item.source_path == out / "annotation_images" / "sources" / f"{item.key}.png"
        assert Image.open(item.source_path).size == Image.open(item.edit_path).size == (64, 64)
    identity = tmp_path / "identity"
    run_py("editor=identity", "metrics=offline", *GEDIT, *MASKS, f"hydra.run.dir={identity}")
    rows = results(identity)
    assert np.isinf(rows["psnr_unedit_part"]).all() and (rows["mse_unedit_part"] == 0).all()  # kept exactly


def test_a_missing_imgedit_image_fails_its_item_only(run_py, tmp_path):
    copy = tmp_path / "copy"
    json_path, images = F.write_imgedit(copy)
    (images / "style" / "000003.jpg").unlink()
    out = tmp_path / "out"
    run_py("editor=identity", "dataset=imgedit", f"dataset.json={json_path}", f"dataset.images={images}",
           f"hydra.run.dir={out}")
    rows = results(out).set_index("image_id")
    assert "image not found" in rows.loc["7", "error"] and "000003.jpg" in rows.loc["7", "error"]
    assert (rows.drop(index="7")["error"] == "").all()


def test_an_editor_of_native_size_gets_the_source_uncropped_and_is_scored_at_its_size(tmp_path):
    from editlab.evaluation.instruction_sets import MaskFolder

    data = GEditDataset(FIXTURES / "gedit_mini", tmp_path / "cache",
                        masks=MaskFolder.from_config(FIXTURES / "cocoedit_masks_mini", "white_is_edited"))
    item = data[0]
    prepared = prepare_item("edit", item, data, None, 0, {"image_id": item.image_id})
    assert prepared.request.image.size == F.SIZE and prepared.mask.shape == (F.SIZE[1], F.SIZE[0])
    assert prepared.request.instruction == item.instruction and prepared.row["note"] == ""
    larger = prepared.image.resize((96, 160), Image.NEAREST)  # an editor that answers at its own resolution
    metrics = build_metrics({"structure": {"backbone": None}, "lpips": {"net": None}, "clip": {"path": None}})
    outcome = score_item("edit", prepared, EditResult(larger), 0.0, data, metrics)
    assert outcome.edited.size == (96, 160)  # saved as the editor made it
    assert "edit 96x160 resized to the source's 48x80 for the metrics" in outcome.row["note"]
    assert outcome.row["psnr_unedit_part"] > 30


def test_the_wandb_table_takes_items_with_and_without_masks(call_main, monkeypatch, tmp_path):
    monkeypatch.setenv("EDITLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, extra in (("masked", ("metrics=offline", *MASKS)), ("plain", ())):
        out = tmp_path / name
        done = call_main("run", "~experiment", "model=tiny", "warmup=false", "editor=identity", *GEDIT, *extra,
                         f"hydra.run.dir={out}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert list((out / "wandb").glob("offline-run-*")) and len(results(out)) == 5


def test_the_committed_demo_sets_are_what_the_fixture_writer_writes(tmp_path):
    F.main([str(tmp_path)])
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file()}
    for path in written:
        if path.suffix in (".png", ".jpg"):  # pixels (encoders may differ between Pillow versions)
            assert np.array_equal(np.asarray(Image.open(tmp_path / path)), np.asarray(Image.open(FIXTURES / path)))
        elif path.suffix == ".json":
            assert json.loads((tmp_path / path).read_text()) == json.loads((FIXTURES / path).read_text())
    fresh, committed = (GEditDataset(root / "gedit_mini", tmp_path / "cache" / name)
                        for name, root in (("fresh", tmp_path), ("committed", FIXTURES)))
    assert list(fresh) == list(committed)
    for a, b in zip(fresh, committed):
        pixels = [np.asarray(Image.open(data.image_file(item))) for data, item in ((fresh, a), (committed, b))]
        assert np.array_equal(*pixels)


def test_kontext_on_gedit_then_the_judge_reads_the_job_folder(run_py, tmp_path, capsys):
    """The issue's loop on the fixture set: an instruction editor at the sources' own size, then the post-hoc judge
    over the job folder (its dataset rebuilt from job.json), then ImgEdit's protocol refused on GEdit edits."""
    from editlab.evaluation.judge import cli
    from editlab.evaluation.judge.backends import ScriptedBackend

    out = tmp_path / "kontext"
    run_py("model=tiny_flux_kontext", "editor=flux_kontext", *GEDIT, f"hydra.run.dir={out}")
    rows = results(out)
    assert len(rows) == 5 and (rows["error"] == "").all() and set(rows["nfe"]) == {28}
    key, task = rows["image_id"][0], rows["edit_type"][0]
    edit = out / "annotation_images" / "fullset" / task / "en" / f"{key}.png"
    assert Image.open(edit).size == (48, 80)  # native size: the portrait source is not cropped
    replies = {"SC": ['{"score": [7, 6], "reasoning": "ok"}'] * 5, "PQ": ["not a score"] * 5}
    scores = cli.main(["--benchmark", "gedit", "--edits", str(out), "--max-attempts", "1"],
                      backend=ScriptedBackend(default=replies))
    assert len(scores) == 5 and scores[["gedit_sc", "gedit_pq", "gedit_o"]].isna().all().all()  # PQ failed
    assert scores["gedit_sc_overedit"].eq(6).all()  # the SC reply's sub-scores stay
    printed = capsys.readouterr().out
    assert "scored 0/5 items (failures: parse_error 5)" in printed and "all_macro" in printed
    with pytest.raises(SystemExit, match="holds edits of gedit; judge them with --benchmark gedit"):
        cli.main(["--benchmark", "imgedit", "--edits", str(out), "--out", str(tmp_path / "img")],
                 backend=ScriptedBackend(default=replies))


def test_an_instruction_editor_is_refused_up_front_on_icd_caption_csvs(tmp_path):
    from editlab.evaluation.icd_benchmark import IcdCsvDataset

    (tmp_path / "pairs.csv").write_text("file_name,old_caption,edited_caption\na.png,a cat,a dog\n")
    data = IcdCsvDataset(tmp_path / "pairs.csv", tmp_path)
    cfg = OmegaConf.create({"editor": {"name": "flux_kontext"}, "dataset": {"name": "icd_csv"}})
    with pytest.raises(ValueError, match="editor flux_kontext reads an editing instruction, which the items of "
                                         "dataset=icd_csv do not have"):
        check_fits_dataset(cfg, data)
