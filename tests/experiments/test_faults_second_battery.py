"""The second fault and security battery: no code runs from a weights file, a run writes only into its own folder,
changed items are edited again, one process per folder, ids and prompts checked at load, sweep folders stay inside
the sweep, metric failures are counted, inputs are noted, config values are checked, writes are atomic and a
failed write is one line. In-process through the harness, with real processes where the point is a process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from PIL import Image

from editlab.evaluation.piebench import PieBenchDataset
from editlab.evaluation.toyset import write_piebench
from editlab.experiments import harness
from editlab.experiments.harness import RunError, run
from editlab.experiments.job_folder import CHECKOUT, OutputGuard, check_output_folder, path_safe

ROOT = Path(__file__).resolve().parents[2]
FAST = ["~experiment", "model=tiny", "editor.num_steps=3", "warmup=false", "logger=none", "dataset.limit=2"]


pytestmark = pytest.mark.usefixtures("own_cache")


def config(*overrides: str):
    return compose_config(*FAST, *overrides)


def rows(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv", dtype={"image_id": str, "error": str, "note": str},
                       keep_default_na=False)


def bench(root: Path) -> Path:
    return write_piebench(root, n_per_type=1, size=64, edit_types=("1", "6"))


def edit_mapping(root: Path, change) -> None:
    mapping = json.loads((root / "mapping_file.json").read_text())
    change(mapping)
    (root / "mapping_file.json").write_text(json.dumps(mapping))


def on_bench(root: Path, *overrides: str):
    return config("dataset=pie_bench", f"dataset.root={root}", "metrics=offline", *overrides)


# ---------------------------------------------------------------------------------------------------- 1. security


class Payload:
    """A pickle that, unpickled without weights_only, creates ``marker`` (as a payload calling os.system would)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(1), "payload": Payload(marker)}, path)
    return path


WEIGHT_NAMES = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "pytorch_lora_weights.bin", "model.pt")
PATH_KEY = r"(path|weights|checkpoint|lora|forward|reverse)$"


def path_keys() -> list[tuple[str, str, str]]:
    """(group, option, key) for every path-valued key of every option of the run's config groups."""
    import re

    found = []
    for group in ("model", "metrics", "editor", "paper"):
        for option in sorted(p.stem for p in (ROOT / "editlab" / "conf" / group).glob("*.yaml")):
            node = OmegaConf.load(ROOT / "editlab" / "conf" / group / f"{option}.yaml")
            flat = harness.flatten(OmegaConf.to_container(node), group)
            found += [(group, option, key) for key, value in flat.items()
                      if re.search(PATH_KEY, key) and (value is None or isinstance(value, str))]
    return found


def test_the_battery_finds_the_path_keys_it_should():
    keys = {key for _, _, key in path_keys()}
    assert {"metrics.fid.weights", "metrics.clip.path", "editor.teacher_checkpoint", "editor.forward_lora",
            "model.path", "model.lora", "model.unet_path", "paper.adapters.G.forward"} <= keys


@pytest.mark.slow
def test_no_code_runs_from_a_file_planted_at_any_path_valued_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache: nothing else to load
    marker = tmp_path / "PWNED"
    evil_file = plant(tmp_path / "evil" / "weights.pth", marker)
    evil_dir = tmp_path / "evil_dir"
    for name in WEIGHT_NAMES:
        plant(evil_dir / name, marker)
        plant(evil_dir / "unet" / name, marker)
    dataset = None
    tried = []
    for group, option, key in path_keys():
        if group == "paper":  # a paper config's adapter files go to the iCD editor's keys
            key, group, option = "editor.forward_lora", "editor", "icd"
        for value in (evil_file, evil_dir):
            overrides = [f"{group}={option}", "metrics.on_missing=warn", f"{key}={value}"]
            if group == "metrics" and option in ("icd_paper", "icd_paper_toy"):
                overrides.append("metrics.fid.backbone=" + ("clip_vision" if key.endswith("path") else "inception"))
            try:
                cfg = config(*overrides)
            except Exception:  # noqa: BLE001 - a key this option does not take
                continue
            dataset = dataset or harness.load_dataset(cfg)
            try:
                harness._setup(cfg, dataset, None)
            except (RunError, Exception):  # noqa: BLE001 - refusing is fine; running the payload is not
                pass
            tried.append(f"{key}={value.name}")
            assert not marker.exists(), f"code ran from the file at {key}={value}"
    assert len(tried) >= 20, tried


def test_no_code_runs_from_a_teacher_checkpoint_or_a_resumed_training_checkpoint(tmp_path):
    """train.py's path-valued keys: ``train.teacher.checkpoint`` (every train/teacher option that takes one) and
    ``resume=`` (a Lightning checkpoint)."""
    from editlab.icd.training import load_teacher

    marker = tmp_path / "PWNED"
    evil = plant(tmp_path / "teacher.pt", marker)
    options = [p.stem for p in (ROOT / "editlab" / "conf" / "train" / "teacher").glob("*.yaml")
               if "checkpoint" in OmegaConf.to_container(OmegaConf.load(p))]
    assert {"distilled", "sd15_cfg_distill"} <= set(options)
    model = {"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64}
    for option in options:
        teacher = {**OmegaConf.to_container(OmegaConf.load(ROOT / "editlab" / "conf" / "train" / "teacher" /
                                                           f"{option}.yaml")), "checkpoint": str(evil)}
        with pytest.raises(Exception, match="refused to load|Weights only load failed|weights_only"):
            load_teacher(model, {"dtype": "float32", "vae_dtype": "float32"}, {**teacher, "guidance": "embedded"})
    assert not marker.exists()

    from lightning_fabric.utilities.cloud_io import _load as lightning_load

    ckpt = plant(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(Exception):
        lightning_load(ckpt, map_location="cpu")  # Lightning's default (train.py passes weights_only=True too)
    assert not marker.exists()


def test_files_in_the_torch_hub_cache_and_fid_weights_are_refused_with_a_message(tmp_path, monkeypatch):
    """torch.hub's cache (piq's VGG and LPIPS heads, lpips' SqueezeNet, torch-fidelity's Inception) and a user's
    Inception file are loaded by libraries with weights_only=False: refused, named, nothing runs."""
    from editlab.evaluation import paper_metrics
    from editlab.evaluation.protocol import build_metrics

    marker = tmp_path / "PWNED"
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    for name in (paper_metrics.VGG16_FILE, paper_metrics.PIQ_LPIPS_FILE, paper_metrics.INCEPTION_FILE,
                 "squeezenet1_1-b8a52dc0.pth"):
        plant(cache / name, marker)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    off = {"clip": {"path": None}, "dinov2": {"backbone": None}, "image_reward": {"path": None}}
    cases = [
        {"kind": "icd_paper", **off, "lpips": {"net": "vgg"}, "fid": {"backbone": None}},
        {"kind": "icd_paper", **off, "lpips": {"net": None}, "fid": {"backbone": "inception"}},
        {"kind": "icd_paper", **off, "lpips": {"net": None},
         "fid": {"backbone": "inception", "weights": str(plant(tmp_path / "inception.pth", marker))}},
        {"kind": "piebench", "structure": {"backbone": None}, "clip": {"path": None}, "lpips": {"net": "squeeze"}},
    ]
    for cfg in cases:
        for on_missing in ("error", "warn"):  # a refused file is never a missing backbone
            with pytest.raises(RuntimeError, match="refused to load .*could run code"):
                build_metrics({**cfg, "on_missing": on_missing})
    assert not marker.exists()


def test_weights_only_loading_still_loads_plain_state_dicts(tmp_path):
    from editlab.models.safe_load import weights_only_loading

    torch.save({"w": torch.arange(3)}, tmp_path / "plain.pt")
    with weights_only_loading():
        assert torch.load(tmp_path / "plain.pt", weights_only=False)["w"].tolist() == [0, 1, 2]
    assert torch.load.__module__.startswith("torch")  # the patch is gone after the block


# ---------------------------------------------------------------------------------------------------- 2. overwrites


def test_a_folder_holding_another_methods_outputs_without_results_csv_is_refused(tmp_path):
    out = tmp_path / "run"
    run(config("editor=npi"), out, "g")
    (out / "results.csv").unlink()  # moved away: the edits, summary and job.json stay
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match=r"other settings \(editor.name: 'npi' -> 'ddim_p2p'") as info:
        run(config(), out, "g")
    assert "restart=true" in str(info.value)
    (out / "job.json").unlink()  # no record at all: still results of someone else's
    with pytest.raises(RunError, match=r"holds results \(summary.csv, annotation_images\) without a job.json"):
        run(config(), out, "g")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "job.json"} == \
        {p: b for p, b in before.items() if p.name != "job.json"}


def test_folders_a_run_must_not_write_into_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    for folder, what in ((Path("/"), "file-system root"), (Path.home(), "home folder"), (CHECKOUT, "checkout")):
        with pytest.raises(RunError, match=what):
            check_output_folder(folder)
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(RunError, match=r"holds files editlab did not write \(thesis.tex\)"):
        run(config(), foreign, "g")
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    (tmp_path / "a_file").write_text("x")
    for folder in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(RunError, match="is a file, not a folder"):
            run(config(), folder, "g")
    # through run.py: refused before Hydra writes its .hydra/ (the callback runs first)
    guard = OutputGuard()
    with pytest.raises(SystemExit, match="holds files editlab did not write"):
        guard.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(foreign)}}}))
    with pytest.raises(SystemExit, match="file-system root"):
        guard.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": "/"}}}))
    assert not (foreign / ".hydra").exists()


def test_run_py_refuses_the_checkout_and_a_foreign_folder_without_writing(tmp_path, call_main):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for folder in (foreign, CHECKOUT):
        before = sorted(p.name for p in folder.iterdir())
        proc = call_main("run", *FAST, f"hydra.run.dir={folder}")
        assert proc.returncode == 1 and "error: hydra.run.dir=" in proc.stderr, proc.stderr[-800:]
        assert sorted(p.name for p in folder.iterdir()) == before


def test_a_read_only_or_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunError, match="cannot write into hydra.run.dir=.*Read-only file system"):
        run(config(), out, "g")
    monkeypatch.undo()

    from editlab.experiments import job_folder

    original, calls = job_folder.atomic_write, []

    def full_disk(path, *args, **kwargs):
        if Path(path).suffix == ".png":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(job_folder, "atomic_write", full_disk)
    with pytest.raises(RunError, match="No space left on device.*re-run the same command to resume"):
        run(config(), out, "g")
    assert len(rows(out)) == 1 and not list(out.rglob("*.tmp"))  # the first item stands, no half image
    monkeypatch.undo()
    run(config(), out, "g")
    assert len(rows(out)) == 2


# ---------------------------------------------------------------------------------------------------- 3. changed items


def test_changed_items_are_edited_again_and_a_wholly_changed_benchmark_is_another_run(tmp_path, caplog):
    root = bench(tmp_path / "bench")
    out = tmp_path / "run"
    run(on_bench(root), out, "g")
    ids = sorted(rows(out)["image_id"])

    def new_instruction(mapping):
        mapping[ids[0]]["editing_instruction"] += " please"

    edit_mapping(root, new_instruction)
    run(on_bench(root), out, "g")
    after = rows(out)
    assert len(after) == 3 and list(after["image_id"]).count(ids[0]) == 2  # redone once, the other resumed
    latest = after.drop_duplicates("image_id", keep="last")
    assert len(latest) == 2 and latest["inputs"].nunique() == 2

    (image,) = (root / "annotation_images").rglob(f"{ids[1]}.png")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(image)  # a replaced image
    with caplog.at_level(logging.WARNING):
        run(on_bench(root), out, "g")
    assert "changed since they were edited" in caplog.text and len(rows(out)) == 4

    def all_new(mapping):
        for entry in mapping.values():
            entry["original_prompt"] += " today"

    edit_mapping(root, all_new)
    with pytest.raises(RunError, match="results of another benchmark.*restart=true"):
        run(on_bench(root), out, "g")
    run(on_bench(root, "restart=true"), out, "g")
    assert len(rows(out)) == 2 and len(list(out.glob("superseded_*"))) == 1


# ---------------------------------------------------------------------------------------------------- 4. two processes


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from editlab.evaluation.files import FolderLock
    lock = FolderLock(Path(sys.argv[1]), what="a run's results").acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_second_process_on_a_held_folder_stops_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"in use by another process \\(pid {holder.pid}\\)"):
            run(config(), out, "g")
        assert not (out / "results.csv").exists() and not (out / "wandb").exists()
    finally:
        holder.kill()
        holder.wait()
    run(config(), out, "g")  # the OS released the killed holder's lock
    assert len(rows(out)) == 2


def _repair(root: str) -> None:
    write_piebench(Path(root), n_per_type=1, size=32)


def test_two_processes_repairing_one_toy_set_both_succeed(tmp_path):
    import multiprocessing

    root = tmp_path / "set"
    write_piebench(root, n_per_type=1, size=32)
    for _ in range(3):
        for gt in list((root / "ground_truth").rglob("*.png"))[:2]:
            gt.unlink()
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_repair, args=(str(root),)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert [w.exitcode for w in workers] == [0, 0]
        truths, sources = ((root / part).rglob("*.png") for part in ("ground_truth", "annotation_images"))
        assert len(list(truths)) == len(list(sources))


# ---------------------------------------------------------------------------------------------------- 5. ids


@pytest.mark.parametrize("bad_id", ["700000000000 ", " 7", "7000\t00000001", "70\n01", "70\x0001"])
def test_ids_with_white_space_or_control_characters_are_refused_at_load_naming_them(tmp_path, bad_id):
    root = bench(tmp_path / "bench")

    def rename(mapping):
        first = sorted(mapping)[0]
        mapping[bad_id] = mapping.pop(first)

    edit_mapping(root, rename)
    with pytest.raises(ValueError, match=f"image id {bad_id!r}".replace("\\", "\\\\")):
        PieBenchDataset(root)


# ---------------------------------------------------------------------------------------------------- 6. sweep folders


def test_sweep_values_with_separators_stay_inside_the_sweep_folder(tmp_path, call_main):
    assert path_safe("x/../../../../escaped") == "x%2F..%2F..%2F..%2F..%2Fescaped"
    assert len(path_safe("a" * 400).encode()) <= 200
    sweep = tmp_path / "deep" / "er" / "sweep"
    proc = call_main("run", "-m", *FAST, "dataset.limit=1", "+tag=x/../../../escaped,y", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("*escaped")) or all(sweep in p.parents for p in tmp_path.rglob("*escaped"))
    assert len(list(sweep.glob("*/results.csv"))) == 2


def test_a_sweep_whose_jobs_did_not_all_report_exits_non_zero(tmp_path):
    from editlab.evaluation.aggregate import SweepReport

    sweep = tmp_path / "sweep"
    (sweep / "0_editor=npi").mkdir(parents=True)
    (sweep / "0_editor=npi" / "job_error.txt").write_text("RunError: x\n")
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"params": {}},
                                      "overrides": {"task": ["editor=npi,ddim"]}}})
    report = SweepReport()
    report.on_multirun_start(cfg)
    with pytest.raises(SystemExit, match="1 of the sweep's 2 jobs left neither results nor an error"):
        report.on_multirun_end(cfg)


def test_a_sweep_given_a_run_folder_is_refused_naming_the_sweep_key(tmp_path, call_main):
    proc = call_main("run", "-m", *FAST, "editor=npi,ddim", f"hydra.run.dir={tmp_path / 'x'}")
    assert proc.returncode == 1 and "hydra.sweep.dir" in proc.stderr and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------- 7. metrics


def test_a_metric_that_fails_for_one_item_is_noted_counted_and_reported(tmp_path, monkeypatch, caplog):
    from editlab.evaluation import metrics

    calls = []

    def flaky(scorer, image, prompt):
        calls.append(1)
        return float("nan") if len(calls) == 2 else 0.25  # the second CLIP score of the run overflows

    monkeypatch.setattr(metrics, "clip_score", flaky)
    monkeypatch.setattr(metrics.PieBenchMetrics, "unavailable", property(lambda self: []))
    cfg = config("metrics=toy")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        summary = run(cfg, out, "g")
    frame = rows(out)
    noted = frame[frame["note"].str.contains("clip_similarity_target_image failed")]
    assert len(noted) == 1 and "its backbone gave nan" in noted["note"].iloc[0]
    overall = summary[summary["edit_type"] == "all"].iloc[0]
    assert overall["n"] == 2 and overall["n_clip_similarity_target_image"] == 1
    assert "clip_similarity_target_image for 1" in caplog.text


# ---------------------------------------------------------------------------------------------------- 8. inputs


def test_a_linked_image_outside_the_benchmark_is_an_error_row(tmp_path):
    root = bench(tmp_path / "bench")
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(outside)
    image = sorted((root / "annotation_images").rglob("*.png"))[0]
    image.unlink()
    image.symlink_to(outside)
    out = tmp_path / "run"
    run(on_bench(root), out, "g")
    errors = rows(out)["error"]
    assert (errors.str.contains("is a link to .*outside", regex=True)).sum() == 1


def test_exif_orientation_is_applied_and_animated_images_noted(tmp_path):
    from editlab.evaluation.piebench import load_rgb_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image, note = load_rgb_image(tmp_path / "rotated.jpg")
    assert image.size == (20, 40) and "EXIF orientation 6 applied" in note
    assert np.asarray(image)[:10].mean() > 200  # the white half is on top once upright

    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image, note = load_rgb_image(tmp_path / "anim.gif")
    assert "first of 3 frames" in note and np.asarray(image).max() < 10


def test_control_characters_in_prompts_are_refused_and_line_breaks_folded(tmp_path):
    root = bench(tmp_path / "bench")

    def nul(mapping):
        mapping[sorted(mapping)[0]]["editing_prompt"] += "\x00"

    edit_mapping(root, nul)
    with pytest.raises(ValueError, match=r"item .*: target_prompt holds control characters \('\\x00'\)"):
        PieBenchDataset(root)

    from editlab.evaluation.icd_benchmark import IcdCsvDataset

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "cat.png")
    pd.DataFrame({"file_name": ["cat.png"], "old_caption": ["a photo\nof a cat"], "edited_caption": ["a dog"],
                  "blend_word": ["cat dog"]}).to_csv(tmp_path / "pairs.csv", index=False)
    (item,) = IcdCsvDataset(tmp_path / "pairs.csv", tmp_path)
    assert item.source_prompt == "a photo of a cat"


# ---------------------------------------------------------------------------------------------------- 9. config values


@pytest.mark.parametrize("value", ["-1", "0", "abc", "1.5"])
def test_bad_dataset_limits_name_the_key(tmp_path, value):
    with pytest.raises(RunError, match=f"dataset.limit={value!r}|dataset.limit='{value}'|dataset.limit={value}"):
        run(config(f"dataset.limit={value}"), tmp_path / "run", "g")


def test_half_precision_on_cpu_warns_and_the_blend_word_hint_names_a_real_key(tmp_path, caplog):
    from editlab.editors.p2p import word_token_alphas

    with caplog.at_level(logging.WARNING):
        run(config("precision=bf16", "dataset.limit=1"), tmp_path / "run", "g")
    assert "precision=bf16 on CPU" in caplog.text
    cfg = config()
    assert OmegaConf.select(cfg, "editor.p2p.local_blend") is not None
    with pytest.raises(ValueError, match=r"editor\.p2p\.local_blend=false"):
        word_token_alphas(["a cat"], ["dog"], _tokenizer())


def _tokenizer():
    from transformers import CLIPTokenizer

    from editlab.models.loading import load_components

    components = load_components({"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64},
                                 {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}, "cpu")
    tokenizer = components.tokenizer
    assert isinstance(tokenizer, CLIPTokenizer)
    return tokenizer


# ------------------------------------------------------------------------------------------------ 10. atomic writes


class Killed(BaseException):
    pass


def test_a_kill_while_writing_the_summary_leaves_no_empty_file_and_orphans_are_cleaned(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(config(), out, "g")
    summary = (out / "summary.csv").read_bytes()
    real = pd.DataFrame.to_csv

    def dying(self, path_or_buf=None, *args, **kwargs):
        if hasattr(path_or_buf, "write"):
            path_or_buf.write("partial")
            raise Killed
        return real(self, path_or_buf, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", dying)
    with pytest.raises(Killed):
        run(config(), out, "g")
    monkeypatch.undo()
    assert (out / "summary.csv").read_bytes() == summary
    orphan = out / "annotation_images" / ".edit.png.4242.tmp"  # as a kill between write and rename leaves it
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half")
    run(config(), out, "g")
    assert not orphan.exists() and not list(out.rglob("*.tmp"))
