"""The one guidance object: its three kinds, two units, the rows it builds and the calls it costs."""

import pytest
import torch

from editlab.icd.teacher import add_guidance_embedding
from editlab.models.builders import build_tiny
from editlab.models.conditioning import Conditioning
from editlab.models.guidance import Guidance, combine, guidance_embedding, unet_guidance


class Recorder:
    """A fake prediction, x + the mean of each row's text, that records each call's conditioning and inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, **inputs):
        self.calls.append((x.shape[0], cond.text.clone(), inputs))
        return x + cond.text.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_combine_in_both_units():
    u, c = torch.zeros(3), torch.ones(3)
    assert torch.equal(combine(u, c, 1.0), c) and torch.equal(combine(u, c, 7.5), 7.5 * c)
    assert torch.equal(combine(u, c, 0.0, "code"), c) and torch.equal(combine(u, c, 6.5, "code"), 7.5 * c)


def test_cfg_runs_one_call_of_uncond_and_cond_rows_only_when_guided():
    predict = Recorder()
    uncond, cond = Conditioning(torch.zeros(1, 4, 2)), Conditioning(torch.ones(2, 4, 2))
    guidance = Guidance(predict, uncond=uncond)
    x = torch.zeros(2, 1, 2, 2)
    assert torch.equal(guidance(x, 5, cond, 1.0), torch.ones_like(x))  # unguided: the conditional rows alone
    assert predict.calls[-1][0] == 2
    out = guidance(x, 5, cond, 3.0)
    rows, text, _ = predict.calls[-1]
    assert rows == 4 and torch.equal(text[:2], torch.zeros(2, 4, 2)) and torch.equal(text[2:], cond.text)
    assert torch.equal(out, torch.full_like(x, 3.0))  # u + 3 (c - u) with u = 0, c = 1
    own = Conditioning(torch.full((1, 4, 2), 0.5))  # a call's own unconditional branch (NTI's per-step one)
    assert torch.equal(guidance(x, 5, cond, 3.0, own), torch.full_like(x, 0.5 + 3 * 0.5))
    assert len(predict.calls) == 3


def test_per_row_code_scales_and_a_missing_uncond():
    predict = Recorder()
    guidance = Guidance(predict, units="code", uncond=Conditioning(torch.zeros(1, 4, 2)))
    x, cond = torch.zeros(2, 1, 2, 2), Conditioning(torch.ones(2, 4, 2))
    assert not guidance.needs_uncond(torch.zeros(2)) and guidance.needs_uncond(torch.tensor([0.0, 2.0]))
    out = guidance(x, torch.tensor([10, 20]), cond, torch.tensor([0.0, 2.0]))
    assert torch.equal(out[0], torch.ones(1, 2, 2)) and torch.equal(out[1], torch.full((1, 2, 2), 3.0))
    with pytest.raises(ValueError, match="unconditional branch"):
        Guidance(predict)(x, 5, cond, 2.0)
    assert Guidance(predict, kind="none")(x, 5, cond, 9.0).equal(torch.ones_like(x))  # kind none: conditional


def test_embedded_passes_the_scale_per_row_in_one_call():
    predict = Recorder()
    guidance = Guidance(predict, kind="embedded", embed=lambda w: {"scale": w})
    guidance(torch.zeros(3, 1, 2, 2), 5, torch.ones(3, 4, 2), 2.5)
    rows, _, inputs = predict.calls[-1]
    assert len(predict.calls) == 1 and rows == 3 and torch.equal(inputs["scale"], torch.full((3,), 2.5))
    with pytest.raises(ValueError, match="scale input"):
        Guidance(predict, kind="embedded")
    with pytest.raises(ValueError, match="unknown guidance kind"):
        Guidance(predict, kind="two-pass")


def test_unet_guidance_picks_the_kind_from_the_unet():
    plain = build_tiny(seed=0)[0]
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([259, 999]), torch.randn(2, 77, 32)
    with pytest.raises(ValueError, match="needs the empty-prompt"):
        unet_guidance(plain)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        unet_guidance(plain, "embedded")
    embedded = add_guidance_embedding(plain)
    guided = unet_guidance(embedded)
    assert guided.kind == "embedded" and guided.units == "code"
    with torch.no_grad():
        expected = embedded(x, t, encoder_hidden_states=text, timestep_cond=guidance_embedding(torch.full((2,), 4.0)))
        assert torch.equal(guided(x, t, text, 4.0), expected.sample)
