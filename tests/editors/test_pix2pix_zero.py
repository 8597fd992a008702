"""Pix2Pix-Zero on the tiny model: regulariser, reference/edit passes, cost."""

from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, random_image
from omegaconf import OmegaConf

from editlab.editors.attention import controlled_attention
from editlab.editors.base import EditRequest, build_editor
from editlab.editors.pix2pix_zero import (
    CrossAttentionGuidance,
    Pix2PixZeroEditor,
    auto_corr_loss,
    kl_loss,
    regularize_noise,
)

ROOT = Path(__file__).resolve().parents[2]



def _ac(eps: torch.Tensor, seed: int = 0) -> float:
    return auto_corr_loss(eps, torch.Generator().manual_seed(seed)).item()


def test_regulariser_lowers_its_losses():
    torch.manual_seed(0)
    # correlated, off-scale noise: a smoothed field with a mean offset
    eps = torch.nn.functional.avg_pool2d(torch.randn(1, 4, 20, 20), 5, stride=1) * 3 + 0.5  # [1, 4, 16, 16]
    regularized = regularize_noise(eps, lambda_ac=20, lambda_kl=20, num_reg_steps=5, num_ac_rolls=5,
                                   generator=torch.Generator().manual_seed(1))
    assert regularized.shape == eps.shape
    assert all(_ac(regularized, seed) < _ac(eps, seed) for seed in range(5))
    assert kl_loss(regularized) < kl_loss(eps)
    # white noise is (nearly) KL's minimum, and switched-off weights change nothing
    assert kl_loss(torch.randn(1, 4, 64, 64)).abs() < 1e-2
    assert torch.equal(regularize_noise(eps, 0.0, 0.0, 5, 5), eps)


def test_auto_corr_loss_is_a_pyramid_of_rolled_correlations():
    eps = torch.randn(2, 4, 32, 32)
    # a constant map is perfectly correlated with any roll of itself: 2 axes x 3 levels (32, 16, 8) per map
    assert auto_corr_loss(torch.ones(1, 1, 32, 32)).item() == pytest.approx(6.0)
    assert auto_corr_loss(eps, torch.Generator().manual_seed(0)) > 0
    with torch.enable_grad():
        x = eps.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(auto_corr_loss(x), x)
    assert torch.isfinite(grad).all()


def test_identical_prompts_without_guidance_reproduce_the_reference_pass(tiny_components):
    c = tiny_components
    editor = Pix2PixZeroEditor(c, num_steps=5, xa_guidance=0.0)
    caption = c.encode_prompts(PROMPTS[:1])
    x_t = editor.invert(c.encode_image(random_image()), caption, torch.Generator().manual_seed(0))[-1]
    controller = CrossAttentionGuidance(offload_maps=False)
    reference = editor.reference(x_t, caption, controller)
    cross_layers = {name for name in c.unet.attn_processors if name.endswith("attn2.processor")}
    assert len(controller.maps) == 5 and all(set(maps) == cross_layers for maps in controller.maps)
    edited = editor.edit_pass(x_t, torch.cat([caption, caption]), controller)
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-4)  # fused vs materialised attention rounding
    # with identical prompts the guidance loss starts at zero: the guided edit stays on the reference too
    editor.xa_guidance = 0.1
    torch.testing.assert_close(editor.edit_pass(x_t, torch.cat([caption, caption]), controller), reference,
                               rtol=0, atol=1e-3)


def test_guidance_step_descends_the_attention_loss(tiny_components):
    c = tiny_components
    editor = Pix2PixZeroEditor(c, num_steps=5, xa_guidance=1e-2)
    source, target = c.encode_prompts(PROMPTS)
    context = torch.stack([source, target])  # [caption, edit]
    controller = CrossAttentionGuidance(offload_maps=False)
    x_t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    editor.reference(x_t, source[None], controller)
    step, t = 2, editor.pairs[2][0]
    x_in = torch.cat([x_t] * 2) * 0.9  # off the reference latent: a non-zero loss

    def loss(x: torch.Tensor) -> float:
        controller.mode, controller.loss = "guide", None
        with controlled_attention(c.unet, controller), torch.no_grad():
            c.predict(x, t, context)
        return controller.loss.item()

    controller.step = step
    with controlled_attention(c.unet, controller):
        stepped = editor.guide(x_in, t, context, controller)
    assert controller.mode == "off" and controller.loss is None and not stepped.requires_grad
    assert loss(stepped) < loss(x_in)


def test_edit_cost_and_outputs(tiny_components):
    steps = 4
    request = EditRequest(random_image(), PROMPTS[0], PROMPTS[1])
    result = Pix2PixZeroEditor(tiny_components, num_steps=steps).edit(request)
    assert result.nfe == (steps - 1) + steps + 2 * steps  # inversion + reference + (guided + recomputed) edit
    assert result.extras["backward_passes"] == steps
    assert result.edited.size == result.reconstruction.size == (64, 64)
    assert result.edited != result.reconstruction
    unguided = Pix2PixZeroEditor(tiny_components, num_steps=steps, xa_guidance=0.0).edit(request)
    assert unguided.nfe == 3 * steps - 1 and unguided.extras["backward_passes"] == 0
    with pytest.raises(ValueError, match="caption"):
        Pix2PixZeroEditor(tiny_components, caption="blip")


def test_config_has_the_reference_defaults(tiny_components):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "editlab" / "conf" / "editor" / "pix2pix_zero.yaml"))
    assert cfg == {
        "name": "pix2pix_zero", "num_steps": 50, "guidance_scale": 7.5, "xa_guidance": 0.1, "lambda_ac": 20.0,
        "lambda_kl": 20.0, "num_reg_steps": 5, "num_ac_rolls": 5, "caption": "source_prompt", "offload_maps": True,
    }
    assert isinstance(build_editor(cfg, tiny_components), Pix2PixZeroEditor)
