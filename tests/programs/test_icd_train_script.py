"""train.py: the Hydra config composes (default, sweeps over train.icd.num_steps, presets) and a short run writes the
adapters, a checkpoint, validation images and an offline W&B run."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config

import editlab.train as train
from editlab.icd.lora import read_adapter_file

REPO = Path(__file__).resolve().parents[2]
CONF = str(REPO / "editlab" / "conf")


def config(*overrides: str):
    return compose_config(*overrides, name="train")


@pytest.mark.parametrize("steps,reverse,forward", [(3, (0, 339, 679), (339, 679, 999)),
                                                   (4, (0, 259, 519, 779), (259, 519, 779, 999))])
def test_sweep_over_num_steps_composes(steps, reverse, forward):
    schedule = train.build_schedule(config(f"train.icd.num_steps={steps}").train.icd)
    assert (schedule.reverse, schedule.forward) == (reverse, forward)


def test_presets_compose_and_explicit_lists_win():
    schedule = train.build_schedule(config("train/icd=sd15_3step").train.icd)
    assert schedule.reverse == (0, 339, 699) and schedule.reverse_steps == [339, 699, 999]
    xl = config("train/icd=sdxl_4step").train.icd
    assert train.build_schedule(xl).forward_steps == [19, 249, 499, 699] and len(xl.guidance.train_scales) == 10
    cfg = config("train/experiment=sd15_reference")
    t = cfg.train
    assert (cfg.model.name, cfg.precision.name, t.data.kind, t.optim.lr) == ("sd15", "bf16", "coco", 8e-6)
    assert train.LIGHTNING_PRECISION[cfg.precision.dtype] == "bf16-mixed" and t.trainer.gradient_checkpointing


def test_short_run_writes_adapters_checkpoint_and_logs(tmp_path):
    cfg = config("train.trainer.iterations=2", "train.trainer.validation_every=1", "train.trainer.checkpoint_every=1",
                 "train.trainer.progress_bar=false", f"train.data.root={tmp_path / 'toy'}", "train.data.n_images=6",
                 "train.data.batch_size=2", "train.data.validation_size=2", "train.icd.lora.rank=4",
                 "train.icd.num_steps=2")
    metrics = train.train(cfg, tmp_path / "run", "test")
    run = tmp_path / "run"
    assert set(metrics) == {"val/latent_mse", "val/psnr", "iteration"} and metrics["iteration"] == 2
    for name in ("forward", "reverse"):
        weights, meta = read_adapter_file(run / "lora" / f"{name}.safetensors")
        assert weights and meta["r"] == 4 and meta["lora_alpha"] == 8
    info = json.loads((run / "lora" / "schedule.json").read_text())
    assert info["reverse_steps"] == [499, 999] and info["forward_steps"] == [19, 499]  # m = 2: L = 25
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(".lora_" in k for k in checkpoint["state_dict"]) and checkpoint["icd"]["iteration"] == 2
    assert len(list(run.rglob("validation/iteration_*.png"))) == 3  # before training and after each iteration
    assert list((run / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_ddp_run_on_two_cpu_processes(tmp_path):
    """The multi-GPU launch path on CPU: `python train.py` with devices=2 and DDP, where Lightning re-executes the
    Hydra script for rank 1 and the ranks talk over gloo. The run finishes, and rank 0 alone validates, logs and
    exports."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "model=tiny", "train/teacher=tiny", "train.trainer.accelerator=cpu",
         "train.trainer.devices=2", "train.trainer.strategy=ddp_find_unused_parameters_true",
         "train.trainer.iterations=2", "train.trainer.validation_every=2", "train.trainer.progress_bar=false",
         f"train.data.root={tmp_path / 'toy'}", "train.data.n_images=8", "train.data.batch_size=2",
         "train.data.validation_size=2", "train.icd.lora.rank=4", "train.icd.num_steps=2", f"hydra.run.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]  # the second process joined
    for name in ("forward", "reverse"):
        weights, _ = read_adapter_file(run / "lora" / f"{name}.safetensors")
        assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert len(list(run.rglob("validation/iteration_*.png"))) == 2  # before training and at iteration 2, rank 0
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1


RESUME_RUN = ("train.trainer.iterations=4", "train.trainer.validation_every=0", "train.trainer.checkpoint_every=1",
              "train.trainer.progress_bar=false", "train.data.n_images=7", "train.data.batch_size=2",
              "train.data.validation_size=2", "train.icd.lora.rank=4", "train.icd.num_steps=2",
              "train/logger=none")


class Killed(Exception):
    """Stands for a kill: the run stops in the middle of an iteration, after its last checkpoint."""


def whole_and_killed_then_resumed(module_class, overrides: tuple[str, ...], tmp_path, monkeypatch,
                                  export: str) -> None:
    """An unstopped run into tmp_path/whole, and one killed in its third iteration (after the checkpoint of the
    second; its final ``export`` not yet written) then re-run into tmp_path/stopped with nothing said about
    resuming."""
    data = f"train.data.root={tmp_path / 'toy'}"
    train.train(config(*overrides, data), tmp_path / "whole", "test")
    step = module_class.training_step

    def dies_at_iteration_2(self, batch, batch_idx):
        if self.iteration == 2:
            raise Killed
        return step(self, batch, batch_idx)

    monkeypatch.setattr(module_class, "training_step", dies_at_iteration_2)
    with pytest.raises(Killed):
        train.train(config(*overrides, data), tmp_path / "stopped", "test")
    assert not (tmp_path / "stopped" / export).exists()
    monkeypatch.setattr(module_class, "training_step", step)
    train.train(config(*overrides, data), tmp_path / "stopped", "test")


def test_killed_and_resumed_run_ends_bit_identical(tmp_path, monkeypatch):
    """A run stopped in its third iteration and re-run into the same directory (no resume= given) continues from
    last.ckpt with the same data order and random draws: every exported tensor equals an unstopped run's."""
    from editlab.icd.training import ICDModule

    whole_and_killed_then_resumed(ICDModule, RESUME_RUN, tmp_path, monkeypatch, "lora/forward.safetensors")
    for name in ("forward", "reverse"):
        whole, _ = read_adapter_file(tmp_path / "whole" / "lora" / f"{name}.safetensors")
        resumed, _ = read_adapter_file(tmp_path / "stopped" / "lora" / f"{name}.safetensors")
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), name
    last = [torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=False) for r in ("whole", "stopped")]
    assert last[0]["icd"]["iteration"] == last[1]["icd"]["iteration"] == 4
    assert all(torch.equal(last[0]["state_dict"][k], last[1]["state_dict"][k]) for k in last[0]["state_dict"])


def test_resume_accepts_last_a_directory_or_a_file(tmp_path):
    run = tmp_path / "run"
    assert train.resume_checkpoint(None, run) is None  # a new directory starts from scratch
    with pytest.raises(FileNotFoundError, match="resume=last"):
        train.resume_checkpoint("last", run)
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "iteration_000002.ckpt"):
        torch.save({}, run / "checkpoints" / name)
    last = str(run / "checkpoints" / "last.ckpt")
    assert train.resume_checkpoint(None, run) == train.resume_checkpoint("last", run) == last
    assert train.resume_checkpoint(str(run), tmp_path / "other") == last
    assert train.resume_checkpoint(str(run / "checkpoints"), tmp_path / "other") == last
    second = str(run / "checkpoints" / "iteration_000002.ckpt")
    assert train.resume_checkpoint(second, tmp_path / "other") == second


def test_a_truncated_last_checkpoint_is_named_with_the_intact_one_to_resume_from(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    intact = folder / "iteration_000080.ckpt"
    torch.save({"weights": torch.zeros(1000)}, intact)
    (folder / "last.ckpt").write_bytes(intact.read_bytes()[:3000])  # killed while it was written
    with pytest.raises(SystemExit, match=rf"{re.escape(str(folder / 'last.ckpt'))} is damaged or truncated .*"
                                         rf"with resume={re.escape(str(intact))}$"):
        train.resume_checkpoint(None, tmp_path / "run")
    intact.unlink()
    with pytest.raises(SystemExit, match="no intact checkpoint beside it: move it away to start over"):
        train.resume_checkpoint("last", tmp_path / "run")


def test_endless_batches_resume_where_they_stopped_and_split_over_ranks(monkeypatch):
    from itertools import islice

    from editlab.icd.data import EndlessBatches

    stream = list(islice(iter(EndlessBatches(7, 2, seed=3)), 9))  # 3 batches an epoch, 3 epochs
    assert all(len(b) == 2 for b in stream) and stream[:3] != stream[3:6]
    assert list(islice(iter(EndlessBatches(7, 2, seed=3, start=4)), 5)) == stream[4:]
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        ranks.append(list(islice(iter(EndlessBatches(7, 2, seed=3, start=1)), 3)))
    assert ranks == [stream[2:8:2], stream[3:9:2]]


def test_continuing_a_run_with_other_settings_stops_with_the_keys(tmp_path):
    data = f"train.data.root={tmp_path / 'toy'}"
    short = ("train.trainer.iterations=1", "train.trainer.checkpoint_every=1")
    train.train(config(*RESUME_RUN, data, *short), tmp_path / "run", "test")
    with pytest.raises(SystemExit, match=r"train.optim.lr: 0.0001 -> 0.001"):
        train.train(config(*RESUME_RUN, data, *short, "train.optim.lr=1e-3"), tmp_path / "run", "test")
    train.train(config(*RESUME_RUN, data, "train.trainer.iterations=2"), tmp_path / "run", "test")  # longer: fine
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["icd"]["iteration"] == 2


def test_training_settings_are_the_config_groups_as_they_are():
    from omegaconf import OmegaConf

    from editlab.icd.training import OptimSettings

    optim = train.settings(OptimSettings, OmegaConf.create({"lr": 1e-3, "betas": [0.8, 0.9]}), "train.optim")
    assert optim == OptimSettings(lr=1e-3, betas=[0.8, 0.9])
    with pytest.raises(SystemExit, match="train.optim has no setting lr_max; it takes: betas, decay, eps"):
        train.settings(OptimSettings, OmegaConf.create({"lr_max": 1.0}), "train.optim")


GUIDANCE_RUN = ("model=tiny", "train.method=guidance", "train.guidance.ema_decay=0.5", *RESUME_RUN)


def test_killed_and_resumed_guidance_distillation_ends_bit_identical(tmp_path, monkeypatch):
    """The same for guidance distillation: the exported teacher (the EMA weights) and the checkpointed student equal
    an unstopped run's."""
    from safetensors.torch import load_file

    from editlab.icd.guidance_distillation import GuidanceDistillationModule

    whole_and_killed_then_resumed(GuidanceDistillationModule, GUIDANCE_RUN, tmp_path, monkeypatch,
                                  "teacher/cfg_distill.safetensors")
    whole, resumed = (load_file(tmp_path / r / "teacher" / "cfg_distill.safetensors") for r in ("whole", "stopped"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    last = [torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=False) for r in ("whole", "stopped")]
    assert last[0]["guidance"]["iteration"] == last[1]["guidance"]["iteration"] == 4
    emas = [checkpoint["guidance"]["ema"] for checkpoint in last]
    assert emas[0] and all(torch.equal(emas[0][k], emas[1][k]) for k in emas[0])


def test_guidance_distillation_ddp_run_on_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "model=tiny", "train.method=guidance", "train.trainer.accelerator=cpu",
         "train.trainer.devices=2", "train.trainer.strategy=ddp", "train.trainer.iterations=2",
         "train.trainer.validation_every=2", "train.trainer.progress_bar=false", f"train.data.root={tmp_path / 'toy'}",
         "train.data.n_images=8", "train.data.batch_size=2", "train.data.validation_size=2", f"hydra.run.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]
    assert (run / "teacher" / "cfg_distill.safetensors").is_file()
    assert len(list(run.rglob("validation/iteration_*.png"))) == 2  # before training and at iteration 2, rank 0


def test_continuing_a_run_with_other_settings_stops_but_new_settings_of_the_code_pass(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job = train.job_record(config("train.optim.lr=1e-4"), run)
    (run / "job.json").write_text(json.dumps(job))  # what fit writes once training starts
    assert train.job_record(config("train.optim.lr=1e-4"), run) == job  # the same settings: continues
    with pytest.raises(SystemExit, match=r"train.optim.lr: 0.0001 -> 0.001"):
        train.job_record(config("train.optim.lr=1e-3"), run)
    for key in ("train.optim.decay", "train.method"):  # a run made before these settings existed
        del job["config"][key]
    (run / "job.json").write_text(json.dumps(job))
    train.job_record(config("train.optim.lr=1e-4"), run)
    with pytest.raises(SystemExit, match="train.method: 'icd' -> 'guidance'"):
        train.job_record(config("train.optim.lr=1e-4", "train.method=guidance"), run)


TINY_SCRIPT = ("model=tiny", "train/teacher=tiny", "train.trainer.validation_every=0", "train.data.n_images=6",
               "train.data.batch_size=2", "train.data.validation_size=2", "train.icd.lora.rank=4",
               "train.icd.num_steps=2")


def train_py(*overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *overrides], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **popen)


def test_a_setting_error_at_start_up_is_one_line_and_leaves_no_job_record(tmp_path):
    """Fewer optimizer steps than the warm-up: one line naming the keys, and the corrected command may use the
    directory (nothing was trained there)."""
    run = tmp_path / "run"
    proc = train_py(*TINY_SCRIPT, f"train.data.root={tmp_path / 'toy'}", "train.trainer.iterations=2",
                    "train.optim.decay=cosine", "train.optim.warmup_steps=100", "train/logger=none",
                    f"hydra.run.dir={run}")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("error: train.optim.decay=cosine decays after the warm-up, "
                                                      "but train.optim.warmup_steps=100 is not below"), output[-2000:]
    assert not (run / "job.json").exists()
    train.job_record(config(*TINY_SCRIPT, "train.optim.decay=cosine", "train.optim.warmup_steps=4"), run)


def started_then_signalled(run: Path, signum: int, *overrides: str) -> tuple[int, str]:
    """train.py into ``run``, sent ``signum`` once training has started (job.json written); its status and output."""
    proc = train_py(*TINY_SCRIPT, *overrides, f"hydra.run.dir={run}")
    while not (run / "job.json").exists() and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signum)
    return proc.wait(timeout=600), proc.stdout.read()


def test_sigterm_checkpoints_the_running_iteration_and_the_printed_command_resumes_it(tmp_path):
    """SIGTERM (Slurm's notice before a kill) once training runs: the iteration under way finishes and is saved
    under its number, the message names the file and the command that resumes, and that command continues the run
    from there: the same W&B run, a progress bar counting from the iteration it resumes at to the total, the last
    ``keep_checkpoints`` checkpoints kept."""
    run = tmp_path / "run"
    overrides = (f"train.data.root={tmp_path / 'toy'}", "train.trainer.iterations=4",
                 "train.trainer.checkpoint_every=1", "train.trainer.keep_checkpoints=2")
    status, output = started_then_signalled(run, signal.SIGTERM, *overrides)
    assert status == 128 + signal.SIGTERM, output[-3000:]
    stopped = re.search(r"SIGTERM: stopped after iteration (\d+), saved (\S+); resume with: (.+)", output)
    assert stopped, output[-3000:]
    iteration, saved, command = int(stopped[1]), Path(stopped[2]), shlex.split(stopped[3])
    assert saved == run / "checkpoints" / f"iteration_{iteration:06d}.ckpt" and 1 <= iteration < 4
    assert torch.load(saved, weights_only=True)["icd"]["iteration"] == iteration
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["icd"]["iteration"] == iteration
    assert command[:2] == ["python", "train.py"] and f"hydra.run.dir={run}" in command
    assert "saved_models" not in output  # the tail of a Lightning warning about manual optimisation

    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    shown = resumed.stdout + resumed.stderr  # Lightning's bar writes to stdout
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in shown
    assert re.search(rf"iCD: +\d+%\|[^|]*\| {iteration}/4 \[", shown), shown[-2000:]
    assert "/?" not in shown and "Training" not in shown and "is not empty" not in shown, shown[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["icd"]["iteration"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "iteration_000003.ckpt", "iteration_000004.ckpt", "last.ckpt"]
    wandb_id = json.loads((run / "job.json").read_text())["wandb_id"]
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{wandb_id}") for a in attempts)
    record = (attempts[-1] / f"run-{wandb_id}.wandb").read_bytes()  # the export, logged as a model artifact
    assert f"lora-{wandb_id}".encode() in record and b"reverse.safetensors" in record and b"schedule.json" in record


def test_ctrl_c_checkpoints_the_running_iteration_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    status, output = started_then_signalled(run, signal.SIGINT, f"train.data.root={tmp_path / 'toy'}",
                                            "train.method=guidance", "train.trainer.iterations=50",
                                            "train.trainer.checkpoint_every=20", "train/logger=none")
    assert status == 128 + signal.SIGINT, output[-3000:]
    stopped = re.search(r"SIGINT: stopped after iteration (\d+), saved (\S+); resume with: python train.py", output)
    assert stopped and Path(stopped[2]) == run / "checkpoints" / f"iteration_{int(stopped[1]):06d}.ckpt", output
    assert torch.load(Path(stopped[2]), weights_only=True)["guidance"]["iteration"] == int(stopped[1]) < 20


def test_training_runs_are_named_like_editing_runs():
    hydra_cfg = SimpleNamespace(runtime=SimpleNamespace(choices={"train/experiment": "toy"}),
                                job=SimpleNamespace(num=3),
                                sweep=SimpleNamespace(dir="multirun/train/2026-12-01/10-06-15"))
    cfg = config("model=tiny")
    single = Path("outputs/train/2026-12-01/10-07-00_tiny_m4")
    assert train.wandb_names(cfg, hydra_cfg, single, False) == ("toy 2026-12-01", "icd tiny fp32 10-07-00")
    assert train.wandb_names(cfg, hydra_cfg, Path("x"), True) == ("toy 2026-12-01 10-06-15", "3 icd tiny fp32")
