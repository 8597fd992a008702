"""A third model family, defined in this file only: a tiny velocity-predicting denoiser on a rectified-flow schedule.
It loads through `models.loading` and an editor runs on it through the seam, with no other layer touched."""

from __future__ import annotations

from typing import Any, Mapping

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from editlab.diffusion.schedules import FlowSchedule
from editlab.editors.base import EditorConfigError, EditRequest, build_editor
from editlab.models.builders import build_tiny
from editlab.models.conditioning import Conditioning, encode_conditioning
from editlab.models.families import FAMILIES, Family, register
from editlab.models.loading import load_components

FLOW = {"name": "tiny_velocity", "kind": "tiny", "family": "velocity_test", "arch": "velocity", "seed": 0,
        "resolution": 64}
FP32, NO_OFFLOAD = {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}


class TinyVelocity(torch.nn.Module):
    """v(x, sigma, text): two convolutions, the text's mean token and sigma mixed in between."""

    def __init__(self, channels: int = 4, text_dim: int = 32, width: int = 16):
        super().__init__()
        self.inner = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.text = torch.nn.Linear(text_dim, width)
        self.outer = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.inner(x) + (1 + sigma) * self.text(text.mean(1))[:, :, None, None]
        return self.outer(torch.nn.functional.silu(h))


def build_velocity(seed: int) -> dict[str, Any]:
    _, vae, text_encoder, tokenizer = build_tiny(seed)
    torch.manual_seed(seed)
    return {"transformer": TinyVelocity(), "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


@register
class VelocityTest(Family):
    name = "velocity_test"
    modules = {"transformer": TinyVelocity, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer}
    denoiser = "transformer"
    prediction_type = "flow"
    tiny_archs = {"velocity": build_velocity}

    def scheduler(self, config: Mapping[str, Any] | None = None):
        return FlowMatchEulerDiscreteScheduler(shift=3.0)

    def schedule(self, m) -> FlowSchedule:
        return FlowSchedule(shift=m.scheduler.config.shift)

    def check_prompt(self, m, prompt: str) -> None:
        pass

    def encode(self, m, prompts: list[str]) -> Conditioning:
        return encode_conditioning(prompts, [(m.tokenizer, m.text_encoder)], m.resolution, m.device, m.dtype)

    def predict(self, m, x: torch.Tensor, t: float, cond, **kwargs: Any) -> torch.Tensor:
        text = cond.text if isinstance(cond, Conditioning) else cond
        return m.transformer(x.to(m.dtype), torch.tensor(t, device=m.device), text).float()


@pytest.fixture(scope="module")
def velocity_model():
    yield load_components(FLOW, FP32, NO_OFFLOAD, "cpu")


def _image() -> Image.Image:
    pixels = torch.zeros(64, 64, 3, dtype=torch.uint8)
    pixels[16:48, 16:48] = torch.tensor([200, 40, 40], dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_the_family_loads_through_the_seam(velocity_model):
    m = velocity_model
    assert m.family is FAMILIES["velocity_test"] and m.denoiser is m.transformer
    assert m.prediction_type == "flow" and isinstance(m.schedule, FlowSchedule)
    assert m.schedule.pairs(4)[0][0] == 1.0  # the flow grid starts at pure noise
    with pytest.raises(Exception, match="no diffusers pipeline"):
        load_components({**FLOW, "lora": "x"}, FP32, NO_OFFLOAD, "cpu")


def test_ddim_editor_runs_on_it_and_is_euler_in_flow_coordinates(velocity_model):
    """The DDIM editor, unchanged, inverts and regenerates with the family's velocity: on a flow schedule its DDIM
    step is exactly an Euler step, so the editor's inversion equals a hand-written Euler loop."""
    m = velocity_model
    editor = build_editor({"name": "ddim", "num_steps": 6, "guidance_scale": 1.0}, m)
    result = editor.edit(EditRequest(_image(), "a red square", "a blue square", seed=0))
    assert result.edited.size == (64, 64) and result.nfe == 12  # no identity step on a flow grid: N + N calls
    z0, cond = m.encode_image(_image()), m.conditioning(["a red square"])
    with torch.no_grad():
        inverted = editor.invert(z0, cond, m.unconditional())
        x = z0
        for sigma, next_sigma in m.schedule.pairs(6, inverse=True):  # the model at the noisier end, as DDIM does
            x = x + (next_sigma - sigma) * m.predict(x, next_sigma, cond)
    torch.testing.assert_close(inverted, x, rtol=0, atol=1e-5)


def test_editors_that_need_a_unet_refuse_it_naming_those_that_fit(velocity_model):
    with pytest.raises(EditorConfigError, match="editors for velocity_test models: ddim, flowedit, identity"):
        build_editor({"name": "ddim_p2p"}, velocity_model)


def test_flowedit_runs_on_it_natively(velocity_model):
    editor = build_editor({"name": "flowedit", "num_steps": 6, "n_max": 4}, velocity_model)
    result = editor.edit(EditRequest(_image(), "a red square", "a blue square", seed=0))
    assert result.edited.size == (64, 64) and result.nfe == 4
    assert editor.flow_pairs[0][0] == pytest.approx(velocity_model.schedule.pairs(6)[2][0])  # r is sigma itself
