"""The inversion and generation tasks of the editors: the plain DDIM editor, the reconstructions of the P2P family
and iCD, call counts, guidance on either side and the refusal of a task an editor does not do. Tiny model, CPU."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import unet_batches
from PIL import Image

from editlab.editors.base import EditRequest, build_editor

SOURCE, TARGET = "a red circle on gray", "a blue circle on gray"


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def request(image, seed: int = 0) -> EditRequest:
    return EditRequest(image, SOURCE, TARGET, seed=seed)


def test_ddim_reconstruction_costs_n_minus_1_plus_n_calls_and_guides_where_told(tiny_components, image):
    plain = build_editor({"name": "ddim", "num_steps": 10, "guidance_scale": 1.0}, tiny_components)
    result = plain.run("inversion", request(image))
    assert result.nfe == 9 + 10 and result.reconstruction is result.edited
    assert unet_batches(tiny_components.unet, lambda: plain.run("inversion", request(image))) == [1] * 19
    # decoder guided below t = 500 only (dynamic CFG), encoder guided throughout: [uncond, cond] rows there
    guided = build_editor({"name": "ddim", "num_steps": 10, "guidance_scale": 5.0, "tau": 0.5,
                           "inversion_guidance_scale": 3.0}, tiny_components)
    batches = unet_batches(tiny_components.unet, lambda: guided.run("inversion", request(image)))
    decoder = [2 if t <= 500 else 1 for t, _ in guided.pairs]
    assert batches == [2] * 9 + decoder


def test_unguided_ddim_reconstructs_closer_than_guided_decoding(tiny_components, image):
    """An unguided encode | decode retraces the inversion; strong decoder guidance leaves it (iCD Table 1's point)."""
    source = np.asarray(image, dtype=np.float64)

    def error(**params) -> float:
        editor = build_editor({"name": "ddim", "num_steps": 20, **params}, tiny_components)
        return float(np.mean((np.asarray(editor.run("inversion", request(image)).edited) - source) ** 2))

    assert error(guidance_scale=1.0) < error(guidance_scale=8.0)


def test_ddim_generation_is_seeded_and_edit_uses_the_target_prompt(tiny_components, image):
    editor = build_editor({"name": "ddim", "num_steps": 5}, tiny_components)
    one, again, other = (np.asarray(editor.run("generation", EditRequest(None, SOURCE, SOURCE, seed=s)).edited)
                         for s in (1, 1, 2))
    assert one.shape == (64, 64, 3) and np.array_equal(one, again) and not np.array_equal(one, other)
    edited = np.asarray(editor.edit(request(image)).edited)
    reconstructed = np.asarray(editor.run("inversion", request(image)).edited)
    assert not np.array_equal(edited, reconstructed)


@pytest.mark.parametrize("name", ["ddim_p2p", "npi"])
def test_p2p_family_reconstruction_is_the_edits_source_branch(tiny_components, image, name):
    """P2P never touches the source row, so the inversion task's reconstruction is the edit's row 0, at 2N - 1
    calls of batch 2 (CFG) instead of batch 4."""
    editor = build_editor({"name": name, "num_steps": 6}, tiny_components)
    edit = editor.edit(request(image))
    reconstruction = editor.run("inversion", request(image))
    assert reconstruction.nfe == 2 * 6 - 1
    difference = np.abs(np.asarray(reconstruction.edited, dtype=int) - np.asarray(edit.reconstruction, dtype=int))
    assert difference.max() <= 1  # batch 2 against batch 4: float rounding, at most one grey level


def test_icd_reconstruction_matches_the_edits_unguided_source_row(tiny_components, image):
    editor = build_editor({"name": "icd", "code_guidance_scale": 0.0}, tiny_components)
    try:
        edit = editor.edit(request(image))
        reconstruction = editor.run("inversion", request(image))
        generated = editor.run("generation", EditRequest(None, SOURCE, SOURCE, seed=3))
    finally:
        editor.close()
    assert reconstruction.nfe == 8 and generated.nfe == 4
    difference = np.abs(np.asarray(reconstruction.edited, dtype=int) - np.asarray(edit.reconstruction, dtype=int))
    assert difference.max() <= 1


def test_an_editor_refuses_a_task_it_does_not_do(tiny_components, image):
    editor = build_editor({"name": "direct_inversion", "num_steps": 4}, tiny_components)
    with pytest.raises(ValueError, match="does not do task=inversion; it does: edit"):
        editor.run("inversion", request(image))
