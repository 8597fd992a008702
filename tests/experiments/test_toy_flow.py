"""The toy world's flow-matching teacher (`model=toy_flow`, weights/toy/flow): it loads as an SD3 checkpoint with one
CLIP encoder and no T5, its ODE inverts and regenerates a scene as well as the VAE allows (the midpoint rule better
than Euler), FlowEdit runs on it natively, and the toy model sends the editors that need a flow model to it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FP32, NO_OFFLOAD, compose_config
from omegaconf import OmegaConf
from PIL import Image

from editlab.diffusion.solver import euler_step, midpoint_step
from editlab.editors.base import EditRequest, build_editor
from editlab.evaluation.metrics import ClipScorer, clip_score, psnr_unedit_part
from editlab.experiments.harness import model_for
from editlab.experiments.toy_build.judge import psnr
from editlab.experiments.toy_build.quality import flow_sample
from editlab.models.loading import load_components
from editlab.toyworld.scenes import COLOURS, Obj, Scene

REPO = Path(__file__).resolve().parents[2]
TOY_FLOW = OmegaConf.to_container(compose_config("experiment=toy", "model=toy_flow").model, resolve=True)


@pytest.fixture(scope="module")
def flow():
    return load_components(TOY_FLOW, FP32, NO_OFFLOAD, "cpu")


def test_it_loads_as_an_sd3_model_with_one_clip_and_no_t5(flow):
    assert flow.family.name == "sd3" and flow.prediction_type == "flow"
    assert flow.text_encoder_2 is None and flow.text_encoder_3 is None and flow.vae.config.latent_channels == 4
    cond = flow.conditioning(["a red circle on a gray background", ""])
    assert cond.text.shape == (2, 24, 64) and cond.added["pooled_projections"].shape == (2, 64)
    assert flow.transformer.dtype == torch.float32  # stored in fp16, cast on load
    assert sum(p.numel() for p in flow.transformer.parameters()) < 4e6


def test_inversion_and_regeneration_reach_the_vae_and_the_midpoint_rule_beats_euler(flow):
    """Unguided 50-step round trips of a held-out-style scene with its own caption: Euler within 1.5 dB of the VAE's
    own PSNR, the midpoint rule (RF-Solver's step) closer still."""
    scene = Scene((Obj("circle", "red", size="large"),), "gray")
    image = scene.render(32)
    z0, cond = flow.encode_image(Image.fromarray(image)), flow.conditioning([scene.caption()])
    vae = psnr(np.asarray(flow.decode_latents(z0)[0]), image)
    trips = {}
    for name, step in (("euler", euler_step), ("midpoint", midpoint_step)):
        noise = flow_sample(flow, z0, cond, 1.0, 50, inverse=True, step=step)
        trips[name] = psnr(np.asarray(flow.decode_latents(flow_sample(flow, noise, cond, 1.0, 50, step=step))[0]),
                           image)
    assert trips["euler"] > vae - 1.5 and trips["midpoint"] > trips["euler"], (vae, trips)  # 34.880, 34.883, 34.880


def test_flowedit_runs_natively_and_makes_a_colour_edit():
    """A blue triangle made yellow by FlowEdit on the flow teacher at the toy tour's settings: the colour inside the
    triangle moves to yellow, the toy CLIP prefers the target caption more than on the source, and the background
    stays."""
    cfg = compose_config("experiment=toy_tour", "model=toy_flow", "editor=flowedit")
    editor = build_editor(OmegaConf.to_container(cfg.editor, resolve=True),
                          load_components(TOY_FLOW, FP32, NO_OFFLOAD, "cpu"))
    obj, new = Obj("triangle", "blue", size="large"), "yellow"
    source, target = Scene((obj,), "white"), Scene((obj._replace(colour=new),), "white")
    image = source.render(32)
    edited = np.asarray(editor.edit(EditRequest(Image.fromarray(image), source.caption(), target.caption(),
                                                seed=0)).edited)
    inside = source.object_mask(0, 32)
    distance = [float(np.linalg.norm(im[inside].mean(0) - np.asarray(COLOURS[new]))) for im in (image, edited)]
    assert distance[1] < 0.5 * distance[0], distance  # measured ratio 0.38
    judge = ClipScorer.from_pretrained(str(REPO / "editlab" / "weights" / "toy" / "clip"))

    def preference(im):
        return clip_score(judge, im, target.caption()) - clip_score(judge, im, source.caption())

    assert preference(edited) > preference(image)  # measured +43.0 against -29.1
    assert psnr_unedit_part(image, edited, inside.astype(float)) > 18  # measured 21.2 dB (VAE ceiling ~35)


def test_the_toy_model_sends_the_editors_that_need_a_flow_model_to_it():
    toy = OmegaConf.to_container(compose_config("experiment=toy").model, resolve=True)
    assert model_for(toy, "flowedit")["name"] == "toy"  # FlowEdit's epsilon form runs on the toy UNet
    assert model_for(toy, "instruct_pix2pix")["unet_path"].endswith("ip2p_unet")
    for editor in ("rf_inversion", "rf_solver"):
        assert model_for(toy, editor) == TOY_FLOW
    sd3 = model_for({**toy, "variants": {"flowedit": "sd3"}}, "flowedit")  # a config with Hydra defaults
    assert sd3["name"] == "sd3" and "defaults" not in sd3


@pytest.mark.parametrize("editor", ["rf_inversion", "rf_inversion_sd3", "rf_solver", "fireflow"])
def test_each_flow_editor_runs_on_the_toy_world_at_its_own_settings(editor):
    """`python run.py experiment=toy editor=<flow editor>`: the toy model sends it to the flow teacher, whose own
    block range replaces FLUX's for the V injection (conf/editor_weights/toy)."""
    from editlab.experiments.harness import load_editor

    edit = load_editor(compose_config("experiment=toy", f"editor={editor}"), "cpu")
    assert edit.components.name == "toy_flow"
    scene = Scene((Obj("circle", "red", size="large"),), "gray")
    result = edit.edit(EditRequest(Image.fromarray(scene.render(32)), scene.caption(),
                                   scene.caption().replace("red", "blue"), seed=0))
    assert result.edited.size == (32, 32) and result.nfe > 0
