import numpy as np
import pytest
import torch

from editlab.editors.attention import controlled_attention
from editlab.editors.ddim_p2p import DDIMP2PEditor
from editlab.editors.p2p import LocalBlend, P2PController, P2PSettings, make_controller, make_edit

SRC, TGT = "a red circle on a gray background", "a blue circle on a gray background"


class PlainAttention:
    """A controller that never asks for probabilities: every layer takes the fused kernel."""

    step = 0

    def needs_probs(self, is_cross, queries):
        return False

    def step_callback(self, latents):
        return latents


def _setup(components, steps=8):
    editor = DDIMP2PEditor(components, num_steps=steps)
    torch.manual_seed(0)
    x_t = torch.randn(1, 4, 16, 16)
    uncond = [components.encode_prompts([""])] * steps
    return editor, x_t, uncond


@pytest.mark.parametrize(
    "settings",
    [
        dict(blend_words=("red", "blue"), settings=P2PSettings(amplify=2.0)),
        dict(blend_words=None, settings=P2PSettings(cross_replace_steps=1.0, self_replace_steps=1.0)),
        dict(blend_words=("circle", "circle"), settings=P2PSettings(mode="replace", amplify=4.0, blend_start=0.0)),
        dict(blend_words=("red", "blue"), settings=P2PSettings(mode="auto", amplify=4.0, amplify_words="new_words")),
    ],
)
def test_source_branch_equals_plain_reconstruction(tiny_components, settings):
    c = tiny_components
    editor, x_t, uncond = _setup(c)
    text = c.encode_prompts([SRC, TGT])
    controller = make_controller([SRC, TGT], c.tokenizer, editor.num_steps, c.latent_size, c.blend_resolution,
                                 **settings)
    edited = editor.denoise(x_t, text, uncond, controller)
    plain = editor.denoise(x_t, text[:1], uncond, PlainAttention())
    assert torch.allclose(edited[0], plain[0], atol=1e-4), (edited[0] - plain[0]).abs().max()
    assert not torch.allclose(edited[1], plain[0], atol=1e-3)  # the target did change


def test_identical_prompts_give_identical_rows(tiny_components):
    c = tiny_components
    editor, x_t, uncond = _setup(c)
    text = c.encode_prompts([SRC, SRC])
    controller = make_controller([SRC, SRC], c.tokenizer, editor.num_steps, c.latent_size, c.blend_resolution,
                                 ("circle", "circle"), P2PSettings(amplify=1.0, blend_start=0.0))
    latents = editor.denoise(x_t, text, uncond, controller)
    assert torch.allclose(latents[0], latents[1], atol=1e-5)


def test_controller_edits_only_conditional_target_rows(tiny_components):
    c = tiny_components
    controller = make_controller([SRC, TGT], c.tokenizer, 50, c.latent_size, c.blend_resolution, None,
                                 P2PSettings(amplify=1.0))
    probs = torch.rand(2 * 2 * 4, 64, 77).softmax(-1)  # [2 * P * heads, Q, K]
    for is_cross in (True, False):
        out = controller(probs, is_cross, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor")
        assert torch.equal(out[:12], probs[:12])  # uncond half and the source's conditional rows
        assert not torch.equal(out[12:], probs[12:])
    # self-attention replacement copies the source maps exactly
    out = controller(probs, False, "x.attn1.processor")
    assert torch.equal(out[12:], probs[8:12])


def test_schedules_and_which_layers_materialise(tiny_components):
    c = tiny_components
    controller = make_controller([SRC, TGT], c.tokenizer, 50, c.latent_size, c.blend_resolution, None)
    small, large = (c.latent_size // 2) ** 2, c.latent_size**2
    controller.step = 0
    assert controller.needs_probs(True, large) and controller.needs_probs(False, small)
    assert not controller.needs_probs(False, large)  # the largest self-attention maps are never injected
    controller.step = 19
    assert controller.needs_probs(True, large)
    controller.step = 20  # int(0.4 * 51) = 20: cross replacement over
    assert not controller.needs_probs(True, large) and controller.needs_probs(False, small)
    controller.step = 30  # int(0.6 * 50) = 30: self replacement over
    assert not controller.needs_probs(False, small) and not controller.needs_probs(True, small)


def test_only_needed_layers_materialise_probabilities(tiny_components):
    c = tiny_components
    controller = make_controller([SRC, TGT], c.tokenizer, 50, c.latent_size, c.blend_resolution, ("red", "blue"))
    calls = []
    original = P2PController.__call__

    def spy(self, probs, is_cross, layer):
        calls.append((is_cross, probs.shape[1]))
        return original(self, probs, is_cross, layer)

    text = torch.cat([c.encode_prompts(["", ""]), c.encode_prompts([SRC, TGT])])
    P2PController.__call__ = spy
    try:
        with controlled_attention(c.unet, controller), torch.no_grad():
            for step in (0, 40):
                controller.step = step
                c.unet(torch.randn(4, 4, 16, 16), 500, encoder_hidden_states=text)
    finally:
        P2PController.__call__ = original
    layers = c.unet.attn_processors
    n_cross = sum(name.split(".")[-2] == "attn2" for name in layers)
    n_blend = 4  # cross layers at the blend resolution 4² (latent 16 / 4): down_blocks.2, mid, up_blocks.0 (x2)
    n_small_self = 7  # self layers with <= 8² queries: down_blocks.1-2, mid, up_blocks.0-1 (x2 each)
    step0 = n_cross + n_small_self
    assert len(calls) == step0 + n_blend
    assert all(is_cross and q == 16 for is_cross, q in calls[step0:])
    assert controller.store.maps().shape[:2] == (2, n_blend * 8)  # [P, layers * heads]; 64 channels / head dim 8
    assert c.unet.attn_processors.keys() == layers.keys()  # processors restored


# Two items with their own prompts, alignment (refine / replace), schedules, re-weight, blend words and threshold.
ITEMS = [
    ([SRC, TGT], ("red", "blue"), P2PSettings(amplify=2.0, blend_start=0.0)),
    (["a green square on a gray background", "a green triangle on a gray background"], ("square", "triangle"),
     P2PSettings(cross_replace_steps=0.8, self_replace_steps=0.3, mode="replace", amplify=4.0,
                 amplify_words="new_words", blend_start=0.25, blend_threshold=0.5)),
]


def _edits(c, steps):
    return [make_edit(prompts, c.tokenizer, steps, c.blend_resolution, blend, s) for prompts, blend, s in ITEMS]


@pytest.mark.parametrize("has_uncond", [True, False])
def test_item_axis_edits_each_item_like_its_own_controller(tiny_components, has_uncond):
    """A K=2 controller on [uncond x 2P, cond x 2P] (or the conditional rows alone) gives each item's rows exactly
    what a K=1 controller gives the item alone: its attention maps and its LocalBlend."""
    c = tiny_components
    batch = P2PController(_edits(c, 10), c.latent_size)
    singles = [P2PController([edit], c.latent_size) for edit in _edits(c, 10)]
    heads, layer = 4, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    halves = 2 if has_uncond else 1
    for controller in (batch, *singles):
        controller.has_uncond = has_uncond
    torch.manual_seed(0)
    for step, is_cross, queries in ((0, True, 16), (0, False, 64), (5, True, 16), (5, False, 16), (9, False, 16)):
        probs = torch.rand(halves, 2, 2, heads, queries, 77).softmax(-1)  # [uncond / cond, item, prompt, h, Q, L]
        for controller in (batch, *singles):
            controller.step = step
        out = batch(probs.flatten(0, 3), is_cross, layer).view_as(probs)
        for k, single in enumerate(singles):
            alone = single(probs[:, k].flatten(0, 2), is_cross, layer).view_as(probs[:, k])
            assert torch.equal(out[:, k], alone), (step, is_cross, k)
    for k, single in enumerate(singles):  # the stored maps are the items' own, item-major
        assert torch.equal(batch.store.maps()[2 * k:2 * k + 2], single.store.maps())
    # LocalBlend on the stored (random, so not uniform) maps: each item's blend words, threshold and start step
    latents = torch.randn(2, 2, 4, 16, 16)  # [item, prompt, C, h, w]
    for step in (1, 5):  # item 1 blends from step int(0.25 * 10) = 2
        for controller in (batch, *singles):
            controller.step = step
        blended = batch.step_callback(latents.flatten(0, 1)).view_as(latents)
        for k, single in enumerate(singles):
            assert torch.equal(blended[k], single.step_callback(latents[k]))
        assert torch.equal(blended[:, 0], latents[:, 0])  # the sources
        assert [torch.equal(blended[k, 1], latents[k, 1]) for k in range(2)] == [False, step < 2]


def test_item_axis_denoises_stacked_items_like_separate_runs(tiny_components):
    """The whole P2P loop (controlled UNet, CFG, the LocalBlend hook) on two stacked items equals two K=1 runs, to
    float tolerance (the tiny UNet's near-uniform maps give full LocalBlend masks: the test above checks masks)."""
    c = tiny_components
    steps = 6
    editor, _, _ = _setup(c, steps)
    torch.manual_seed(1)
    x_t = torch.randn(2, 1, 4, 16, 16)  # one start latent per item
    uncond = [c.encode_prompts([""])] * steps

    def run(x, prompts, controller):
        text = c.encode_prompts(prompts)
        return editor.guided_loop(x.expand(len(prompts), -1, -1, -1).clone(), text, uncond, controller,
                                  lambda i, latents: controller.step_callback(latents))

    prompts = [p for item_prompts, _, _ in ITEMS for p in item_prompts]
    stacked = run(x_t.repeat_interleave(2, dim=0).flatten(0, 1), prompts, P2PController(_edits(c, steps),
                                                                                           c.latent_size))
    for k, edit in enumerate(_edits(c, steps)):
        alone = run(x_t[k], ITEMS[k][0], P2PController([edit], c.latent_size))
        rows = stacked[2 * k:2 * k + 2]
        assert torch.allclose(rows, alone, atol=1e-4), (rows - alone).abs().max()
    assert not torch.allclose(stacked[1], stacked[0], atol=1e-3)  # the edits did something


def test_items_must_share_the_number_of_prompts(tiny_components):
    c = tiny_components
    three = make_edit([SRC, TGT, TGT], c.tokenizer, 10, c.blend_resolution, None)
    with pytest.raises(ValueError, match="same number of prompts"):
        P2PController([_edits(c, 10)[0], three], c.latent_size)


def test_local_blend_mask_and_noop():
    torch.manual_seed(0)
    alphas = torch.zeros(2, 77)
    alphas[0, 3], alphas[1, 5] = 1, 1
    blend = LocalBlend(alphas, resolution=4, start_step=0)
    maps = torch.rand(2, 8, 16, 77)
    mask = blend.mask(maps, (16, 16))
    assert (mask[1] >= mask[0]).all()  # target mask contains the source mask
    same = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1)
    assert torch.equal(blend(same, maps, step=5), same)


def test_local_blend_waits_for_start_step():
    alphas = torch.zeros(2, 77)
    alphas[:, 2] = 1
    blend = LocalBlend(alphas, resolution=4, start_step=10)
    latents = torch.randn(2, 4, 16, 16)
    assert torch.equal(blend(latents, torch.rand(2, 8, 16, 77), step=9), latents)
    blended = blend(latents, torch.rand(2, 8, 16, 77), step=10)
    assert torch.equal(blended[0], latents[0])


def test_missing_blend_word_is_a_clear_error(tiny_components):
    with pytest.raises(ValueError, match="blend word 'cat' is not a whole word"):
        make_controller([SRC, TGT], tiny_components.tokenizer, 50, 16, 4, ("cat", "blue"))


def test_edit_reports_calls_and_returns_both_images(tiny_components):
    from PIL import Image

    from editlab.editors.base import EditRequest, build_editor

    editor = build_editor({"name": "ddim_p2p", "num_steps": 6}, tiny_components)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    result = editor.edit(EditRequest(image, SRC, TGT, blend_words=("red", "blue")))
    assert result.nfe == 5 + 6  # inversion skips its identity step; one batched call per denoising step
    assert result.edited.size == result.reconstruction.size == (64, 64)
    assert result.seconds > 0


@pytest.mark.parametrize(("latent_size", "blocks", "expected"), [
    (64, ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), 16),  # SD1.5: 64, 32, 16 (8 has no cross-attention)
    (8, ("CrossAttnDownBlock2D",) * 2, 4),  # the toy UNet: 8, 4 -> latent/4 = 2 is absent, 4 is nearest
    (16, ("DownBlock2D", "CrossAttnDownBlock2D"), 8),
])
def test_blend_resolution_is_latent_over_4_or_the_nearest_cross_attention_size(latent_size, blocks, expected):
    """Read from the SD family's attention sites of a UNet with these encoder blocks."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from editlab.models.components import Components
    from editlab.models.families import FAMILIES

    up = tuple(b.replace("Down", "Up") for b in reversed(blocks))
    unet = UNet2DConditionModel(sample_size=latent_size, block_out_channels=(8,) * len(blocks), layers_per_block=1,
                                down_block_types=blocks, up_block_types=up, cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4)
    fake = SimpleNamespace(latent_size=latent_size, unet=unet)
    fake.attention_sites = lambda: FAMILIES["sd"].attention_sites(fake)
    assert Components.blend_resolution.fget(fake) == expected
    sides = {site.side for site in fake.attention_sites() if site.cross}
    assert latent_size // 2 ** (len(blocks) - 1) in sides  # the mid block's cross-attention, at the coarsest side
