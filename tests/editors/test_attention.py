"""Attention control on MM-DiT joint attention (a tiny SD3 transformer): the controlled processors against diffusers'
own, and Prompt-to-Prompt on the text-token slice of the joint sequence, one item and two stacked items."""

import pytest
import torch
from diffusers import SD3Transformer2DModel

from editlab.editors.attention import controlled_attention
from editlab.editors.p2p import P2PController, P2PSettings, make_edit
from editlab.models.tokenizers import char_tokenizer

SIDE, TOKENS, HEADS = 8, 77, 4  # 8² image tokens (patch 1); 77 text tokens, the width of the P2P tables
ITEMS = [(["a red circle", "a blue circle"], ("red", "blue"), P2PSettings()),
         (["a green square", "a green big square"], ("square", "square"), P2PSettings(amplify_words="new_words"))]


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    # Two blocks: the first with SD3.5's qk-norm and image-only second attention (`attn2`), the last context_pre_only.
    return SD3Transformer2DModel(sample_size=SIDE, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=HEADS, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4, dual_attention_layers=(0,),
                                 qk_norm="rms_norm").eval()


def _inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, SIDE, SIDE, generator=g),
                encoder_hidden_states=torch.randn(batch, TOKENS, 32, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.full((batch,), 500))


class PassThrough:
    """Asks for every map (``needs``: the materialised path; else the fused one) and returns it unchanged."""

    def __init__(self, needs: bool):
        self.needs = needs
        self.seen = set()

    def needs_probs(self, is_cross, queries):
        return self.needs

    def __call__(self, probs, is_cross, layer):
        self.seen.add((is_cross, tuple(probs.shape)))
        return probs


@pytest.mark.parametrize("needs", [False, True])
def test_pass_through_controller_matches_diffusers_joint_attention(transformer, needs):
    inputs = _inputs(2)
    stock_processors = transformer.attn_processors
    controller = PassThrough(needs)
    with torch.no_grad():
        stock = transformer(**inputs).sample
        with controlled_attention(transformer, controller):
            kinds = {name.split(".")[-2]: type(p).__name__ for name, p in transformer.attn_processors.items()}
            controlled = transformer(**inputs).sample
    assert kinds == {"attn": "JointControlledAttnProcessor", "attn2": "ControlledAttnProcessor"}
    assert torch.allclose(controlled, stock, atol=1e-5), (controlled - stock).abs().max()
    n = SIDE**2
    # joint sites show the image queries' text-key and image-key slices; attn2 is plain self-attention
    assert controller.seen == ({(True, (2 * HEADS, n, TOKENS)), (False, (2 * HEADS, n, n))} if needs else set())
    assert transformer.attn_processors == stock_processors  # restored


def _p2p(transformer, items: list[int], step: int = 0, steps: int = 10) -> tuple[torch.Tensor, P2PController]:
    """One forward at ``step`` of the CFG batch [uncond x K*P, cond x K*P] of ``ITEMS[k] for k in items`` under
    their controller; item k's text embeddings are the same whatever the batch."""
    tokenizer = char_tokenizer()
    edits = [make_edit(prompts, tokenizer, steps, SIDE, blend, s) for prompts, blend, s in (ITEMS[k] for k in items)]
    controller = P2PController(edits, latent_size=2 * SIDE)  # self-injection on layers of up to 8² queries
    controller.step = step
    rows = 2 * 2 * len(items)
    g = torch.Generator().manual_seed(0)
    latent, uncond, pooled = (torch.randn(1, *shape, generator=g) for shape in ((4, SIDE, SIDE), (TOKENS, 32), (64,)))
    text = [torch.randn(2, TOKENS, 32, generator=torch.Generator().manual_seed(10 + k)) for k in items]
    inputs = dict(hidden_states=latent.expand(rows, -1, -1, -1), pooled_projections=pooled.expand(rows, -1),
                  encoder_hidden_states=torch.cat([uncond.expand(rows // 2, -1, -1), *text]),
                  timestep=torch.full((rows,), 500))
    with torch.no_grad(), controlled_attention(transformer, controller):
        return transformer(**inputs).sample, controller


def test_p2p_on_joint_attention_edits_only_the_target(transformer):
    edited, controller = _p2p(transformer, [0])
    plain, _ = _p2p(transformer, [0], step=9)  # past both windows: nothing edited (maps still stored)
    assert torch.allclose(edited[:3], plain[:3], atol=1e-5)  # the uncond rows and the source never change
    assert not torch.allclose(edited[3], plain[3], atol=1e-3)
    assert controller.store.maps().shape == (2, 2 * HEADS, SIDE**2, TOKENS)  # both joint layers, as cross maps


def test_p2p_on_joint_attention_with_stacked_items_equals_separate_runs(transformer):
    stacked, _ = _p2p(transformer, [0, 1])  # [uncond x 4, cond x 4]
    for k in (0, 1):
        alone, _ = _p2p(transformer, [k])  # [uncond x 2, cond x 2]
        rows = torch.cat([stacked[2 * k:2 * k + 2], stacked[4 + 2 * k:4 + 2 * k + 2]])
        assert torch.allclose(rows, alone, atol=1e-5), (rows - alone).abs().max()
