from pathlib import Path

import pytest
import torch
from conftest import FP32, NO_OFFLOAD, TINY
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from editlab.models.builders import build_tiny
from editlab.models.components import ModelLoadError, PromptTooLongError
from editlab.models.loading import load_components, sd_scheduler


def test_tiny_components(tiny_components):
    c = tiny_components
    assert (c.resolution, c.vae_scale_factor, c.latent_size) == (64, 4, 16)
    assert all(isinstance(p, AttnProcessor2_0) for p in c.unet.attn_processors.values())  # fused kernel
    assert c.encode_prompts(["a red circle", ""]).shape == (2, 77, 32)
    assert c.scheduler.config.steps_offset == 0 and not c.scheduler.config.set_alpha_to_one
    assert torch.equal(c.scheduler.final_alpha_cumprod, c.scheduler.alphas_cumprod[0])


def test_prompt_over_77_tokens_is_a_clear_error(tiny_components):
    with pytest.raises(PromptTooLongError, match="at most 77"):
        tiny_components.encode_prompts(["x" * 80])


def test_half_precision_keeps_vae_in_fp32():
    c = load_components(TINY, {"dtype": "bfloat16", "vae_dtype": "float32"}, NO_OFFLOAD, "cpu")
    assert c.unet.dtype == torch.bfloat16 and c.text_encoder.dtype == torch.bfloat16 and c.vae.dtype == torch.float32
    latent = c.encode_image(__import__("PIL.Image").Image.new("RGB", (64, 64), "red"))
    assert latent.dtype == torch.float32
    eps = c.predict(latent, 500, c.encode_prompts(["a"]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_channels_last_changes_the_layout_not_the_results(tiny_components):
    c = load_components(TINY, {**FP32, "channels_last": True}, NO_OFFLOAD, "cpu")
    assert c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    image = __import__("PIL.Image").Image.new("RGB", (64, 64), "red")
    latent = c.encode_image(image)
    # other convolution algorithms (same maths): float32 rounding only
    torch.testing.assert_close(latent, tiny_components.encode_image(image), atol=1e-3, rtol=0)
    cond = c.encode_prompts(["a"])
    torch.testing.assert_close(c.predict(latent, 500, cond), tiny_components.predict(latent, 500, cond),
                               atol=1e-3, rtol=0)


def test_nan_latents_are_reported_not_decoded(tiny_components):
    with pytest.raises(FloatingPointError, match="NaN"):
        tiny_components.decode_latents(torch.full((1, 4, 16, 16), float("nan")))


def test_pretrained_loads_a_local_diffusers_folder(tmp_path, tiny_components):
    unet, vae, text_encoder, tokenizer = build_tiny(seed=0)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=sd_scheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "model")
    cfg = {"name": "local", "kind": "pretrained", "path": str(tmp_path / "model"), "resolution": 64}
    c = load_components(cfg, FP32, NO_OFFLOAD, "cpu")
    assert c.scheduler.config.steps_offset == 0  # the reference DDIM conventions, whatever the checkpoint says
    text = c.encode_prompts(["a blue square"])
    assert torch.allclose(text, tiny_components.encode_prompts(["a blue square"]))
    z = torch.randn(1, 4, 16, 16)
    assert torch.allclose(c.predict(z, 10, text), tiny_components.predict(z, 10, text), atol=1e-6)


def test_relative_local_paths_fall_back_to_the_repository(tmp_path, monkeypatch):
    from editlab.models.hub import REPO_ROOT, resolve_local

    monkeypatch.chdir(tmp_path)
    assert resolve_local("./conf") == REPO_ROOT / "conf"  # shipped folders load from any working directory
    (tmp_path / "conf").mkdir()
    assert resolve_local("./conf") == Path("./conf")  # the working directory's own folder wins


def test_missing_local_weights_name_model_path(tmp_path):
    cfg = {"name": "sd14", "kind": "pretrained", "path": str(tmp_path / "nowhere"), "resolution": 512}
    with pytest.raises(ModelLoadError, match="model.path"):
        load_components(cfg, FP32, NO_OFFLOAD, "cpu")


def test_offline_hub_id_names_model_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"name": "sd14", "kind": "pretrained", "path": "CompVis/stable-diffusion-v1-4", "resolution": 512}
    with pytest.raises(ModelLoadError, match="model.path='CompVis/stable-diffusion-v1-4'"):
        load_components(cfg, FP32, NO_OFFLOAD, "cpu")


def test_unknown_kind_and_offload_on_cpu(caplog):
    with pytest.raises(ModelLoadError, match="unknown model.kind"):
        load_components({"name": "x", "kind": "nope", "resolution": 64}, FP32, NO_OFFLOAD, "cpu")
    c = load_components(TINY, FP32, {"mode": "model"}, "cpu")
    assert c.pipeline is None and "no effect on CPU" in caplog.text
