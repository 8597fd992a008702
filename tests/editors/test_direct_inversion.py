"""Direct Inversion (PnP Inversion) + P2P on the tiny model."""


import numpy as np
import pytest
import torch
from conftest import BLEND, PROMPTS, random_image

from editlab.editors.base import EditRequest
from editlab.editors.ddim_p2p import DDIMP2PEditor
from editlab.editors.direct_inversion import DirectInversionEditor
from editlab.editors.p2p import make_controller


@pytest.mark.parametrize("blend_words", [BLEND, None])
def test_source_branch_walks_the_inversion_trajectory(tiny_components, blend_words):
    c = tiny_components
    steps = 6
    editor = DirectInversionEditor(c, num_steps=steps)
    text, uncond = c.encode_prompts(PROMPTS), c.encode_prompts([""])
    trajectory = editor.invert(c.encode_image(random_image()), text[:1])
    uncond_steps, _ = editor.null_embeddings(trajectory, text[:1], uncond)

    def controller():
        return make_controller(PROMPTS, c.tokenizer, steps, c.latent_size, c.blend_resolution, blend_words,
                               editor.p2p)

    predictions = editor.source_predictions(trajectory, text, uncond_steps, controller())
    offsets = [z - p for z, p in zip(trajectory[-2::-1], predictions)]
    assert max(d.abs().max().item() for d in offsets) > 1e-2  # guidance does pull off the trajectory ...
    request = EditRequest(random_image(), PROMPTS[0], PROMPTS[1], blend_words=blend_words)
    correct = editor.source_correction(trajectory, text, uncond_steps, request)
    seen = []
    latents = editor.denoise(trajectory[-1], text, uncond_steps, controller(),
                             lambda i, latents: seen.append(correct(i, latents)) or seen[-1])
    for i, corrected in enumerate(seen):  # ... and the correction puts the source row back on it at every step
        torch.testing.assert_close(corrected[:1], trajectory[steps - 1 - i], rtol=0, atol=1e-6)
    torch.testing.assert_close(latents[:1], trajectory[0], rtol=0, atol=1e-6)
    assert not torch.allclose(latents[1], latents[0], atol=1e-3)  # the target branch is left free


def test_cost_is_one_extra_pass(tiny_components):
    request = EditRequest(random_image(), PROMPTS[0], PROMPTS[1], blend_words=BLEND)
    result = DirectInversionEditor(tiny_components, num_steps=5).edit(request)
    ddim = DDIMP2PEditor(tiny_components, num_steps=5).edit(request)
    assert result.nfe == ddim.nfe + 5 == 3 * 5 - 1
    assert result.extras["backward_passes"] == 0
    # the reconstruction is the decoded inversion start z*_0, unlike DDIM + P2P's guided one
    expected = tiny_components.decode_latents(tiny_components.encode_image(request.image))[0]
    assert np.abs(np.asarray(result.reconstruction, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(ddim.reconstruction), np.asarray(expected))
