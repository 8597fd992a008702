"""Loader tests for the model kinds beyond tiny SD: tiny IP2P / SDXL, pretrained SDXL-family directories (with
standalone UNet / VAE), LoRA loading (fused or not, always before offload) and the full-size SDXL architecture."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image
from transformers import CLIPTextModelWithProjection

import editlab.models.loading as loading
from editlab.models.builders import build_sdxl_arch, build_tiny, build_tiny_sdxl
from editlab.models.components import ModelLoadError
from editlab.models.loading import load_components

FP32 = {"dtype": "float32", "vae_dtype": "float32"}
NO_OFFLOAD = {"mode": "none"}
TINY_SDXL = {"name": "tiny_sdxl", "kind": "tiny", "arch": "sdxl", "seed": 0, "resolution": 64}


def sdxl_unet_inputs() -> dict:
    """One call's inputs for the tiny SDXL UNet: latents, text states [1, 77, 64], pooled text, micro-conditioning."""
    torch.manual_seed(0)
    return {
        "sample": torch.randn(1, 4, 16, 16), "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(1, 77, 64),
        "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64.0]])},
    }


def has_lora_layers(module: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A random (non-zero) LoRA for the tiny SDXL UNet in the diffusers format, plus the adapted UNet as reference."""
    unet = build_tiny_sdxl(0)["unet"].eval()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder, unet


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    """The tiny SDXL model saved in the diffusers layout, to exercise the real `from_pretrained` path."""
    modules = build_tiny_sdxl(0)
    modules.pop("controlnet")
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    StableDiffusionXLPipeline(**modules, scheduler=loading.sd_scheduler(steps_offset=1),
                              add_watermarker=False).save_pretrained(folder)
    return folder


def test_tiny_sd_is_unchanged():
    c = load_components({"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64}, FP32, NO_OFFLOAD, "cpu")
    unet = build_tiny(0)[0]
    assert c.unet.config.in_channels == 4 and c.family.name == "sd" and set(c.modules) == set(c.family.modules)
    assert all(torch.equal(a, b) for a, b in zip(c.unet.state_dict().values(), unet.state_dict().values()))
    # The loader's internal pipeline must not rewrite the reference DDIM convention of the shared scheduler.
    assert c.scheduler.config.steps_offset == 0 and c.pipeline is None and c.offload == "none"


def test_tiny_ip2p_has_eight_input_channels_and_the_tiny_vae():
    c = load_components({"name": "tiny_ip2p", "kind": "tiny", "arch": "ip2p", "resolution": 64}, FP32, NO_OFFLOAD,
                        "cpu")
    assert c.unet.config.in_channels == 8 and c.unet.config.out_channels == 4
    vae = build_tiny(0)[1]
    assert all(torch.equal(a, b) for a, b in zip(c.vae.state_dict().values(), vae.state_dict().values()))


def test_tiny_sdxl_components():
    c = load_components(TINY_SDXL, FP32, NO_OFFLOAD, "cpu")
    assert isinstance(c.text_encoder_2, CLIPTextModelWithProjection) and c.tokenizer_2 is not None
    assert c.unet.config.addition_embed_type == "text_time"
    assert c.controlnet is not None and c.controlnet.config.addition_embed_type == "text_time"
    assert c.latent_size == 16
    latent = c.encode_image(Image.new("RGB", (64, 64), (200, 40, 90)))
    assert latent.shape == (1, 4, 16, 16)
    assert c.decode_latents(latent)[0].size == (64, 64)
    with torch.no_grad():
        out = c.unet(**sdxl_unet_inputs()).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(NotImplementedError, match="sdxl-family model: its denoiser takes more than token"):
        c.encode_prompts(["a cat"])


def test_bad_arch_kind_family_raise_clear_errors():
    with pytest.raises(ModelLoadError, match="model.arch='sd4'"):
        load_components({**TINY_SDXL, "arch": "sd4"}, FP32, NO_OFFLOAD, "cpu")
    with pytest.raises(ModelLoadError, match="model.arch='nope'"):
        load_components({"name": "x", "kind": "random_arch", "arch": "nope", "resolution": 64}, FP32, NO_OFFLOAD,
                        "cpu")
    with pytest.raises(ModelLoadError, match="model.family='flux2'"):
        load_components({"name": "x", "kind": "pretrained", "family": "flux2", "path": "x/y", "resolution": 64}, FP32,
                        NO_OFFLOAD, "cpu")
    with pytest.raises(ValueError, match="offload.mode='disk'"):
        load_components(TINY_SDXL, FP32, {"mode": "disk"}, "cpu")


def test_pretrained_sdxl_directory_with_standalone_unet_and_vae(tiny_sdxl_dir):
    model = {"name": "x", "kind": "pretrained", "family": "sdxl", "path": str(tiny_sdxl_dir), "resolution": 64}
    c = load_components(model, FP32, NO_OFFLOAD, "cpu")
    reference = build_tiny_sdxl(0)
    assert isinstance(c.text_encoder_2, CLIPTextModelWithProjection)
    for name in ("unet", "vae", "text_encoder_2"):
        expected = reference[name].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in getattr(c, name).state_dict().items()), name
    assert c.controlnet is None  # pretrained ControlNets are the editor's choice

    # Standalone UNet / VAE folders (here: the same weights, at the root of their own folders).
    c2 = load_components({**model, "unet_path": str(tiny_sdxl_dir / "unet"), "vae_path": str(tiny_sdxl_dir / "vae")},
                         FP32, NO_OFFLOAD, "cpu")
    assert torch.equal(c2.unet.conv_in.weight, c.unet.conv_in.weight)
    with pytest.raises(ModelLoadError, match="model.unet_path="):
        load_components({**model, "unet_path": str(tiny_sdxl_dir / "missing")}, FP32, NO_OFFLOAD, "cpu")
    with pytest.raises(ModelLoadError, match="model.vae_path="):
        load_components({**model, "vae_path": str(tiny_sdxl_dir / "text_encoder")}, FP32, NO_OFFLOAD, "cpu")
    with pytest.raises(ModelLoadError, match="model.path="):
        load_components({**model, "path": str(tiny_sdxl_dir / "missing")}, FP32, NO_OFFLOAD, "cpu")


def test_sd_folder_loaded_as_sdxl_names_model_path(tmp_path):
    unet, vae, text_encoder, tokenizer = build_tiny(0, in_channels=8)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=loading.sd_scheduler(steps_offset=1), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path)
    model = {"name": "x", "kind": "pretrained", "family": "sd", "path": str(tmp_path), "resolution": 64}
    assert load_components(model, FP32, NO_OFFLOAD, "cpu").unet.config.in_channels == 8  # an IP2P-shaped folder
    with pytest.raises(ModelLoadError, match="model.path="):  # an SD-family folder has no text_encoder_2
        load_components({**model, "family": "sdxl"}, FP32, NO_OFFLOAD, "cpu")


def test_sdxl_vae_that_needs_upcasting_is_refused_in_float16(tiny_sdxl_dir, tmp_path):
    vae_dir = tmp_path / "vae"
    build_tiny_sdxl(0)["vae"].save_pretrained(vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    (vae_dir / "config.json").write_text(json.dumps({**config, "force_upcast": True}))  # like the stock SDXL VAE
    model = {"name": "x", "kind": "pretrained", "family": "sdxl", "path": str(tiny_sdxl_dir), "resolution": 64,
             "vae_path": str(vae_dir), "vae_dtype": "float16"}
    with pytest.raises(ModelLoadError, match="sdxl-vae-fp16-fix"):
        load_components(model, FP32, NO_OFFLOAD, "cpu")
    assert load_components({**model, "vae_dtype": None}, FP32, NO_OFFLOAD, "cpu").vae_dtype == torch.float32


@pytest.mark.parametrize("fuse", [True, False])
def test_lora_is_loaded_and_applied(tiny_lora, fuse):
    folder, adapted = tiny_lora
    plain = load_components(TINY_SDXL, FP32, NO_OFFLOAD, "cpu")
    c = load_components({**TINY_SDXL, "lora": str(folder), "lora_fuse": fuse}, FP32, NO_OFFLOAD, "cpu")
    with torch.no_grad():
        expected, got, base = (net(**sdxl_unet_inputs()).sample for net in (adapted, c.unet, plain.unet))
    assert (expected - base).abs().max() > 1e-2  # the LoRA does change the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert has_lora_layers(c.unet) is not fuse  # fused: merged into the weights, adapter layers removed


def test_lora_is_loaded_before_offload_hooks(tiny_lora, monkeypatch):
    folder, _ = tiny_lora
    seen = {}
    attach = loading.attach_pipeline

    def record(components, pipe):
        seen["lora_layers"] = has_lora_layers(components.unet)
        attach(components, pipe)

    monkeypatch.setattr(loading, "attach_pipeline", record)
    load_components({**TINY_SDXL, "lora": str(folder), "lora_fuse": False}, FP32, {"mode": "model"}, "cpu")
    assert seen == {"lora_layers": True}


def test_missing_lora_names_its_key():
    with pytest.raises(ModelLoadError, match="model.lora="):
        load_components({**TINY_SDXL, "lora": "/nonexistent/lora"}, FP32, NO_OFFLOAD, "cpu")


def test_sdxl_arch_has_sdxl_parameter_counts():
    with torch.device("meta"):  # shapes only: the real thing is ~3.5 B parameters
        modules = build_sdxl_arch()
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()
             if isinstance(m, torch.nn.Module)}
    assert count["unet"] == 2_567_463_684  # SDXL 1.0 base UNet
    assert count["text_encoder_2"] == 694_659_840  # OpenCLIP ViT-bigG/14 text tower with projection
    assert 1.2e9 < count["controlnet"] < 1.3e9  # controlnet-canny-sdxl-1.0: the UNet's encoder + zero convolutions
