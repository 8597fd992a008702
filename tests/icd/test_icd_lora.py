"""Teacher backends and the two-adapter LoRA wiring. Tiny models, CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline

from editlab.icd.lora import (
    FORWARD,
    REVERSE,
    TARGET_MODULES,
    AdapterSwitch,
    FusedAdapterSwitch,
    adapted_module_names,
    add_icd_adapters,
    load_adapter,
    lora_parameters,
    read_adapter_file,
    save_adapter,
)
from editlab.icd.teacher import add_guidance_embedding, load_cfg_distilled
from editlab.models.builders import build_tiny
from editlab.models.guidance import guidance_embedding, unet_guidance
from editlab.models.loading import sd_scheduler


@pytest.fixture(scope="module")
def tiny():
    unet, vae, text_encoder, tokenizer = build_tiny(seed=0)
    return add_guidance_embedding(unet), vae, text_encoder, tokenizer


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([259, 999]), torch.randn(2, 77, 32, generator=g)


def with_adapters(unet, rank=4, alpha=8, randomise=False):
    unet = copy.deepcopy(unet)
    add_icd_adapters(unet, rank=rank, alpha=alpha)
    if randomise:  # B != 0 so the adapters change the outputs
        g = torch.Generator().manual_seed(1)
        for name in (FORWARD, REVERSE):
            for p in lora_parameters(unet, name):
                p.data = torch.randn(p.shape, generator=g) * 0.1
    return unet


def eps(unet, inputs, w=(0.0, 7.0)):
    x, t, text = inputs
    with torch.no_grad():
        return unet_guidance(unet)(x, t, text, torch.tensor(w))


def test_students_start_equal_to_the_teacher(tiny, inputs):
    teacher = eps(tiny[0], inputs)
    unet = with_adapters(tiny[0], rank=64)
    switch = AdapterSwitch(unet)
    for adapter in (FORWARD, REVERSE):
        switch.activate(adapter)
        assert torch.equal(eps(unet, inputs), teacher)
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
    assert layer.scaling[FORWARD] == layer.scaling[REVERSE] == 8 / 64


def test_exactly_the_fourteen_module_kinds_are_adapted(tiny):
    unet = with_adapters(tiny[0])
    adapted = set(adapted_module_names(unet))
    kinds = {kind for kind in TARGET_MODULES for name in adapted if name == kind or name.endswith("." + kind)}
    assert kinds == set(TARGET_MODULES)
    base_names = [n for n, _ in tiny[0].named_modules()]
    expected = {n for n in base_names if any(n == k or n.endswith("." + k) for k in TARGET_MODULES)}
    assert adapted == expected
    for frozen in ("conv_in", "conv_out", "time_embedding.cond_proj", "time_embedding.linear_1"):
        assert frozen not in adapted


def test_adapters_are_independent_and_teacher_is_adapter_free(tiny, inputs):
    unet = with_adapters(tiny[0], randomise=True)
    switch = AdapterSwitch(unet)
    switch.activate(None)
    assert torch.equal(eps(unet, inputs), eps(tiny[0], inputs))
    switch.activate(REVERSE)
    reverse = eps(unet, inputs)
    switch.activate(FORWARD)
    forward = eps(unet, inputs)
    assert not torch.allclose(forward, reverse)
    with torch.no_grad():
        for p in lora_parameters(unet, FORWARD):
            p.add_(0.05)
    assert not torch.allclose(eps(unet, inputs), forward)
    switch.activate(REVERSE)
    assert torch.equal(eps(unet, inputs), reverse)


def test_fused_switch_matches_the_lora_branch_and_restores_the_teacher(tiny, inputs):
    unet = with_adapters(tiny[0], randomise=True)
    switch = AdapterSwitch(unet)
    expected = {}
    for adapter in (FORWARD, REVERSE, None):
        switch.activate(adapter)
        expected[adapter] = eps(unet, inputs)
    for _ in range(2):  # a second fused switch (another editor on the same UNet) starts from the teacher again
        fused = FusedAdapterSwitch(unet)
        for adapter in (REVERSE, FORWARD, None, FORWARD):  # switching back and forth never drifts the weights
            fused.activate(adapter)
            torch.testing.assert_close(eps(unet, inputs), expected[adapter], atol=1e-5, rtol=1e-5)
    fused.activate(FORWARD)
    AdapterSwitch(unet).activate(REVERSE)  # the plain switch puts the teacher's weights back under the LoRA branch
    torch.testing.assert_close(eps(unet, inputs), expected[REVERSE], atol=1e-6, rtol=0)


def test_both_adapters_get_gradients_across_switches(tiny, inputs):
    """peft pitfall: switching adapters must not cut the gradient of the adapter used first."""
    unet = with_adapters(tiny[0], randomise=True)
    switch = AdapterSwitch(unet, trainable=True)
    x, t, text = inputs
    guided = unet_guidance(unet)
    switch.activate(FORWARD)
    loss = guided(x, t, text, torch.zeros(2)).square().mean()
    switch.activate(REVERSE)
    loss = loss + guided(x, t, text, torch.zeros(2)).square().mean()
    switch.activate(None)
    loss.backward()
    for adapter in (FORWARD, REVERSE):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(unet, adapter))
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora_" not in n)


def test_guidance_backends(tiny, inputs):
    unet, _, _, _ = tiny
    x, t, text = inputs
    with torch.no_grad():
        zero = unet_guidance(unet)(x, t, text, torch.zeros(2))
        no_embedding = unet(x, t, encoder_hidden_states=text).sample
        assert not torch.allclose(zero, no_embedding)  # w = 0 is an input, not "no guidance input"
        explicit = unet(x, t, encoder_hidden_states=text, timestep_cond=guidance_embedding(torch.zeros(2))).sample
        assert torch.equal(zero, explicit)

        plain = build_tiny(seed=0)[0]
        uncond = torch.randn(1, 77, 32)
        guided = unet_guidance(plain, uncond=uncond)
        assert guided.kind == "cfg" and not guided.needs_uncond(torch.zeros(2))
        w = torch.tensor([0.0, 7.0])
        eps_c = plain(x, t, encoder_hidden_states=text).sample
        eps_u = plain(x, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        expected = eps_c + w.view(-1, 1, 1, 1) * (eps_c - eps_u)  # code units: w = 0 is the conditional eps
        assert torch.allclose(guided(x, t, text, w), expected, atol=1e-4)
        assert torch.allclose(guided(x, t, text, w)[0], eps_c[0], atol=1e-5)


def test_cfg_distilled_checkpoint_round_trip(tiny, inputs, tmp_path):
    unet = tiny[0]
    torch.save({"state_dict": {"module." + k: v for k, v in unet.state_dict().items()}}, tmp_path / "cfg.pt")
    loaded = load_cfg_distilled(build_tiny(seed=5)[0], tmp_path / "cfg.pt")
    assert loaded.config.time_cond_proj_dim == 512
    assert torch.equal(eps(loaded, inputs), eps(unet, inputs))
    torch.save({"conv_in.weight": unet.conv_in.weight}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="does not fit"):
        load_cfg_distilled(build_tiny(seed=5)[0], tmp_path / "bad.pt")


@pytest.mark.parametrize("style", ["diffusers", "released"])
def test_save_load_round_trip(tiny, inputs, tmp_path, style):
    unet = with_adapters(tiny[0], alpha=16, randomise=True)  # alpha travels in the file's metadata
    switch = AdapterSwitch(unet)
    expected = {}
    for adapter in (FORWARD, REVERSE):
        switch.activate(adapter)
        expected[adapter] = eps(unet, inputs)
        save_adapter(unet, adapter, tmp_path / f"{adapter}.safetensors", style=style)
    weights, _ = read_adapter_file(tmp_path / f"{FORWARD}.safetensors")
    with __import__("safetensors").safe_open(str(tmp_path / f"{FORWARD}.safetensors"), "pt") as f:
        prefix = "unet.base_model.model." if style == "released" else "unet."
        assert all(k.startswith(prefix) for k in f.keys())

    fresh = copy.deepcopy(tiny[0])
    for adapter in (FORWARD, REVERSE):
        load_adapter(fresh, adapter, tmp_path / f"{adapter}.safetensors")
    switch = AdapterSwitch(fresh)
    for adapter in (FORWARD, REVERSE):
        switch.activate(adapter)
        assert torch.allclose(eps(fresh, inputs), expected[adapter], atol=1e-5)
        assert fresh.peft_config[adapter].lora_alpha == 16 and fresh.peft_config[adapter].r == 4


def test_exports_load_and_fuse_in_diffusers(tiny, inputs, tmp_path):
    unet = with_adapters(tiny[0], rank=4, alpha=8, randomise=True)  # scale 2: wrong if diffusers assumed alpha = r
    AdapterSwitch(unet).activate(REVERSE)
    expected = eps(unet, inputs)
    save_adapter(unet, REVERSE, tmp_path / "reverse.safetensors")

    _, vae, text_encoder, tokenizer = tiny
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=copy.deepcopy(tiny[0]), scheduler=sd_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="reverse.safetensors", adapter_name="rev")
    assert torch.allclose(eps(pipe.unet, inputs), expected, atol=1e-5)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert torch.allclose(eps(pipe.unet, inputs), expected, atol=1e-5)


def test_released_files_without_metadata_load_with_alpha_8(tiny, inputs, tmp_path):
    from safetensors.torch import load_file, save_file

    unet = with_adapters(tiny[0], rank=4, alpha=8, randomise=True)
    AdapterSwitch(unet).activate(REVERSE)
    expected = eps(unet, inputs)
    save_adapter(unet, REVERSE, tmp_path / "with_meta.safetensors", style="released")
    save_file(load_file(tmp_path / "with_meta.safetensors"), tmp_path / "released.safetensors")  # keys only
    fresh = copy.deepcopy(tiny[0])
    load_adapter(fresh, REVERSE, tmp_path / "released.safetensors")
    assert fresh.peft_config[REVERSE].lora_alpha == 8
    assert torch.allclose(eps(fresh, inputs), expected, atol=1e-5)
