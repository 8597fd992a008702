"""The iCD editor: call counts, inversion start and determinism, P2P source-branch
invariance, adapter files, both guidance backends. Tiny model on CPU."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from editlab.diffusion.ddim import add_noise
from editlab.editors.base import EditRequest, build_editor
from editlab.icd.lora import FORWARD, REVERSE, add_icd_adapters, lora_parameters, save_adapter
from editlab.icd.teacher import add_guidance_embedding
from editlab.models.builders import build_tiny
from editlab.models.loading import load_components

TINY = {"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64}
TINY_SDXL = {"name": "tiny_sdxl", "kind": "tiny", "arch": "sdxl", "seed": 0, "resolution": 64}
FP32 = {"dtype": "float32", "vae_dtype": "float32"}
SOURCE, TARGET = "a red circle on gray", "a blue circle on gray"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny CFG-distilled teacher checkpoint and two trained-looking (random B) adapter files, released style."""
    root = tmp_path_factory.mktemp("icd")
    teacher = add_guidance_embedding(build_tiny(seed=0)[0])
    torch.save(teacher.state_dict(), root / "cfg_distill.pt")
    add_icd_adapters(teacher, rank=4)
    g = torch.Generator().manual_seed(0)
    for name in (FORWARD, REVERSE):
        for p in lora_parameters(teacher, name):
            p.data = torch.randn(p.shape, generator=g) * 0.05
        save_adapter(teacher, name, root / f"{name}.safetensors", style="released")
    return root


def make_editor(files=None, model=TINY, **params):
    components = load_components(model, FP32, {"mode": "none"}, "cpu")
    if files is not None:
        params = dict(teacher_checkpoint=str(files / "cfg_distill.pt"),
                      forward_lora=str(files / f"{FORWARD}.safetensors"),
                      reverse_lora=str(files / f"{REVERSE}.safetensors"), **params)
    return build_editor({"name": "icd", **params}, components)


@pytest.fixture(scope="module")
def editor(files):
    return make_editor(files)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_edit_makes_m_plus_m_unet_calls(editor, image):
    assert editor.eps.kind == "embedded" and editor.schedule.reverse_steps == [259, 519, 779, 999]
    result = editor.edit(EditRequest(image, SOURCE, TARGET, blend_words=("red", "blue"), seed=3))
    assert result.nfe == 8 and result.edited.size == (64, 64) and result.reconstruction is not None


def test_adapters_go_on_a_unet_of_its_own_over_the_shared_weights(image):
    components = load_components(TINY, FP32, {"mode": "none"}, "cpu")
    editor = build_editor({"name": "icd", "fuse_adapters": True}, components)
    own, shared = editor.components.unet, components.unet
    assert own is not shared and not getattr(shared, "peft_config", None)
    assert own.conv_in.weight.data_ptr() == shared.conv_in.weight.data_ptr()  # no second copy of the weights
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    result = editor.edit(EditRequest(image, SOURCE, TARGET, seed=3))
    assert result.nfe == 8  # the own UNet's calls count
    assert all(torch.equal(v, before[k]) for k, v in shared.state_dict().items())


def test_fused_adapters_give_the_same_edit(files, editor, image):
    request = EditRequest(image, SOURCE, TARGET, blend_words=("red", "blue"), seed=3)
    fused = make_editor(files, fuse_adapters=True).edit(request)
    plain = editor.edit(request)
    assert fused.nfe == 8
    for a, b in ((fused.edited, plain.edited), (fused.reconstruction, plain.reconstruction)):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1  # rounding of the merged sums


@pytest.mark.parametrize("params", [
    dict(method="prompt_switch", reverse_steps=[249, 499, 699, 999], forward_steps=[19, 249, 499, 699], tau=0.7),
    dict(reverse_steps=[339, 699, 999], forward_steps=[19, 339, 699], guidance="cfg"),
])
def test_other_recipes_count_calls(params, image, caplog):
    with caplog.at_level(logging.WARNING):
        editor = make_editor(**params)
    assert "UNTRAINED" in caplog.text  # no adapter files: said loudly
    m = len(params["reverse_steps"])
    assert editor.edit(EditRequest(image, SOURCE, TARGET, blend_words=("red", "blue"))).nfe == 2 * m


def test_inversion_start_determinism_and_exact_round_trip(editor):
    g = torch.Generator().manual_seed(1)
    x_star, noise = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    text = editor.components.conditioning([SOURCE])
    first = editor.invert(x_star, text, noise)
    assert torch.equal(first, editor.invert(x_star, text, noise))
    assert first.shape == (1, 4, 16, 16)

    abar = editor.components.schedule.alphas_cumprod
    seen = []

    def delta(x, t, text, w, added=None):  # analytic teacher of the single point x*: the loops must then be exact
        seen.append((int(t), w.tolist()))
        a = abar[t]
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    real, editor.eps = editor.eps, delta
    try:
        x_T = editor.invert(x_star, text, noise)
        assert [t for t, _ in seen] == [19, 259, 519, 779] and all(w == [0.0] for _, w in seen)
        assert torch.allclose(x_T, add_noise(x_star, noise, 999, abar), atol=1e-5)  # started at x_19, seeded
        seen.clear()
        x0 = editor.generate_latents(x_T, text)
        assert [t for t, _ in seen] == [999, 779, 519, 259]
        assert [w for _, w in seen] == [[0.0], [19.0], [19.0], [19.0]]  # tau = 0.8
        assert torch.allclose(x0, x_star, atol=1e-5)  # decoding ends at s = 0: the clean latent
    finally:
        editor.eps = real


STRONG = dict(p2p=dict(cross_replace_steps=1.0, self_replace_steps=1.0, amplify=10.0, blend_threshold=0.1,
                       mode="refine"))


@pytest.mark.parametrize("guidance,settings", [("embedded", {}), ("embedded", STRONG), ("cfg", STRONG)])
def test_p2p_source_row_is_a_plain_unguided_reconstruction(files, settings, guidance):
    editor = make_editor(files, guidance=guidance, **settings)
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(1, 4, 16, 16, generator=g)
    prompts = [SOURCE, "a big blue circle on gray"]
    text = editor.components.conditioning(prompts)
    latents = editor.decode_p2p(x_T, text, editor.controller(prompts, ("red", "blue")))
    plain_policy, editor.policy = editor.policy, dataclasses.replace(editor.policy, scale=0.0)
    try:
        plain = editor.generate_latents(x_T, text[0:1])
    finally:
        editor.policy = plain_policy
    # Only float noise of batch-size-dependent kernels separates the two, amplified by the final 1 / sqrt(abar_259)
    # on latents that untrained nets drive to |x| ~ 20.
    torch.testing.assert_close(latents[0], plain[0], rtol=1e-5, atol=5e-5)
    assert not torch.allclose(latents[1], plain[0], rtol=1e-3, atol=1e-3)


def test_p2p_rows_identical_without_edit(files):
    editor = make_editor(files, code_guidance_scale=0.0,
                         p2p=dict(cross_replace_steps=0.0, self_replace_steps=0.0, local_blend=False, amplify=1.0))
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    text = editor.components.conditioning([SOURCE, SOURCE])
    latents = editor.decode_p2p(x_T, text, editor.controller([SOURCE, SOURCE], None))
    assert torch.allclose(latents[0], latents[1], atol=1e-6)


def test_generation_gives_each_prompt_its_own_noise(editor):
    first, second = editor.generate_images([SOURCE, SOURCE], seed=0)
    assert np.asarray(first).shape == (64, 64, 3)
    assert not np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("guidance", ["embedded", "cfg"])
def test_sdxl_prompt_switch_recipe(guidance, image):
    """The iCD-XL recipe on the tiny SDXL-shaped model: two text encoders, pooled + size conditioning."""
    components = load_components(TINY_SDXL, FP32, {"mode": "none"}, "cpu")
    if guidance == "embedded":
        components = components.derive(unet=add_guidance_embedding(components.unet))
    editor = build_editor({"name": "icd", "method": "prompt_switch", "reverse_steps": [249, 499, 699, 999],
                           "forward_steps": [19, 249, 499, 699], "tau": 0.7}, components)
    assert editor.eps.kind == guidance
    prompts = editor.components.conditioning([SOURCE, TARGET])
    assert prompts.text.shape[-1] == 64 and set(prompts.added) == {"text_embeds", "time_ids"}
    result = editor.edit(EditRequest(image, SOURCE, TARGET, seed=1))
    assert result.nfe == 8 and result.edited.size == (64, 64)
    again = editor.edit(EditRequest(image, SOURCE, TARGET, seed=1))
    assert np.array_equal(np.asarray(result.edited), np.asarray(again.edited))  # seeded inversion noise
