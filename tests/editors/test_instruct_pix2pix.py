"""InstructPix2Pix on the tiny 8-channel model: the pipeline's three-way guidance against hand-written loops,
edits through the editor protocol, clear refusals, and a 2-image run.py run."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from editlab.editors.base import EditRequest, build_editor, pipeline_latents
from editlab.models.loading import load_components

ROOT = Path(__file__).resolve().parents[2]
TINY_IP2P = {"name": "tiny_ip2p", "kind": "tiny", "arch": "ip2p", "seed": 0, "resolution": 64}
FP32 = {"dtype": "float32", "vae_dtype": "float32"}
NO_OFFLOAD = {"mode": "none"}
STEPS = 4


@pytest.fixture(scope="module")
def components():
    return load_components(TINY_IP2P, FP32, NO_OFFLOAD, "cpu")


def source_image() -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 90, 200))
    image.paste((220, 200, 40), (16, 20, 44, 52))
    return image


@torch.no_grad()
def hand_written_sample(c, image_latents, instruction, text_scale, image_scale, seed):
    """The sampler written out with diffusers' Euler-ancestral scheduler, drawing noise in the pipeline's order.

    At image guidance 1 this is *two-way* CFG on [(c_T, c_I), (∅, c_I)]; otherwise the three-way formula."""
    scheduler = EulerAncestralDiscreteScheduler.from_config(c.scheduler.config, timestep_spacing="linspace")
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator("cpu").manual_seed(seed)
    x = randn_tensor((1, 4, 16, 16), generator=generator) * scheduler.init_noise_sigma
    text, empty = c.encode_prompts([instruction, ""])[:, None]  # each [1, 77, D]
    for t in scheduler.timesteps:
        z = scheduler.scale_model_input(x, t)
        if image_scale == 1:
            rows = [(text, image_latents), (empty, image_latents)]
        else:
            rows = [(text, image_latents), (empty, image_latents), (empty, torch.zeros_like(image_latents))]
        inputs = torch.cat([torch.cat([z, image], dim=1) for _, image in rows])  # [R, 8, h, w]
        eps = c.unet(inputs, t, encoder_hidden_states=torch.cat([e for e, _ in rows])).sample.chunk(len(rows))
        if image_scale == 1:
            guided = eps[1] + text_scale * (eps[0] - eps[1])
        else:
            guided = eps[2] + text_scale * (eps[0] - eps[1]) + image_scale * (eps[1] - eps[2])
        x = scheduler.step(guided, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("image_scale", [1.0, 1.5])
def test_pipeline_guidance_matches_hand_written_loop(components, image_scale):
    """At s_I = 1 the pipeline's three-way guidance is plain text CFG around the image-conditioned prediction."""
    c = components
    editor = build_editor({"name": "instruct_pix2pix", "num_steps": STEPS, "image_guidance_scale": image_scale}, c)
    image_latents = c.encode_image(source_image()) / c.vae.config.scaling_factor
    got = editor.sample(image_latents, "make it red", torch.Generator("cpu").manual_seed(7))
    expected = hand_written_sample(c, image_latents, "make it red", 7.5, image_scale, seed=7)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pipeline_latents_asks_the_pipeline_for_its_final_latents():
    """What the pipeline editors (this one, lcm_controlnet) share: the steps, guidance and noise go to the pipeline,
    which stops before its own decode."""
    calls, generator = [], torch.Generator().manual_seed(0)

    def pipe(**inputs):
        calls.append(inputs)
        return SimpleNamespace(images="latents")

    assert pipeline_latents(pipe, generator, 4, 1.5, prompt="make it red", image="image") == "latents"
    assert calls == [{"prompt": "make it red", "image": "image", "num_inference_steps": 4, "guidance_scale": 1.5,
                      "generator": generator, "output_type": "latent"}]


def test_image_guidance_matters(components):
    c = components
    image_latents = c.encode_image(source_image()) / c.vae.config.scaling_factor
    outs = [build_editor({"name": "instruct_pix2pix", "num_steps": STEPS, "image_guidance_scale": s}, c)
            .sample(image_latents, "make it red", torch.Generator("cpu").manual_seed(7)) for s in (1.0, 1.5)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_edit_through_the_editor_protocol(components):
    editor = build_editor({"name": "instruct_pix2pix", "num_steps": STEPS}, components)
    image = source_image()
    request = EditRequest(image, "a blue square", "a red square", "make it red", None, 3)
    first, second = editor.edit(request), editor.edit(request)
    assert first.edited.size == image.size == (64, 64) and first.reconstruction is None
    assert first.nfe == STEPS  # one UNet call (batch 3) per step, counted on components.unet
    assert first.edited.tobytes() == second.edited.tobytes()  # seeded from the request
    third = editor.edit(EditRequest(image, "a blue square", "a red square", "make it red", None, 4))
    assert third.edited.tobytes() != first.edited.tobytes()


def test_refusals(components, tiny_components):
    with pytest.raises(ValueError, match="input channels"):
        build_editor({"name": "instruct_pix2pix"}, tiny_components)
    with pytest.raises(ValueError, match="image_guidance_scale >= 1"):
        build_editor({"name": "instruct_pix2pix", "image_guidance_scale": 0.5}, components)
    build_editor({"name": "instruct_pix2pix", "guidance_scale": 1.0, "image_guidance_scale": 1.0}, components)
