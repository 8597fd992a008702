"""RF-Solver-Edit and FireFlow (editor rf_solver) on tiny FLUX and SD3, CPU: calls per solver, the plain pass with
no injection against `solve` by hand, the keys of the shared attention values, the shared model left as found (after
an error too), the second-order round trip, FLUX's grid against the originals' formula, config errors, run.py."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from PIL import Image

from editlab.diffusion.solver import euler_step, midpoint_step, reusing_midpoints, solve
from editlab.editors.base import EditorConfigError, EditRequest, build_editor
from editlab.models.loading import load_components

FP32, NO_OFFLOAD = {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}
SOURCE, TARGET = "a red square", "a blue circle"
FLUX_V = "single_transformer_blocks.0.attn.to_v"  # tiny FLUX's one single-stream block
NFE = {"euler": lambda n: 2 * n, "midpoint": lambda n: 4 * n, "fireflow": lambda n: 2 * (n + 1)}
STAGES = {"euler": ["start"], "midpoint": ["start", "midpoint"], "fireflow": ["midpoint"]}  # FireFlow reuses starts


def load(arch: str):
    return load_components({**TINY, "name": f"tiny_{arch}", "arch": arch}, FP32, NO_OFFLOAD, "cpu")


@pytest.fixture(scope="module")
def flux():
    return load("flux")


@pytest.fixture(scope="module")
def sd3():
    return load("sd3")


def square() -> Image.Image:
    pixels = np.full((64, 64, 3), 30, dtype=np.uint8)
    pixels[16:48, 16:48] = (200, 40, 40)
    return Image.fromarray(pixels)


def editor(components, **params):
    return build_editor({"name": "rf_solver", "inject_blocks": [0, 0], **params}, components)


def inputs(components):
    text = components.conditioning([SOURCE, TARGET])
    return components.encode_image(square()), text[:1], text[1:]


@pytest.mark.parametrize("solver", NFE)
def test_calls_per_edit_are_the_solvers_formula(flux, sd3, solver):
    for components in (flux, sd3):
        result = editor(components, num_steps=3, solver=solver, inject=1).edit(EditRequest(square(), SOURCE, TARGET))
        assert result.nfe == NFE[solver](3), components.name  # SD3's CFG rows: one call


@pytest.mark.parametrize("solver", NFE)
def test_without_injection_it_is_plain_inversion_then_regeneration(flux, solver):
    """inject = 0: the source prompt at guidance 1 from sigma 0 to 1, the target at guidance_scale back, both on the
    family's grid, written out with `solve`."""
    x, source, target = inputs(flux)
    plain = editor(flux, num_steps=3, solver=solver, inject=0, guidance_scale=3.0)
    got, shared = plain.edit_latents(x, source, target)
    guidance, schedule = flux.guidance(), flux.schedule

    def run(start, pairs, cond, scale):
        def velocity(i, y, sigma):
            return guidance(y, sigma, cond, scale)

        model_fn = reusing_midpoints(velocity) if solver == "fireflow" else velocity
        step = euler_step if solver == "euler" else midpoint_step
        return solve(start, pairs, model_fn, schedule, step=step, predicts="flow")[-1]

    noise = run(x, schedule.pairs(3, inverse=True), source, 1.0)
    assert torch.equal(got, run(noise, schedule.pairs(3), target, 3.0))
    assert not shared.values and not shared.injected


@pytest.mark.parametrize("solver", NFE)
def test_the_values_injected_are_the_values_recorded(flux, solver):
    """Editing step k takes what inversion step N - 1 - k recorded, stage for stage; FireFlow's first call of a step
    is the previous step's midpoint, so only its midpoint evaluations record and inject."""
    x, source, target = inputs(flux)
    _, shared = editor(flux, num_steps=4, solver=solver, inject=2).edit_latents(x, source, target)
    assert set(shared.values) == shared.injected == {(k, stage, FLUX_V) for k in range(2) for stage in STAGES[solver]}
    assert all(v.device.type == "cpu" and v.shape == (1, 512 + 64, 32)  # [text ; image] tokens
               for v in shared.values.values())


def test_editing_step_k_takes_what_inversion_step_n_minus_1_minus_k_computed(flux):
    """RF-Solver's keys (the step's noisier end, the stage): inversion step i = N - 1 - k runs from sigma_{k+1} to
    sigma_k, and its first-order and midpoint V go to editing step k's first-order and midpoint evaluations."""
    x, source, target = inputs(flux)
    values = []  # every evaluation's V, inversion's first: steps 0 .. N - 1, start then midpoint
    hook = flux.denoiser.single_transformer_blocks[0].attn.to_v.register_forward_hook(
        lambda module, args, out: values.append(out.clone()))
    try:
        _, shared = editor(flux, num_steps=4, inject=2).edit_latents(x, source, target)
    finally:
        hook.remove()
    for k in range(2):
        for stage, call in (("start", 0), ("midpoint", 1)):
            assert torch.equal(shared.values[k, stage, FLUX_V], values[2 * (4 - 1 - k) + call])


def test_on_sd3_the_joint_attentions_image_and_text_values_are_shared(sd3):
    """editlab's extension: V of the image tokens (to_v) and of the text tokens (add_v_proj) of the chosen joint
    blocks; the unguided inversion's one row replaces both CFG rows."""
    x, source, target = inputs(sd3)
    sharing = editor(sd3, num_steps=3, solver="euler", inject=1, inject_blocks=[0, 1])
    _, shared = sharing.edit_latents(x, source, target)
    names = {f"transformer_blocks.{k}.attn.{p}" for k in (0, 1) for p in ("to_v", "add_v_proj")}
    assert set(shared.values) == shared.injected == {(0, "start", name) for name in names}
    assert {v.shape[:2] for v in shared.values.values()} == {(1, 64), (1, 77 + 256)}


def test_fireflow_sharing_every_step_records_one_start_it_never_injects(flux):
    """As FireFlow's code: inversion step 0 calls at its start (nothing to reuse yet) and records it for editing step
    N - 1, whose start is reused; editing step 0 calls at its start, which inversion reused: skipped."""
    x, source, target = inputs(flux)
    _, shared = editor(flux, num_steps=3, solver="fireflow", inject=3).edit_latents(x, source, target)
    assert set(shared.values) - shared.injected == {(2, "start", FLUX_V)}
    assert shared.injected == {(k, "midpoint", FLUX_V) for k in range(3)}


def model_state(components) -> dict:
    modules = dict(components.denoiser.named_modules())
    return {"modules": modules,
            "hooks": {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in modules.items()},
            "processors": dict(components.denoiser.attn_processors),
            "weights": {k: v.clone() for k, v in components.denoiser.state_dict().items()}}


def assert_as_before(before: dict, components) -> None:
    now = model_state(components)
    assert now["modules"] == before["modules"] and now["hooks"] == before["hooks"]
    assert now["processors"] == before["processors"]  # the same processor objects
    assert all(torch.equal(before["weights"][k], v) for k, v in now["weights"].items())


def test_injection_changes_the_edit_and_leaves_the_model_as_found_even_after_an_error(flux):
    request = EditRequest(square(), SOURCE, TARGET)
    plain = editor(flux, num_steps=3, inject=0).edit(request)
    before = model_state(flux)
    injecting = editor(flux, num_steps=3, inject=2)
    injected = injecting.edit(request)
    assert injected.extras["values_injected"] == 4  # 2 steps x 2 stages x 1 block
    assert injected.edited.tobytes() != plain.edited.tobytes()
    assert_as_before(before, flux)

    calls, guidance = [], injecting.guidance

    def failing(*args):  # the regeneration's second call, with the hooks in place
        calls.append(1)
        if len(calls) == 2 * 3 + 2:
            assert flux.denoiser.single_transformer_blocks[0].attn.to_v._forward_hooks  # injecting now
            raise RuntimeError("out of memory")
        return guidance(*args)

    injecting.guidance = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        injecting.edit(request)
    assert_as_before(before, flux)
    injecting.close()
    assert_as_before(before, flux)


def test_values_that_never_arrive_stop_the_edit(flux):
    """A projection the attention processors do not call (e.g. fused QKV projections) would make injection a silent
    no-op: the edit stops after the inversion instead."""
    x, source, target = inputs(flux)
    sharing = editor(flux, num_steps=2, inject=1)
    sharing.projections = {"unused.to_v": torch.nn.Linear(1, 1)}
    with pytest.raises(RuntimeError, match="recorded no attention values in unused.to_v"):
        sharing.edit_latents(x, source, target)


def test_second_order_solvers_reconstruct_far_better_than_euler(flux):
    """The inversion task (the source prompt both ways, unguided, no injection) on tiny FLUX in fp32: the midpoint
    rule and FireFlow return the source latent an order of magnitude closer than Euler at the same steps."""
    x, source, _ = inputs(flux)
    errors = {}
    for solver in NFE:
        reconstructing = editor(flux, num_steps=6, solver=solver, inject=0, guidance_scale=1.0)
        z, _ = reconstructing.edit_latents(x, source, source)
        errors[solver] = float((z - x).pow(2).mean())
    assert max(errors["midpoint"], errors["fireflow"]) < errors["euler"] / 10, errors
    result = reconstructing.run("inversion", EditRequest(square(), SOURCE, TARGET))
    assert result.reconstruction is result.edited and result.nfe == NFE["fireflow"](6)


def test_flux_grid_is_the_originals(flux):
    """RF-Solver's and FireFlow's get_schedule: time_shift(mu, 1, linspace(1, 0, N + 1)), mu on the line through
    (256, 0.5) and (4096, 1.15) at the packed token count; the same as diffusers' FLUX grid that the editor walks."""
    for tokens in (64, 1024, 4096):  # tiny FLUX, 512², 1024²
        mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
        originals = [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in np.linspace(1, 0, 16)]
        grid = [t for t, _ in flux.schedule.pairs(15, seq_len=tokens)] + [0.0]
        np.testing.assert_allclose(grid, originals, rtol=1e-6, atol=1e-7)
    assert flux.schedule.pairs(15, inverse=True) == [(s, t) for t, s in reversed(flux.schedule.pairs(15))]


def test_bad_settings_and_an_sd_model_are_refused_at_start(flux, sd3, tiny_components):
    with pytest.raises(EditorConfigError, match="editor.solver='rk4' must be one of euler, midpoint, fireflow"):
        editor(flux, solver="rk4")
    with pytest.raises(EditorConfigError, match="editor.inject=16 must be between 0 and editor.num_steps=15"):
        editor(flux, inject=16)
    with pytest.raises(EditorConfigError, match=r"inject_blocks=\[20, 37\] .* tiny_flux has 1 single_transformer"):
        editor(flux, inject_blocks=[20, 37])
    with pytest.raises(EditorConfigError, match=r"tiny_sd3 has 2 transformer_blocks; or set editor.inject=0"):
        editor(sd3, inject_blocks=[1, 2])
    editor(flux, inject=0, inject_blocks=[20, 37])  # no injection: the blocks are not read
    with pytest.raises(EditorConfigError, match="runs on the flux, sd3 model families, not on sd; editors for sd "
                                                "models: .*ddim"):
        build_editor({"name": "rf_solver"}, tiny_components)


@pytest.mark.parametrize(("model", "config", "blocks", "nfe"), [
    ("tiny_flux", "rf_solver", "[0,0]", 4 * 2), ("tiny_sd3", "fireflow", "[0,1]", 2 * (2 + 1))])
def test_run_py_edits_with_each_config(call_main, own_cache, tmp_path, model, config, blocks, nfe):
    out = tmp_path / "run"
    done = call_main("run", "~experiment", f"model={model}", f"editor={config}", "editor.num_steps=2",
                     f"editor.inject_blocks={blocks}", "dataset.limit=1", "logger=none", "warmup=false",
                     f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert (results["error"] == "").all() and (results["nfe"] == nfe).all()
