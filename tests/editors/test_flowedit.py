"""FlowEdit on an epsilon model (the tiny SD UNet): identity, the authors' epsilon form, cost and seeding."""

import numpy as np
import pytest
import torch
from PIL import Image

from editlab.editors.base import EditorConfigError, EditRequest, build_editor
from editlab.models.guidance import combine

PROMPTS = ("a red circle on gray", "a blue circle on gray")


def random_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_a_same_prompt_same_guidance_edit_is_exactly_the_source(tiny_components):
    c = tiny_components
    editor = build_editor({"name": "flowedit", "num_steps": 10, "n_max": 7, "source_guidance_scale": 5.0,
                           "target_guidance_scale": 5.0}, c)
    result = editor.edit(EditRequest(random_image(), PROMPTS[0], PROMPTS[0], seed=3))
    assert result.nfe == 7
    (source,) = c.decode_latents(c.encode_image(random_image()))
    assert np.array_equal(np.asarray(result.edited), np.asarray(source))


def test_it_is_the_authors_epsilon_form_on_an_epsilon_model(tiny_components):
    """fallenshock/FlowEdit#3: D = [(eps_tar - eps_src) - (Z - X)] / (1 - r), r = sigma / (alpha + sigma), with the
    UNet at x = (alpha + sigma) z: the editor's velocity difference, in plain tensor math."""
    c = tiny_components
    editor = build_editor({"name": "flowedit", "num_steps": 10, "n_max": 5, "source_guidance_scale": 2.0,
                           "target_guidance_scale": 6.0}, c)
    text, uncond = c.conditioning(PROMPTS[:2]), c.unconditional()
    x = c.encode_image(random_image())
    got = editor.edit_latents(x, text, uncond, torch.Generator().manual_seed(7))
    generator, z = torch.Generator().manual_seed(7), x.clone()
    flow = [float(c.schedule.flow_time(t)) for t, _ in c.schedule.pairs(10)[5:]] + [0.0]
    with torch.no_grad():
        for (t, _), r, r_next in zip(c.schedule.pairs(10)[5:], flow, flow[1:]):
            alpha, sigma = (v.float() for v in c.schedule.scales(t))
            z_src = (1 - r) * x + r * torch.randn(x.shape, generator=generator)
            z_tar = z_src + (z - x)
            eps = []
            for row, scale in ((0, 2.0), (1, 6.0)):
                point = (alpha + sigma) * (z_src if row == 0 else z_tar)
                eps.append(combine(c.predict(point, t, uncond), c.predict(point, t, text[row:row + 1]), scale))
            z = z + (r_next - r) * ((eps[1] - eps[0]) - (z - x)) / (1 - r)
    torch.testing.assert_close(got, z, rtol=1e-4, atol=1e-4)


def test_cost_seeding_and_the_sdedit_tail(tiny_components):
    c = tiny_components
    editor = build_editor({"name": "flowedit", "num_steps": 8, "n_max": 6, "n_min": 2, "n_avg": 2}, c)
    request = EditRequest(random_image(), PROMPTS[0], PROMPTS[1], seed=5)
    first, again = editor.edit(request), editor.edit(request)
    assert first.nfe == 2 * (6 - 2) + 2  # n_avg (n_max - n_min) + n_min
    assert first.edited.tobytes() == again.edited.tobytes()  # seeded per request, not per run
    other = editor.edit(EditRequest(random_image(), PROMPTS[0], PROMPTS[1], seed=6))
    assert other.edited.tobytes() != first.edited.tobytes()
    with pytest.raises(EditorConfigError, match="n_min <= n_max"):
        build_editor({"name": "flowedit", "num_steps": 8, "n_max": 9}, c)
