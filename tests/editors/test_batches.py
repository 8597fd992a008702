"""Batches in the editor protocol: the DDIM editor's real batch against the same requests one at a time, the
default `run_batch` loop, and each request's own random generator. Tiny model, fp32, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import unet_batches
from PIL import Image

from editlab.editors.base import EditRequest, build_editor

PROMPTS = [("a red circle on gray", "a blue circle on gray"), ("a green square on gray", "a green star on gray"),
           ("a yellow disk", "a purple disk")]
# guided below t = 600 only (dynamic CFG): the batch meets guided steps ([uncond rows, cond rows]) and unguided ones
DDIM = {"name": "ddim", "num_steps": 5, "guidance_scale": 3.0, "tau": 0.6, "inversion_guidance_scale": 2.0}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in PROMPTS]


def requests(task: str, images) -> list[EditRequest]:
    if task == "generation":  # each caption from its own noise
        return [EditRequest(None, source, source, seed=seed) for seed, (source, _) in enumerate(PROMPTS)]
    return [EditRequest(image, source, target, seed=7) for image, (source, target) in zip(images, PROMPTS)]


def decoded(components, monkeypatch, fn):
    """``fn()``'s results and the latents of every VAE decode it made."""
    latents, decode = [], components.vae.decode
    monkeypatch.setattr(components.vae, "decode", lambda z, *args, **kw: latents.append(z) or decode(z, *args, **kw))
    try:
        return fn(), latents
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("task", ["edit", "inversion", "generation"])
def test_a_ddim_batch_gives_what_its_requests_give_one_at_a_time(tiny_components, images, monkeypatch, task):
    editor = build_editor(DDIM, tiny_components)
    batch = requests(task, images)
    together, batch_latents = decoded(tiny_components, monkeypatch, lambda: editor.run_batch(task, batch))
    alone, alone_latents = decoded(tiny_components, monkeypatch, lambda: [editor.run(task, r) for r in batch])
    assert len(batch_latents) == 1 and len(alone_latents) == len(batch)  # one decode of the whole batch
    alone_latents = torch.cat(alone_latents)  # the tiny model's latents reach ~100: float rounding is relative to that
    torch.testing.assert_close(batch_latents[0], alone_latents, rtol=0, atol=1e-4 * alone_latents.abs().max().item())
    for one, single in zip(together, alone):
        difference = np.abs(np.asarray(one.edited, dtype=int) - np.asarray(single.edited, dtype=int))
        assert difference.max() <= 1  # float rounding of batch 3 against batch 1: at most one grey level
        assert (one.reconstruction is one.edited) == (task == "inversion")
        # the batch's calls and seconds, shared: each item costs a third of what it costs alone
        assert (one.batch_size, single.batch_size) == (3, 1) and one.nfe * 3 == single.nfe
        assert together[0].seconds == one.seconds > 0


def test_a_ddim_batch_is_one_unet_call_per_step(tiny_components, images):
    editor = build_editor(DDIM, tiny_components)
    batches = unet_batches(tiny_components.unet, lambda: editor.run_batch("edit", requests("edit", images)))
    alone = unet_batches(tiny_components.unet, lambda: editor.edit(requests("edit", images)[0]))
    assert batches == [3 * b for b in alone]  # CFG's [uncond, cond] of one item is [3 uncond, 3 cond] rows here


def test_images_of_different_sizes_go_one_at_a_time(tiny_components, images):
    editor = build_editor(DDIM, tiny_components)
    small = EditRequest(images[0].resize((32, 32)), *PROMPTS[0])
    results = editor.run_batch("edit", [requests("edit", images)[1], small])
    assert [r.batch_size for r in results] == [1, 1] and results[1].edited.size == (32, 32)


def test_the_default_run_batch_runs_each_request_alone(tiny_components, images):
    editor = build_editor({"name": "npi", "num_steps": 3}, tiny_components)
    batch = requests("edit", images)[:2]
    results = editor.run_batch("edit", batch)
    alone = [editor.edit(r) for r in batch]
    assert [r.batch_size for r in results] == [1, 1] and [r.nfe for r in results] == [r.nfe for r in alone]
    assert all(np.array_equal(np.asarray(a.edited), np.asarray(b.edited)) for a, b in zip(results, alone))
    with pytest.raises(ValueError, match="does not do task=generation"):
        editor.run_batch("generation", batch)


def test_a_request_draws_from_its_own_generator_and_leaves_the_global_one_alone(tiny_components):
    torch.manual_seed(3)
    expected = torch.randn(2, 4)
    assert torch.equal(torch.randn(2, 4, generator=EditRequest(None, "", "", seed=3).generator()), expected)
    editor = build_editor(DDIM, tiny_components)
    state = torch.get_rng_state()
    editor.run_batch("generation", requests("generation", None))
    assert torch.equal(torch.get_rng_state(), state)  # no global seeding: nothing reseeds or draws from it
