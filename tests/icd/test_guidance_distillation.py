"""Guidance distillation on the tiny model: the w-embedding is the released teachers', the zero-initialised student
is the conditional teacher bit for bit, the loss vanishes where guidance has nothing to add, the export loads as a
CFG-distilled teacher (one UNet call per guided step), a short run lowers the error at every w, and the chain
(distil, then iCD on the distilled teacher) composes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from editlab.diffusion.ddim import add_noise
from editlab.icd.guidance_distillation import DistillSettings, GuidanceDistillationModule, WMixture, min_snr_weight
from editlab.icd.teacher import load_cfg_distilled, warn_outside_w_range
from editlab.icd.training import OptimSettings, load_teacher
from editlab.models.guidance import embedded_kind, guidance_embedding, unet_guidance
from editlab.models.loading import load_components

TINY = {"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64}
FP32 = {"dtype": "float32", "vae_dtype": "float32"}
CONF = Path(__file__).resolve().parents[2] / "editlab" / "conf"
CAPTIONS = ["a red circle on gray", "a blue square on white"]


def module(variant: str = "full", **settings) -> GuidanceDistillationModule:
    components = load_components(TINY, FP32, {"mode": "none"}, "cpu")
    return GuidanceDistillationModule(components, DistillSettings(variant=variant, **settings),
                                      OptimSettings(lr=1e-3))


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_the_w_mixture_draws_its_shares_and_reports_its_scales():
    mixture = WMixture(zero=0.25, discrete=(7.0, 19.0), p_discrete=0.25, low=0.0, high=19.0)
    w = mixture.sample(20000, torch.Generator().manual_seed(0))
    assert (w == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert ((w == 7) | (w == 19)).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert 0 <= w.min() and w.max() <= 19
    assert mixture.eval_scales == [0.0, 7.0, 19.0] and mixture.bucket(7.0) == "discrete"
    with pytest.raises(ValueError, match="sum to at most 1"):
        WMixture(zero=0.7, p_discrete=0.5)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_the_zero_initialised_student_is_the_conditional_teacher_bit_for_bit(variant):
    m = module(variant)
    proj = m.student.time_embedding.cond_proj
    assert proj.in_features == 512 and embedded_kind(m.student) == "embedded"
    emb = guidance_embedding(torch.zeros(1))  # the released teachers' embedding at w = 0: [0]*256 + [1]*256
    assert torch.equal(emb, torch.cat([torch.zeros(1, 256), torch.ones(1, 256)], dim=1))
    teacher, student = m.guided
    text = m.encode_text(CAPTIONS)
    x, t = latents(), torch.tensor([500, 100])
    conditional = teacher(x, t, text, torch.zeros(2))
    for w in (0.0, 3.0, 19.0):
        assert torch.equal(student(x, t, text, torch.full((2,), w)), conditional), w


def test_the_loss_is_the_guidance_gap_and_zero_where_guidance_adds_nothing():
    m = module()
    x0, noise, t = latents(0), latents(1), torch.tensor([300, 700])
    empty = m.encode_text(["", ""])  # eps_c = eps_u: the two-pass target is eps_c at every w (up to the rounding
    assert m.losses(x0, empty, noise, t, torch.tensor([5.0, 19.0])).max() < 1e-10  # of one batched call)
    text = m.encode_text(CAPTIONS)
    assert torch.equal(m.losses(x0, text, noise, t, torch.zeros(2)), torch.zeros(2))
    # at step 0 the loss is w^2 ||eps_c - eps_u||^2 (mean over elements), the analytic value
    teacher, _ = m.guided
    x_t = add_noise(x0, noise, t, m.alphas_cumprod)
    gap = teacher(x_t, t, text, torch.ones(2)) - teacher(x_t, t, text, torch.zeros(2))
    expected = (4.0 * gap).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(m.losses(x0, text, noise, t, torch.full((2,), 4.0)), expected, rtol=1e-5, atol=1e-7)


def test_min_snr_weights():
    abar = torch.tensor([0.99, 0.5, 0.01])
    assert torch.equal(min_snr_weight(abar, 0.0), torch.ones(3))
    weights = min_snr_weight(abar, 5.0)
    assert weights[0] == pytest.approx(5 / 99) and weights[1] == 1 and weights[2] == 1


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_a_short_run_lowers_the_error_at_every_guided_w_and_the_export_loads_as_a_teacher(tmp_path, variant):
    torch.manual_seed(0)
    m = module(variant, mixture=WMixture(zero=0.0, discrete=(4.0,), p_discrete=1.0, low=0.0, high=4.0))
    text = m.encode_text(CAPTIONS)
    x0 = latents(3)
    before = m.errors(x0, text, scales=[4.0])
    optimizer = torch.optim.AdamW(list(m.trainable().values()), lr=1e-4 if variant == "full" else 5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (2,), generator=generator)
        loss = m.losses(x0, text, noise, t, torch.full((2,), 4.0)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = m.errors(x0, text, scales=[4.0])
    assert before[4.0][0] == pytest.approx(before[4.0][1])  # at the start: the model with w ignored
    assert after[4.0][0] < 0.9 * before[4.0][0], (before, after)  # 0.61 -> 0.43 (full), 0.41 (lora) in 30 steps

    path = m.export_teacher(tmp_path / "teacher")
    base = load_components(TINY, FP32, {"mode": "none"}, "cpu").unet
    loaded = load_cfg_distilled(base, path)  # the released teachers' loader, strictly
    calls = []
    loaded.register_forward_pre_hook(lambda *args: calls.append(1))
    guided = unet_guidance(loaded, "embedded")
    x_t, t = latents(4), torch.tensor([400, 400])
    out = guided(x_t, t, text, torch.full((2,), 4.0))
    assert len(calls) == 1  # one UNet call per guided step
    _, student = m.guided
    torch.testing.assert_close(out, student(x_t, t, text, torch.full((2,), 4.0)), rtol=1e-4, atol=1e-5)
    teacher = load_teacher(TINY, FP32, {"guidance": "embedded", "checkpoint": str(path), "embed_dim": 512})
    assert embedded_kind(teacher.unet) == "embedded"


def test_the_chain_composes():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        distil = compose("train", ["train/experiment=toy_guidance"])
        assert distil.train.method == "guidance" and distil.train.guidance.mixture.high == 6.5
        chained = compose("train", ["train/experiment=toy", "train/teacher=distilled",
                                    "train.teacher.checkpoint=/runs/toy_teacher/teacher/cfg_distill.safetensors"])
        assert chained.train.method == "icd" and chained.train.teacher.guidance == "embedded"
        assert chained.train.teacher.checkpoint.endswith("cfg_distill.safetensors")

        sd15 = compose("train", ["train/experiment=sd15_guidance"])
        assert (sd15.train.method, sd15.model.name, sd15.train.data.kind) == ("guidance", "sd15", "coco")
        assert sd15.train.guidance.mixture.discrete == [7, 11, 15, 19] and sd15.train.guidance.ema_decay == 0.9999
        sd15_icd = compose("train", ["train/experiment=sd15_reference", "train/teacher=distilled",
                                     "train.teacher.checkpoint=/runs/sd15_teacher/teacher/cfg_distill.safetensors"])
        assert sd15_icd.train.method == "icd" and sd15_icd.train.teacher.guidance == "embedded"

        sdxl = compose("train", ["train/experiment=sdxl_guidance"])
        assert sdxl.model.family == "sdxl" and sdxl.model.lora is None  # the plain base, not the LCM-LoRA one
        assert sdxl.train.guidance.mixture.discrete == [3, 5, 7, 9, 11, 13, 15, 17, 19]
        assert set(sdxl.train.guidance.mixture.discrete) < set(compose("train", ["train/icd=sdxl_4step"])
                                                               .train.icd.guidance.train_scales)


def test_a_consistency_model_is_refused_as_the_base(call_main, tmp_path):
    done = call_main("train", "model=tiny", "train.method=guidance", "+model.lora=latent-consistency/lcm-lora-sdv1-5",
                     "train/logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode != 0 and "model.lora=null" in done.stderr and "Traceback" not in done.stderr


def test_validation_and_the_export_see_the_ema_weights(tmp_path):
    m = module(ema_decay=0.5)
    own = {n: p.detach().clone() for n, p in m.trainable().items()}
    for name in m.ema:
        m.ema[name] += 0.01
    with m.exported_weights():
        inside = {n: p.detach().clone() for n, p in m.trainable().items()}
    assert all(torch.equal(inside[n], m.ema[n]) for n in own)
    assert all(torch.equal(p, own[n]) for n, p in m.trainable().items())  # restored after the block
    exported = m.teacher_state_dict()
    name = "time_embedding.cond_proj.weight"
    assert torch.equal(exported[name], m.ema[name])


def test_train_py_distils_and_exports_the_teacher(call_main, tmp_path):
    out = tmp_path / "run"
    done = call_main("train", "model=tiny", "train.method=guidance", "train.trainer.iterations=2",
                     "train.trainer.validation_every=2", "train.data.n_images=12", "train.data.batch_size=2",
                     "train.data.validation_size=2", "train/logger=none", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr
    assert (out / "teacher" / "cfg_distill.safetensors").is_file()
    assert list((out / "validation").glob("iteration_*.png"))


def test_an_sdxl_family_base_distils_with_its_pooled_and_size_conditioning():
    components = load_components({"name": "tiny_sdxl", "kind": "tiny", "arch": "sdxl", "seed": 0, "resolution": 64},
                                 FP32, {"mode": "none"}, "cpu")
    m = GuidanceDistillationModule(components, DistillSettings(), OptimSettings(lr=1e-3))
    text = m.encode_text(CAPTIONS)
    assert set(text.added) == {"text_embeds", "time_ids"}
    teacher, student = m.guided
    x, t = latents(), torch.tensor([500, 100])
    assert torch.equal(student(x, t, text, torch.full((2,), 7.0)),
                       teacher(x, t, text, torch.zeros(2)))
    losses = m.losses(latents(1), text, latents(2), t, torch.tensor([0.0, 7.0]))
    assert losses[0] < 1e-10 and losses[1] > 1e-6  # w = 0: the conditional prediction (up to batched rounding)
    losses.mean().backward()
    assert m.student.time_embedding.cond_proj.weight.grad.abs().sum() > 0  # w reaches the student


def test_trajectory_inputs_are_the_base_samplers_states_with_its_own_guided_prediction_as_target():
    m = module(inputs="trajectories", trajectory_steps=5)
    text = m.encode_text(CAPTIONS)
    w = torch.tensor([0.0, 4.0])
    x_t, t, target = m.trajectory_points(text, w, (2, 4, 8, 8), torch.Generator().manual_seed(3))
    assert set(t.tolist()) <= {800, 600, 400, 200, 0}  # on the 5-step DDIM grid the editors sample
    teacher, _ = m.guided
    torch.testing.assert_close(target, teacher(x_t, t, text, w), rtol=1e-5, atol=1e-6)
    losses = m.student_losses(x_t, t, text, w, target)
    assert losses[0] < 1e-10 and losses[1] > 1e-6  # the zero-initialised student is the w = 0 sampler


def test_train_py_distils_on_trajectories(call_main, tmp_path):
    out = tmp_path / "run"
    done = call_main("train", "model=tiny", "train.method=guidance", "train.guidance.inputs=trajectories",
                     "train.guidance.trajectory_steps=3", "train.trainer.iterations=2",
                     "train.trainer.validation_every=0", "train.data.n_images=12", "train.data.batch_size=2",
                     "train/logger=none", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr
    assert (out / "teacher" / "cfg_distill.safetensors").is_file()


def test_the_export_records_its_w_range_and_asking_beyond_it_warns(tmp_path, caplog):
    m = module(mixture=WMixture(zero=0.5, discrete=(2.0,), p_discrete=0.5, low=0.0, high=2.0))
    teacher = load_cfg_distilled(load_components(TINY, FP32, {"mode": "none"}, "cpu").unet,
                                 m.export_teacher(tmp_path / "teacher"))
    assert teacher.trained_w_range == (0.0, 2.0)
    with caplog.at_level(logging.WARNING, logger="editlab.icd.teacher"):
        warn_outside_w_range(teacher, [0.0, 2.0], "editor.code_guidance_scale")
        assert not caplog.records
        warn_outside_w_range(teacher, [19.0], "editor.code_guidance_scale")
    assert "w = 19, beyond the range it was trained on (0..2" in caplog.text


def test_the_learning_rate_warms_up_then_decays_on_a_cosine_to_zero():
    m = GuidanceDistillationModule(load_components(TINY, FP32, {"mode": "none"}, "cpu"), DistillSettings(),
                                   OptimSettings(lr=1e-3, warmup_steps=10, decay="cosine"))
    m.trainer = type("Trainer", (), {"max_steps": 110})()
    schedule = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [schedule.lr_lambdas[0](step) for step in (0, 8, 9, 59, 109)]
    assert factors == pytest.approx([0.1, 0.9, 1.0, 0.5, 0.0], abs=1e-9)
    with pytest.raises(ValueError, match="decay='linear': expected constant or cosine"):
        GuidanceDistillationModule(load_components(TINY, FP32, {"mode": "none"}, "cpu"), DistillSettings(),
                                   OptimSettings(decay="linear"))
