"""RF-Inversion: its closed-form properties on an analytic velocity field (float64), the community pipeline's loop
re-derived in plain tensor math on the tiny FLUX model, cost, seeding, guidance per family, the inversion task,
run.py end to end, and what it refuses."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FP32, NO_OFFLOAD, PROMPTS, random_image
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from editlab.diffusion.schedules import FlowSchedule
from editlab.editors.base import EditorConfigError, EditRequest, build_editor
from editlab.editors.rf_inversion import eta_schedule, invert, sample
from editlab.models.families.flux import image_ids, pack, unpack
from editlab.models.loading import load_components

FLUX_1024 = FlowSchedule(shift=3.0, dynamic=True, seq_len=4096, grid="uniform").sigmas(28)  # FLUX-dev at 1024²
SHAPE = (1, 4, 6, 6)


def field(seed: int = 0):
    """A random nonlinear velocity field v(x, t) in float64, of both x and t."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE[1], SHAPE[1], generator=g, dtype=torch.float64) / 2
    b = torch.randn(SHAPE, generator=g, dtype=torch.float64)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x) + t * b) - x * math.cos(3 * t)

    return velocity


def draws(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]


def test_eta_one_on_every_step_returns_the_image_for_any_field():
    x, y0 = draws(2)
    for seed in range(3):
        edited = sample(x, y0, field(seed), FLUX_1024, [1.0] * 28)
        torch.testing.assert_close(edited, y0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid", ["diffusers_community", "consistent"])
def test_gamma_and_eta_zero_are_plain_euler_inversion_then_sampling(grid):
    velocity, (y0, y1) = field(), draws(2)
    n, y = 28, y0.clone()
    for i in range(n):  # up the mirrored grid, the model told i / (N + 1) or the latent's level 1 - sigma_i
        y = y + (FLUX_1024[i] - FLUX_1024[i + 1]) * velocity(y, i / (n + 1) if grid == "diffusers_community"
                                                             else 1 - FLUX_1024[i])
    inverted = invert(y0, y1, velocity, FLUX_1024, 0.0, grid)
    torch.testing.assert_close(inverted, y, rtol=0, atol=1e-12)
    x = inverted
    for i in range(n):
        x = x + (FLUX_1024[i + 1] - FLUX_1024[i]) * velocity(x, FLUX_1024[i])
    torch.testing.assert_close(sample(inverted, y0, velocity, FLUX_1024, [0.0] * n), x, rtol=0, atol=1e-12)


def test_gamma_one_ends_on_the_noise_on_the_consistent_grid_only():
    y0, y1 = draws(2)
    torch.testing.assert_close(invert(y0, y1, field(), FLUX_1024, 1.0, "consistent"), y1, rtol=0, atol=1e-12)
    assert (invert(y0, y1, field(), FLUX_1024, 1.0, "diffusers_community") - y1).abs().max() > 1e-2


def test_eta_steps_are_the_pipelines_rounding_of_its_fractions():
    assert eta_schedule(28, 0.9, 0.0, 7 / 28) == [0.9] * 7 + [0.0] * 21  # the README's settings
    assert eta_schedule(10, 1.0, 0.15, 0.35) == [0.0] + [1.0] * 2 + [0.0] * 7  # int(1.5) = 1 ... int(3.5) = 3
    assert eta_schedule(4, 0.8, 0.0, 1.0, decay=True, power=2.0) == [0.8 * (1 - i / 4) ** 2 for i in range(4)]
    assert eta_schedule(4, 0.8, 0.5, 0.5) == [0.0] * 4


@pytest.fixture(scope="module")
def flux():
    return load_components({"name": "tiny_flux", "kind": "tiny", "arch": "flux", "seed": 0, "resolution": 64},
                           FP32, NO_OFFLOAD, "cpu")


@pytest.fixture(scope="module")
def sd3():
    return load_components({"name": "tiny_sd3", "kind": "tiny", "arch": "sd3", "seed": 0, "resolution": 64},
                           FP32, NO_OFFLOAD, "cpu")


def test_it_is_the_community_pipelines_loop_on_tiny_flux(flux):
    """examples/community/pipeline_flux_rf_inversion.py's `invert` then `__call__`, in its own terms: packed tokens,
    the grid from diffusers' scheduler, time t = 1 - sigma and velocity -v_theta while sampling."""
    c, n, gamma = flux, 6, 0.7
    settings = {"name": "rf_inversion", "num_steps": n, "gamma": gamma, "eta": 0.8, "eta_start": 0.2,
                "eta_stop": 0.7, "decay_eta": True, "eta_decay_power": 2.0, "guidance_scale": 4.0}
    editor = build_editor(settings, c)
    y0, target, empty = c.encode_image(random_image()), c.conditioning(PROMPTS[1:]), c.unconditional()
    got = editor.edit_latents(y0, target, torch.Generator().manual_seed(7))

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(c.scheduler.config)
    config = scheduler.config
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(
        64, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift))
    sigmas = scheduler.sigmas.tolist()

    def transformer(latents, t, cond, guidance):
        return c.transformer(hidden_states=latents, timestep=torch.tensor([t], dtype=torch.float32),
                             guidance=torch.full([1], guidance), pooled_projections=cond.added["pooled_projections"],
                             encoder_hidden_states=cond.text, txt_ids=torch.zeros(cond.text.shape[1], 3),
                             img_ids=image_ids(16, 16, y0.device, torch.float32), return_dict=False)[0]

    image_latents = pack(y0)
    y1 = pack(torch.randn(y0.shape, generator=torch.Generator().manual_seed(7)))
    first, last = int(0.2 * n), int(0.7 * n)
    with torch.no_grad():
        y = image_latents
        for i in range(n):  # Algorithm 1, the unconditional field at guidance 0
            t_i = i / (n + 1)
            u = transformer(y, t_i, empty, 0.0)
            u_hat = u + gamma * ((y1 - y) / (1 - t_i) - u)
            y = y + u_hat * (sigmas[i] - sigmas[i + 1])
        x = y
        for i in range(n):  # Algorithm 2
            t_i = 1 - sigmas[i]
            v = -transformer(x, sigmas[i], target, 4.0)
            eta = 0.8 * (1 - i / n) ** 2.0 if first <= i < last else 0.0
            v_hat = v + eta * ((image_latents - x) / (1 - t_i) - v)
            x = x + v_hat * (sigmas[i] - sigmas[i + 1])
    torch.testing.assert_close(got, unpack(x, 16, 16), rtol=1e-5, atol=1e-5)


def calls_of(model, run) -> list[dict]:
    """The keyword arguments of every call of the model's denoiser that ``run()`` makes."""
    seen = []
    hook = model.denoiser.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_on_flux_dev_cost_guidance_seeding_and_the_shared_model(flux):
    editor = build_editor({"name": "rf_inversion", "num_steps": 5}, flux)
    request = EditRequest(random_image(), PROMPTS[0], PROMPTS[1], seed=3)
    weights = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    results = []
    calls = calls_of(flux, lambda: results.append(editor.edit(request)))
    assert results[0].nfe == len(calls) == 2 * 5 and results[0].edited.size == (64, 64)
    assert [call["guidance"].tolist() for call in calls] == [[0.0]] * 5 + [[3.5]] * 5  # inversion, sampling
    assert all(torch.equal(v, flux.transformer.state_dict()[k]) for k, v in weights.items())
    assert editor.edit(request).edited.tobytes() == results[0].edited.tobytes()  # seeded per request
    other = editor.edit(EditRequest(random_image(), PROMPTS[0], PROMPTS[1], seed=4))
    assert other.edited.tobytes() != results[0].edited.tobytes()


def test_flux_schnell_runs_unguided(flux):
    schnell = flux.derive(transformer=FluxTransformer2DModel.from_config(flux.transformer.config,
                                                                         guidance_embeds=False).eval())
    editor = build_editor({"name": "rf_inversion", "num_steps": 3}, schnell)
    calls = calls_of(schnell, lambda: editor.edit(EditRequest(random_image(), PROMPTS[0], PROMPTS[1])))
    assert len(calls) == 6 and all(call.get("guidance") is None for call in calls)


def test_on_sd3_inversion_is_one_row_and_sampling_two_row_cfg(sd3):
    editor = build_editor({"name": "rf_inversion", "num_steps": 4, "inversion_guidance_scale": 1.0,
                           "guidance_scale": 7.0}, sd3)  # conf/editor/rf_inversion_sd3.yaml
    results = []
    calls = calls_of(sd3, lambda: results.append(editor.edit(EditRequest(random_image(), *PROMPTS))))
    assert results[0].nfe == 2 * 4
    assert [call["hidden_states"].shape[0] for call in calls] == [1] * 4 + [2] * 4


def test_the_inversion_task_samples_back_with_the_source_prompt(sd3):
    editor = build_editor({"name": "rf_inversion", "num_steps": 4}, sd3)
    request = EditRequest(random_image(), *PROMPTS, seed=2)
    result = editor.run("inversion", request)
    assert result.reconstruction is result.edited and result.nfe == 8
    same = editor.edit(EditRequest(random_image(), PROMPTS[0], PROMPTS[0], seed=2))
    assert same.edited.tobytes() == result.edited.tobytes()


def test_an_sd_family_model_is_refused_naming_the_editors_that_fit(tiny_components):
    with pytest.raises(EditorConfigError, match="runs on the sd3, flux model families, not on sd; editors for sd "
                                                "models: .*ddim") as refused:
        build_editor({"name": "rf_inversion"}, tiny_components)
    assert "rf_inversion" not in str(refused.value).split("editors for sd models:")[1]


@pytest.mark.parametrize(("settings", "message"), [
    ({"gamma": 1.5}, r"editor.gamma=1.5 is out of range: it must be between 0 and 1"),
    ({"eta": -0.1}, r"editor.eta=-0.1 is out of range"),
    ({"eta_start": 0.5, "eta_stop": 0.25}, r"editor.eta_start=0.5 is after editor.eta_stop=0.25"),
    ({"eta_stop": 1.25}, r"editor.eta_stop=1.25 is out of range: it must be between 0 and 1"),
    ({"inversion_guidance_scale": -1.0}, r"editor.inversion_guidance_scale=-1.0 is out of range"),
    ({"eta_decay_power": -1.0}, r"editor.eta_decay_power=-1.0 is out of range: it must be at least 0"),
    ({"grid": "uniform"}, r"editor.grid='uniform' must be one of diffusers_community, consistent"),
])
def test_bad_settings_name_the_key(flux, settings, message):
    with pytest.raises(EditorConfigError, match=message):
        build_editor({"name": "rf_inversion", **settings}, flux)


@pytest.mark.parametrize(("editor", "model", "task"), [("rf_inversion", "tiny_flux", "edit"),
                                                       ("rf_inversion_sd3", "tiny_sd3", "inversion")])
def test_run_py_runs_it(tmp_path, own_cache, call_main, editor, model, task):
    out = tmp_path / "run"
    finished = call_main("run", "~experiment", f"editor={editor}", f"model={model}", f"task={task}",
                         "editor.num_steps=3", "dataset.limit=1", "logger=none", "warmup=false",
                         f"hydra.run.dir={out}")
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert results["error"].tolist() == [""] and results["nfe"].tolist() == [6]
    assert (results["editor"].iloc[0], results["model"].iloc[0]) == ("rf_inversion", model)
