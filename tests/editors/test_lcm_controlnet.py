"""SDXL-family LCM + ControlNet-Canny on the tiny SDXL model: Canny control, 4 LCM steps = 4 UNet calls (CFG on a
doubled batch, or the w-embedding), the control image's effect, ControlNet loading, refusals, and a 2-image run."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FP32, NO_OFFLOAD, unet_batches
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor
from PIL import Image

from editlab.editors.base import EditRequest, build_editor
from editlab.editors.lcm_controlnet import canny_edges
from editlab.models.components import ModelLoadError
from editlab.models.loading import load_components

ROOT = Path(__file__).resolve().parents[2]
TINY_SDXL = {"name": "tiny_sdxl", "kind": "tiny", "arch": "sdxl", "seed": 0, "resolution": 64}


@pytest.fixture(scope="module")
def components():
    return load_components(TINY_SDXL, FP32, NO_OFFLOAD, "cpu")


def square(box=(16, 20, 44, 52)) -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 90, 200))
    image.paste((220, 200, 40), box)
    return image


def request(image: Image.Image, seed: int = 0) -> EditRequest:
    return EditRequest(image, "a yellow square", "a red square", "make it red", None, seed)


def test_canny_edges():
    edges = np.asarray(canny_edges(square(), 100, 200))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    ys, xs = np.nonzero(edges[..., 0])
    assert 14 <= ys.min() and ys.max() <= 53 and 14 <= xs.min() and xs.max() <= 45  # only around the square's border
    assert not np.asarray(canny_edges(Image.new("RGB", (64, 64), (9, 9, 9)), 100, 200)).any()


def test_four_steps_four_unet_calls_with_cfg_batch(components):
    editor = build_editor({"name": "lcm_controlnet"}, components)
    results = []
    batches = unet_batches(components.unet, lambda: results.append(editor.edit(request(square()))))
    result = results[0]
    assert result.edited.size == (64, 64) and result.reconstruction is None
    assert result.nfe == 4 and result.extras["controlnet_calls"] == 4
    assert batches == [2] * 4  # LCM-LoRA-style UNet (no w-embedding): guidance 1.5 is CFG on a doubled batch
    assert editor.pipe.scheduler.timesteps.tolist() == [999, 759, 499, 259]
    assert editor.pipe.unet is components.unet and editor.pipe.controlnet is components.controlnet


def test_w_embedding_unet_runs_unbatched(components):
    """A full LCM UNet (time_cond_proj_dim) takes the guidance scale as an embedding: still 4 calls, batch 1."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(components.unet.config, time_cond_proj_dim=16).eval()
    c = load_components(TINY_SDXL, FP32, NO_OFFLOAD, "cpu").derive(unet=unet)
    editor = build_editor({"name": "lcm_controlnet"}, c)
    results = []
    batches = unet_batches(unet, lambda: results.append(editor.edit(request(square()))))
    assert results[0].nfe == 4 and batches == [1] * 4


def test_fixed_seed_and_control_image(components):
    editor = build_editor({"name": "lcm_controlnet"}, components)
    a, b = editor.edit(request(square(), seed=1)), editor.edit(request(square(), seed=2))
    assert a.edited.tobytes() == b.edited.tobytes()  # seed 42 for every edit, as the reference runs it
    moved = editor.edit(request(square((4, 4, 30, 30)), seed=1))
    assert moved.edited.tobytes() != a.edited.tobytes()  # different edges, different result

    per_item = build_editor({"name": "lcm_controlnet", "seed": None}, components)
    assert per_item.edit(request(square(), 1)).edited.tobytes() != per_item.edit(request(square(), 2)).edited.tobytes()

    no_control = build_editor({"name": "lcm_controlnet", "controlnet_conditioning_scale": 0.0}, components)
    x, y = no_control.edit(request(square())), no_control.edit(request(square((4, 4, 30, 30))))
    assert x.edited.tobytes() == y.edited.tobytes()  # the source enters only through the ControlNet


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(dtype):
    c = load_components(TINY_SDXL, {"dtype": dtype, "vae_dtype": "float32"}, NO_OFFLOAD, "cpu")
    result = build_editor({"name": "lcm_controlnet"}, c).edit(request(square()))
    assert result.edited.size == (64, 64) and result.nfe == 4
    assert c.unet.dtype == c.controlnet.dtype == getattr(torch, dtype)


def test_pretrained_controlnet_is_loaded_from_the_editor_config(components, tmp_path):
    components.controlnet.save_pretrained(tmp_path / "controlnet")
    c = load_components(TINY_SDXL, FP32, NO_OFFLOAD, "cpu").derive(controlnet=None)  # as for a pretrained model
    editor = build_editor({"name": "lcm_controlnet", "controlnet": str(tmp_path / "controlnet")}, c)
    assert editor.controlnet is not components.controlnet
    loaded, built = editor.controlnet.controlnet_mid_block.weight, components.controlnet.controlnet_mid_block.weight
    assert torch.equal(loaded, built)
    reference = build_editor({"name": "lcm_controlnet"}, components)
    assert editor.edit(request(square())).edited.tobytes() == reference.edit(request(square())).edited.tobytes()
    with pytest.raises(ModelLoadError, match="editor.controlnet="):
        build_editor({"name": "lcm_controlnet", "controlnet": str(tmp_path / "missing")}, c)


def test_refusals_and_attention_slicing(tiny_components):
    with pytest.raises(ValueError, match="runs on the sdxl model families, not on sd; editors for sd models: ddim, "):
        build_editor({"name": "lcm_controlnet"}, tiny_components)
    c = load_components(TINY_SDXL, FP32, NO_OFFLOAD, "cpu")
    c.unet.set_attn_processor(AttnProcessor())  # stock: slicing may replace it
    editor = build_editor({"name": "lcm_controlnet", "attention_slicing": True}, c)
    assert all(isinstance(p, SlicedAttnProcessor) for p in editor.components.unet.attn_processors.values())
    assert all(type(p) is AttnProcessor for p in c.unet.attn_processors.values())  # the shared model untouched
    assert editor.components.unet.conv_in.weight.data_ptr() == c.unet.conv_in.weight.data_ptr()  # no second copy

    class Custom(AttnProcessor):
        pass

    c.unet.set_attn_processor(Custom())
    with pytest.raises(ValueError, match="Custom"):
        build_editor({"name": "lcm_controlnet", "attention_slicing": True}, c)
