"""Null-Text Inversion + P2P on the tiny model."""


import numpy as np
import pytest
import torch
from conftest import BLEND, PROMPTS, random_image
from PIL import Image

import editlab.editors.null_text as null_text
from editlab.editors.base import EditRequest
from editlab.editors.ddim_p2p import DDIMP2PEditor
from editlab.editors.null_text import NullTextEditor, nti_early_stop, nti_learning_rate
from editlab.editors.p2p import make_controller
from editlab.models.loading import load_components


def _request(seed: int = 0) -> EditRequest:
    return EditRequest(random_image(seed), PROMPTS[0], PROMPTS[1], blend_words=BLEND)


def _source_reconstruction(editor: DDIMP2PEditor, image: Image.Image):
    """(z*_0, the guided source-row latent at the end of the edit, the unconditional embeddings used)."""
    c = editor.components
    text, uncond = c.encode_prompts(PROMPTS), c.encode_prompts([""])
    trajectory = editor.invert(c.encode_image(image), text[:1])
    uncond_steps, extras = editor.null_embeddings(trajectory, text[:1], uncond)
    controller = make_controller(PROMPTS, c.tokenizer, editor.num_steps, c.latent_size, c.blend_resolution, BLEND,
                                 editor.p2p)
    return trajectory[0], editor.denoise(trajectory[-1], text, uncond_steps, controller)[:1], uncond_steps, extras


def test_schedules():
    assert nti_learning_rate(0) == pytest.approx(1e-2)
    assert nti_learning_rate(49) == pytest.approx(0.0051)
    assert nti_early_stop(0) == pytest.approx(1e-5)
    assert nti_early_stop(10) == pytest.approx(1e-5 + 2e-4)
    assert nti_learning_rate(7, base=0.1) == pytest.approx(0.1 * 0.93)


def test_zero_inner_steps_is_exactly_ddim_p2p(tiny_components):
    reference = DDIMP2PEditor(tiny_components, num_steps=5).edit(_request())
    result = NullTextEditor(tiny_components, num_steps=5, num_inner_steps=0).edit(_request())
    assert np.array_equal(np.asarray(result.edited), np.asarray(reference.edited))
    assert np.array_equal(np.asarray(result.reconstruction), np.asarray(reference.reconstruction))
    assert result.nfe == reference.nfe == 2 * 5 - 1
    assert result.extras["backward_passes"] == 0


def test_optimisation_improves_guided_reconstruction_and_keeps_identity_step(tiny_components):
    steps = 4
    ddim = NullTextEditor(tiny_components, num_steps=steps, num_inner_steps=0)
    nti = NullTextEditor(tiny_components, num_steps=steps)
    for seed in range(2):
        z0, ddim_rec, _, _ = _source_reconstruction(ddim, random_image(seed))
        _, nti_rec, embeddings, extras = _source_reconstruction(nti, random_image(seed))
        assert (nti_rec - z0).pow(2).mean() < 0.9 * (ddim_rec - z0).pow(2).mean()
    # the last step (t = 0) is the identity: no optimisation, the embedding carries over unchanged
    uncond = tiny_components.encode_prompts([""])
    assert len(embeddings) == steps and extras["nti_inner_steps"][-1] == 0
    assert torch.equal(embeddings[-1], embeddings[-2])
    assert all(not torch.equal(e, uncond) for e in embeddings)  # every other step moved it


def test_learning_rate_early_stop_and_cost(tiny_components, monkeypatch):
    rates = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, lr):
            rates.append(lr)
            super().__init__(params, lr=lr)

    monkeypatch.setattr(null_text, "Adam", RecordingAdam)
    steps = 5
    # an early-stop threshold every loss is under: one Adam step per non-identity step
    editor = NullTextEditor(tiny_components, num_steps=steps, num_inner_steps=10, early_stop_epsilon=1e9)
    result = editor.edit(_request())
    assert rates == pytest.approx([1e-2 * (1 - i / 100) for i in range(steps - 1)])
    assert result.extras["nti_inner_steps"] == [1] * (steps - 1) + [0]
    assert result.extras["backward_passes"] == steps - 1
    # inversion N-1, optimisation (k_i + 2) per non-identity step, edit N
    assert result.nfe == (steps - 1) + (steps - 1) * (1 + 2) + steps

    rates.clear()
    editor = NullTextEditor(tiny_components, num_steps=steps, num_inner_steps=3, early_stop_epsilon=0.0)
    result = editor.edit(_request())
    assert result.extras["nti_inner_steps"] == [3] * (steps - 1) + [0]
    assert result.nfe == (steps - 1) + (steps - 1) * (3 + 2) + steps


def test_nan_raises(tiny_components):
    c = tiny_components
    editor = NullTextEditor(c, num_steps=4, num_inner_steps=2)
    text, uncond = c.encode_prompts(PROMPTS[:1]), c.encode_prompts([""])
    trajectory = editor.invert(c.encode_image(random_image()), text)
    trajectory[-2] = torch.full_like(trajectory[-2], float("nan"))
    with pytest.raises(FloatingPointError, match="null-text optimisation"):
        editor.null_embeddings(trajectory, text, uncond)


def test_half_precision_optimises_in_an_fp32_copy_and_never_casts_the_shared_unet():
    c = load_components({"name": "tiny", "kind": "tiny", "resolution": 64},
                        {"dtype": "bfloat16", "vae_dtype": "float32"}, {"mode": "none"}, "cpu")
    before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    editor = NullTextEditor(c, num_steps=3, num_inner_steps=2)
    assert editor.unet32 is not c.unet and editor.unet32.dtype == torch.float32
    seen = []
    for unet in (c.unet, editor.unet32):
        unet.register_forward_pre_hook(lambda module, args: seen.append(module.dtype))
    result = editor.edit(_request())
    assert torch.float32 in seen and torch.bfloat16 in seen  # optimisation in fp32, inversion and edit in bf16
    assert result.nfe == len(seen)  # the copy's calls count
    assert all(torch.equal(v, before[k]) and v.dtype == torch.bfloat16 for k, v in c.unet.state_dict().items())
    assert result.extras["backward_passes"] > 0 and all(np.isfinite(result.extras["nti_final_losses"][:-1]))
