"""The flow-matching transformer families, SD3 and FLUX, on their tiny random builds: loading (tiny, a local diffusers
folder, without T5), prompt encoding and the denoiser call against diffusers' own pipelines, FLUX's token packing,
the schedules against diffusers' scheduler, guidance kinds, attention sites, call counting, the unchanged DDIM editor
end to end, and the full-size architectures' parameter counts (on the meta device)."""

from dataclasses import replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from editlab.diffusion.solver import euler_step, solve
from editlab.editors.base import EditorConfigError, EditRequest, build_editor
from editlab.models.components import ModelLoadError, PromptTooLongError, count_forward_calls
from editlab.models.families import FAMILIES
from editlab.models.families.flux import build_flux_arch, image_ids, pack, unpack
from editlab.models.families.sd3 import build_sd3_arch
from editlab.models.loading import load_components

TINY_SD3 = {"name": "tiny_sd3", "kind": "tiny", "arch": "sd3", "seed": 0, "resolution": 64}
TINY_FLUX = {"name": "tiny_flux", "kind": "tiny", "arch": "flux", "seed": 0, "resolution": 64}
FP32, NO_OFFLOAD = {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}
PROMPTS = ["a red square", "a blue circle"]


def load(model: dict, **options):
    return load_components({**model, **options}, FP32, NO_OFFLOAD, "cpu")


@pytest.fixture(scope="module")
def sd3():
    return load(TINY_SD3)


@pytest.fixture(scope="module")
def flux():
    return load(TINY_FLUX)


def _latents(seed: int = 0, rows: int = 2) -> torch.Tensor:
    return torch.randn(rows, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def _image() -> Image.Image:
    pixels = torch.full((64, 64, 3), 30, dtype=torch.uint8)
    pixels[16:48, 16:48] = torch.tensor([200, 40, 40], dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_tiny_models_load_with_their_family(sd3, flux):
    for m, family in ((sd3, "sd3"), (flux, "flux")):
        assert m.family is FAMILIES[family] and m.denoiser is m.transformer and m.prediction_type == "flow"
        assert (m.latent_channels, m.latent_size, m.vae.config.latent_channels) == (16, 16, 16)
        assert m.vae.config.shift_factor is not None  # the 16-channel VAEs' latents are (z - shift) x scale
        assert m.options["max_sequence_length"] == FAMILIES[family].max_sequence_length


def test_predict_is_the_fp32_velocity_of_fp32_latents(sd3, flux):
    for m in (sd3, flux):
        cond = m.conditioning(PROMPTS)
        v = m.predict(_latents(), 0.7, cond)
        assert v.shape == (2, 16, 16, 16) and v.dtype == torch.float32 and torch.isfinite(v).all()
        per_row = m.predict(_latents(), torch.tensor([0.7, 0.3]), cond)  # one time per row
        torch.testing.assert_close(per_row[:1], v[:1], rtol=0, atol=1e-6)
        assert not torch.allclose(per_row[1:], v[1:])


def test_half_precision_runs_the_networks_in_bf16_and_keeps_the_vae_and_results_fp32():
    m = load_components(TINY_FLUX, {"dtype": "bfloat16", "vae_dtype": "float32"}, NO_OFFLOAD, "cpu")
    assert m.transformer.dtype == m.text_encoder_2.dtype == torch.bfloat16 and m.vae.dtype == torch.float32
    latent = m.encode_image(_image())
    v = m.predict(latent, 0.5, m.conditioning(PROMPTS[:1]))
    assert latent.dtype == v.dtype == torch.float32 and torch.isfinite(v).all()


def test_flux_packing_is_the_pipelines_and_round_trips_bit_exactly():
    x = _latents(rows=3)
    tokens = pack(x)
    assert tokens.shape == (3, 64, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 3, 16, 16, 16))
    assert torch.equal(unpack(tokens, 16, 16), x)
    assert torch.equal(unpack(tokens, 16, 16), FluxPipeline._unpack_latents(tokens, 64, 64, 4))  # 64² px, VAE 4x
    ids = image_ids(16, 16, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(3, 8, 8, "cpu", torch.float32))


def test_sd3_encoding_is_the_pipelines_with_and_without_t5(sd3):
    pipe = sd3.family.pipeline(sd3)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.transformer is sd3.transformer
    text, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    cond = sd3.conditioning(PROMPTS)
    assert cond.text.shape == (2, 77 + 256, 32) and cond.added["pooled_projections"].shape == (2, 8 + 16)
    assert torch.equal(cond.text, text) and torch.equal(cond.added["pooled_projections"], pooled)
    assert cond.text[:, :77, 8 + 16:].abs().sum() == 0  # the CLIP part, zero-padded to T5's width

    no_t5 = load(TINY_SD3, t5=False)
    assert no_t5.text_encoder_3 is None and no_t5.tokenizer_3 is None
    bare = no_t5.conditioning(PROMPTS)
    assert bare.text.shape == cond.text.shape and bare.text[:, 77:].abs().sum() == 0  # T5's part: zeros
    assert torch.equal(bare.text[:, :77], cond.text[:, :77])
    assert torch.equal(bare.added["pooled_projections"], cond.added["pooled_projections"])
    text, *_ = no_t5.family.pipeline(no_t5).encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert torch.equal(bare.text, text)
    assert no_t5.predict(_latents(), 0.5, bare).shape == (2, 16, 16, 16)


def test_sd3_with_one_clip_and_no_t5_tokens(sd3):
    """``clip_g: false`` (the toy flow teacher's layout): CLIP-L alone, padded to the joint width, its projection the
    pooled input; ``max_sequence_length: 0`` without T5 leaves T5's zeros out of the sequence."""
    one = load(TINY_SD3, t5=False, clip_g=False, max_sequence_length=0)
    assert one.text_encoder_2 is None and one.tokenizer_2 is None and one.text_encoder_3 is None
    cond, full = one.conditioning(PROMPTS), sd3.conditioning(PROMPTS)
    assert cond.text.shape == (2, 77, 32) and cond.added["pooled_projections"].shape == (2, 8)
    assert torch.equal(cond.text[..., :8], full.text[:, :77, :8]) and cond.text[..., 8:].abs().sum() == 0
    assert torch.equal(cond.added["pooled_projections"], full.added["pooled_projections"][:, :8])


def test_flux_encoding_is_the_pipelines_and_flux_refuses_to_drop_t5(flux):
    pipe = flux.family.pipeline(flux)
    assert isinstance(pipe, FluxPipeline) and pipe.transformer is flux.transformer
    text, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=512)
    cond = flux.conditioning(PROMPTS)
    assert cond.text.shape == (2, 512, 32) and cond.added["pooled_projections"].shape == (2, 16)
    assert torch.equal(cond.text, text) and torch.equal(cond.added["pooled_projections"], pooled)
    with pytest.raises(ModelLoadError, match="T5"):
        load(TINY_FLUX, t5=False)


def test_prompt_limits_name_the_encoder(sd3):
    short = load(TINY_SD3, max_sequence_length=8)
    assert short.conditioning(["a cat"]).text.shape == (1, 77 + 8, 32)
    with pytest.raises(PromptTooLongError, match=r"T5 \(model.max_sequence_length\) takes at most 8"):
        short.conditioning(["a red square"])
    with pytest.raises(PromptTooLongError, match="at most 77"):
        sd3.conditioning(["x" * 80])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_predict_steps_as_the_diffusers_pipeline_does(sd3, flux, family):
    """Three steps of the family's guided prediction (SD3: CFG 5 against the empty prompt; FLUX-dev: embedded 2.5)
    with Euler on the family's schedule equal the diffusers pipeline over the same modules from the same latents."""
    m, scale, steps = (sd3, 5.0, 3) if family == "sd3" else (flux, 2.5, 3)
    z = _latents(rows=1)
    cond, uncond = m.conditioning(PROMPTS[:1]), m.unconditional()
    guidance = m.guidance()
    with torch.no_grad():
        ours = solve(z, m.schedule.pairs(steps), lambda i, x, t: guidance(x, t, cond, scale), m.schedule,
                     step=euler_step, predicts="flow")[-1]
    pipe = m.family.pipeline(m)
    common = dict(num_inference_steps=steps, guidance_scale=scale, height=64, width=64, output_type="latent")
    if family == "sd3":
        theirs = pipe(prompt_embeds=cond.text, pooled_prompt_embeds=cond.added["pooled_projections"],
                      negative_prompt_embeds=uncond.text,
                      negative_pooled_prompt_embeds=uncond.added["pooled_projections"], latents=z, **common).images
    else:
        theirs = pipe(prompt_embeds=cond.text, pooled_prompt_embeds=cond.added["pooled_projections"],
                      latents=pack(z), **common).images
        theirs = unpack(theirs, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_flux_predict_is_the_transformer_called_on_packed_tokens(flux):
    m = flux
    x, cond, sigma = _latents(), m.conditioning(PROMPTS), 0.6
    direct = m.transformer(
        hidden_states=FluxPipeline._pack_latents(x, 2, 16, 16, 16), timestep=torch.full((2,), sigma * 1000) / 1000,
        guidance=torch.full((2,), 2.0), pooled_projections=cond.added["pooled_projections"],
        encoder_hidden_states=cond.text, txt_ids=torch.zeros(512, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32), return_dict=False)[0]
    torch.testing.assert_close(m.predict(x, sigma, cond, guidance=2.0), unpack(direct, 16, 16), rtol=0, atol=1e-6)
    embedded = m.guidance()  # FLUX-dev: the scale per row is the transformer's guidance input
    assert torch.equal(embedded(x, sigma, cond, torch.tensor([2.0, 2.0])), m.predict(x, sigma, cond, guidance=2.0))
    assert not torch.allclose(m.predict(x, sigma, cond), m.predict(x, sigma, cond, guidance=2.0))  # default 3.5


def test_guidance_kinds(sd3, flux, tiny_components):
    assert [m.family.guidance_kind(m) for m in (tiny_components, sd3, flux)] == ["cfg", "cfg", "embedded"]
    assert sd3.guidance().kind == "cfg" and sd3.guidance().uncond is not None
    schnell = flux.derive(transformer=FluxTransformer2DModel.from_config(flux.transformer.config,
                                                                         guidance_embeds=False).eval())
    assert schnell.family.guidance_kind(schnell) == "none" and schnell.guidance().kind == "none"
    cond = schnell.conditioning(PROMPTS[:1])
    assert schnell.predict(_latents(rows=1), 0.5, cond).shape == (1, 16, 16, 16)
    with pytest.raises(ValueError, match="no guidance input"):
        schnell.predict(_latents(rows=1), 0.5, cond, guidance=3.5)


def test_schedules_are_the_diffusers_schedulers(sd3, flux):
    reference = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    reference.set_timesteps(28)
    assert sd3.schedule.shift == 3.0 and not sd3.schedule.dynamic
    torch.testing.assert_close(torch.tensor(sd3.schedule.sigmas(28)), reference.sigmas, rtol=0, atol=1e-6)

    for resolution in (64, 128):  # 8² and 16² packed tokens: the shift follows the resolution
        m = flux if resolution == 64 else load(TINY_FLUX, resolution=resolution)
        config, tokens = m.scheduler.config, (resolution // 8) ** 2
        assert m.schedule.seq_len == tokens
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        reference = FlowMatchEulerDiscreteScheduler.from_config(config)
        reference.set_timesteps(sigmas=[1 - k / 28 for k in range(28)], mu=mu)  # the grid FluxPipeline passes
        torch.testing.assert_close(torch.tensor(m.schedule.sigmas(28)), reference.sigmas, rtol=0, atol=1e-6)

    schnell = replace(flux, scheduler=FlowMatchEulerDiscreteScheduler())  # FLUX.1-schnell's: static, shift 1
    reference = FlowMatchEulerDiscreteScheduler()
    reference.set_timesteps(sigmas=[1 - k / 4 for k in range(4)])
    torch.testing.assert_close(torch.tensor(schnell.schedule.sigmas(4)), reference.sigmas, rtol=0, atol=1e-7)


def test_scheduler_options_and_resolutions_the_family_cannot_run_are_refused(sd3):
    with pytest.raises(ModelLoadError, match="use_karras_sigmas"):
        sd3.family.check(TINY_SD3, sd3.modules, FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                         torch.float32)
    with pytest.raises(ModelLoadError, match="multiple of 8"):
        load(TINY_SD3, resolution=60)


def test_attention_sites(flux):
    sd35 = load({**TINY_SD3, "arch": "sd35"})  # SD3.5: the first block adds an image-only attention
    assert [(s.name, s.cross, s.side) for s in sd35.attention_sites()] == [
        ("transformer_blocks.0.attn.processor", True, 8), ("transformer_blocks.0.attn2.processor", False, 8),
        ("transformer_blocks.1.attn.processor", True, 8)]
    assert [(s.name, s.cross, s.side) for s in flux.attention_sites()] == [
        ("transformer_blocks.0.attn.processor", True, 8), ("single_transformer_blocks.0.attn.processor", True, 8)]


def test_calls_are_counted_on_the_transformer(sd3, flux):
    for m in (sd3, flux):
        cond = m.conditioning(PROMPTS[:1])
        with count_forward_calls(m.denoiser) as calls:
            m.guidance()(_latents(rows=1), 0.5, cond, 4.0)  # SD3: one CFG call of two rows; FLUX: one call
            m.predict(_latents(rows=1), 0.5, cond)
        assert calls["n"] == 2


@pytest.mark.parametrize("model", [TINY_SD3, TINY_FLUX], ids=["sd3", "flux"])
def test_the_ddim_editor_edits_end_to_end(model, sd3, flux):
    """The family-agnostic DDIM editor runs unchanged (on a flow schedule its DDIM step is the Euler step); P2P
    editors refuse the family, naming the editors that fit."""
    m = sd3 if model is TINY_SD3 else flux
    editor = build_editor({"name": "ddim", "num_steps": 3, "guidance_scale": 2.0}, m)
    result = editor.edit(EditRequest(_image(), "a red square", "a blue square", seed=0))
    assert result.edited.size == (64, 64) and result.nfe == 3 + 3
    with pytest.raises(EditorConfigError, match=f"editors for {m.family.name} models: .*ddim"):
        build_editor({"name": "ddim_p2p"}, m)


def test_a_local_diffusers_folder_loads_with_or_without_t5(tmp_path, sd3, flux):
    for m, config in ((sd3, TINY_SD3), (flux, TINY_FLUX)):
        folder = tmp_path / m.family.name
        m.family.pipeline(m).save_pretrained(folder)
        model = {**config, "kind": "pretrained", "family": m.family.name, "path": str(folder)}
        loaded = load(model)
        assert loaded.schedule == m.schedule
        x, cond = _latents(), loaded.conditioning(PROMPTS)
        assert torch.equal(cond.text, m.conditioning(PROMPTS).text)
        torch.testing.assert_close(loaded.predict(x, 0.5, cond), m.predict(x, 0.5, cond), rtol=0, atol=0)
    assert load({**model, "family": "sd3", "path": str(tmp_path / "sd3"), "t5": False}).text_encoder_3 is None


@pytest.mark.parametrize("model", [TINY_SD3, TINY_FLUX], ids=["sd3", "flux"])
def test_a_transformer_lora_is_loaded_through_the_pipeline_and_fused(tmp_path, model, sd3, flux):
    m = sd3 if model is TINY_SD3 else flux
    adapted = m.family.tiny_archs[model["arch"]](0)["transformer"].eval()
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                   init_lora_weights=False))  # random, so that it changes the output
    type(m.family.pipeline(m)).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(adapted))
    fused = load(model, lora=str(tmp_path))
    x, cond = _latents(), m.conditioning(PROMPTS)
    with torch.no_grad():
        expected = m.derive(transformer=adapted).predict(x, 0.5, cond)
    assert (expected - m.predict(x, 0.5, cond)).abs().max() > 1e-2  # the LoRA does change the velocity
    torch.testing.assert_close(fused.predict(x, 0.5, cond), expected, rtol=1e-5, atol=1e-5)


def test_an_offline_hub_id_names_model_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = "stabilityai/stable-diffusion-3-medium-diffusers"
    with pytest.raises(ModelLoadError, match=f"model.path='{path}'"):
        load({**TINY_SD3, "kind": "pretrained", "family": "sd3", "path": path, "resolution": 1024})


def test_full_size_architectures_have_their_parameter_counts():
    with torch.device("meta"):  # shapes only, nothing allocated: SD3-medium ~7.7 B, FLUX.1-dev ~16.9 B parameters
        sd3, flux = build_sd3_arch(), build_flux_arch()
    count = {(family, name): sum(p.numel() for p in module.parameters())
             for family, modules in (("sd3", sd3), ("flux", flux)) for name, module in modules.items()
             if isinstance(module, torch.nn.Module)}
    assert count["sd3", "transformer"] == 2_028_328_000  # stabilityai/stable-diffusion-3-medium-diffusers
    assert count["flux", "transformer"] == 11_901_408_320  # black-forest-labs/FLUX.1-dev
    assert count["sd3", "text_encoder_3"] == count["flux", "text_encoder_2"] == 4_762_310_656  # T5 v1.1 XXL encoder
    assert count["sd3", "text_encoder_2"] == 694_659_840  # OpenCLIP ViT-bigG/14 text tower with projection
    assert count["sd3", "vae"] == count["flux", "vae"] == 83_819_683  # the 16-channel VAE
    assert FAMILIES["sd3"].random_archs == {"sd3": build_sd3_arch}
    assert FAMILIES["flux"].random_archs == {"flux": build_flux_arch}


def test_flowedit_runs_on_both_with_each_familys_guidance(sd3, flux):
    """SD3: the four CFG rows in one call per step; FLUX-dev: the embedded scales on the [source, target] rows."""
    request = EditRequest(_image(), "a red square", "a blue square", seed=0)
    for m, scales in ((sd3, (3.5, 13.5)), (flux, (1.5, 5.5))):  # conf/editor/flowedit.yaml, flowedit_flux.yaml
        editor = build_editor({"name": "flowedit", "num_steps": 6, "n_max": 4, "source_guidance_scale": scales[0],
                               "target_guidance_scale": scales[1]}, m)
        seen = []
        hook = m.denoiser.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
        try:
            result = editor.edit(request)
        finally:
            hook.remove()
        assert result.nfe == 4 and result.edited.size == (64, 64)
        if m is flux:
            assert seen[0]["guidance"].tolist() == [1.5, 5.5]  # source, target: FLUX's guidance input per row
        assert seen[0]["hidden_states"].shape[0] == (2 if m is flux else 4)
