"""Negative-Prompt Inversion + P2P on the tiny model."""


import torch
from conftest import BLEND, PROMPTS, random_image

from editlab.editors.base import EditRequest
from editlab.editors.ddim_p2p import DDIMP2PEditor
from editlab.editors.npi import NegativePromptInversionEditor
from editlab.editors.p2p import make_controller


def test_source_embedding_replaces_null_and_no_optimisation(tiny_components, monkeypatch):
    c = tiny_components
    editor = NegativePromptInversionEditor(c, num_steps=5)
    text, uncond = c.encode_prompts(PROMPTS[:1]), c.encode_prompts([""])
    embeddings, extras = editor.null_embeddings([], text, uncond)
    assert extras == {}
    assert len(embeddings) == 5 and all(torch.equal(e, text) for e in embeddings)

    def no_backward(*args, **kwargs):
        raise AssertionError("NPI must not optimise")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    result = editor.edit(EditRequest(random_image(), PROMPTS[0], PROMPTS[1], blend_words=BLEND))
    assert result.nfe == (5 - 1) + 5  # inversion (identity step skipped) + the batched edit
    assert result.nfe == DDIMP2PEditor(c, num_steps=5).edit(EditRequest(random_image(), *PROMPTS)).nfe
    assert result.extras["backward_passes"] == 0


def test_source_branch_reconstructs_better_than_ddim(tiny_components):
    """With ∅ = c_src the source row's guidance vanishes: it retraces the unguided inversion."""
    c = tiny_components
    text, uncond = c.encode_prompts(PROMPTS), c.encode_prompts([""])
    errors = {}
    for editor in (DDIMP2PEditor(c, num_steps=5), NegativePromptInversionEditor(c, num_steps=5)):
        z0 = c.encode_image(random_image())
        trajectory = editor.invert(z0, text[:1])
        controller = make_controller(PROMPTS, c.tokenizer, 5, c.latent_size, c.blend_resolution, BLEND,
                                     editor.p2p)
        latents = editor.denoise(trajectory[-1], text, editor.null_embeddings(trajectory, text[:1], uncond)[0],
                                 controller)
        errors[editor.name] = (latents[0] - z0[0]).pow(2).mean().item()
    assert errors["npi"] < errors["ddim_p2p"]
