"""The Qwen-Image family on its tiny random build: loading, conditioning and the denoiser call against diffusers' own
`QwenImagePipeline`, the edit pipelines over the loaded modules, a local diffusers folder and the hub's layout
(`from_pretrained` monkeypatched: no network), a LoRA with a scheduler override fused at load, the refusals (an older
diffusers, an unknown pipeline, the generic editors) and the full-size architecture's parameter counts (meta
device)."""

import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from editlab.editors.base import EditorConfigError, build_editor
from editlab.models.components import ModelLoadError, count_forward_calls
from editlab.models.families import FAMILIES
from editlab.models.families.qwen_image import DEFAULT_SCHEDULER, build_qwen_image_arch, build_tiny_qwen_image
from editlab.models.loading import load_components

TINY = {"name": "tiny_qwen_image_edit", "kind": "tiny", "arch": "qwen_image", "seed": 0, "resolution": 64}
FP32, NO_OFFLOAD = {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}
PROMPTS = ["make the square blue", "a cat"]


def load(model: dict, **options):
    return load_components({**model, **options}, FP32, NO_OFFLOAD, "cpu")


@pytest.fixture(scope="module")
def qwen():
    return load(TINY)


def test_the_tiny_model_loads_as_its_own_family(qwen):
    assert qwen.family is FAMILIES["qwen_image"] and qwen.denoiser is qwen.transformer
    assert (qwen.prediction_type, qwen.vae_scale_factor, qwen.latent_channels) == ("flow", 16, 4)
    assert qwen.options == {"pipeline": "edit", "max_sequence_length": 512}
    assert qwen.scheduler.config.shift_terminal == DEFAULT_SCHEDULER["shift_terminal"] == 0.02
    assert qwen.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == \
        qwen.text_encoder.config.image_token_id  # the processor's image marker is the encoder's
    assert all(not p.requires_grad for p in qwen.transformer.parameters())


def test_conditioning_and_the_denoiser_call_are_the_text_to_image_pipelines(qwen):
    pipe = QwenImagePipeline(scheduler=qwen.scheduler, vae=qwen.vae, text_encoder=qwen.text_encoder,
                             tokenizer=qwen.tokenizer, transformer=qwen.transformer)
    text, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    cond = qwen.conditioning(PROMPTS)
    assert torch.equal(cond.text, text) and torch.equal(cond.added["encoder_hidden_states_mask"], mask)
    assert mask[1].sum() < mask[0].sum()  # the shorter prompt is padded, and its mask says so
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with count_forward_calls(qwen.denoiser) as calls:
        v = qwen.predict(x, 0.5, cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all() and calls["n"] == 1
    with torch.no_grad():  # the pipeline's call: packed latents, the grid as img_shapes, sigma as the timestep
        tokens = qwen.transformer(hidden_states=pipe._pack_latents(x[:, :, None], 2, 4, 4, 4)[:, :, :16],
                                  timestep=torch.tensor([0.5, 0.5]), encoder_hidden_states=text,
                                  encoder_hidden_states_mask=mask, img_shapes=[[(1, 2, 2)]] * 2, return_dict=False)[0]
    torch.testing.assert_close(v, pipe._unpack_latents(tokens, 64, 64, 16)[:, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "cls"), [("edit", QwenImageEditPipeline), ("edit_plus", QwenImageEditPlusPipeline)])
def test_the_edit_pipelines_run_over_the_loaded_modules(kind, cls):
    m = load(TINY, pipeline=kind)
    pipe = m.family.pipeline(m)
    assert type(pipe) is cls and pipe.transformer is m.transformer and pipe.processor is m.processor
    assert pipe.scheduler is m.scheduler


def test_a_local_diffusers_folder_loads_the_same_model(tmp_path, qwen):
    qwen.family.pipeline(qwen).save_pretrained(tmp_path)
    loaded = load({**TINY, "kind": "pretrained", "family": "qwen_image", "path": str(tmp_path)})
    assert loaded.scheduler.config.shift_terminal == 0.02
    cond = loaded.conditioning(PROMPTS)
    assert torch.equal(cond.text, qwen.conditioning(PROMPTS).text)
    for name in ("transformer", "vae", "text_encoder"):
        saved, ours = getattr(loaded, name).state_dict(), getattr(qwen, name).state_dict()
        assert saved.keys() == ours.keys() and all(torch.equal(saved[k], ours[k]) for k in ours)
    x = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(loaded.predict(x, 0.3, cond[:1]), qwen.predict(x, 0.3, cond[:1]), rtol=0, atol=1e-6)


def test_a_hub_id_loads_every_module_from_its_subfolder(monkeypatch):
    """``model=qwen_image_edit_2509``'s layout: each module's class gets the hub id, its subfolder and its dtype
    (the VAE's own), the scheduler its config; no network (the classes' from_pretrained are stand-ins)."""
    built, calls = build_tiny_qwen_image(0), []
    for name, cls in FAMILIES["qwen_image"].modules.items():
        def fake(source, _name=name, **kwargs):
            calls.append((_name, source, kwargs))
            return built[_name]
        monkeypatch.setattr(cls, "from_pretrained", fake)
    monkeypatch.setattr("diffusers.DDIMScheduler.load_config", lambda source, **kwargs: dict(DEFAULT_SCHEDULER))
    monkeypatch.setattr("editlab.models.loading.hub_kwargs", lambda path, key: {})
    m = load_components({"name": "qwen_image_edit_2509", "kind": "pretrained", "family": "qwen_image",
                         "path": "Qwen/Qwen-Image-Edit-2509", "pipeline": "edit_plus", "resolution": 1024},
                        {"dtype": "bfloat16", "vae_dtype": "bfloat16"}, NO_OFFLOAD, "cpu")
    assert {name: source for name, source, _ in calls} == dict.fromkeys(
        ("transformer", "vae", "text_encoder", "tokenizer", "processor"), "Qwen/Qwen-Image-Edit-2509")
    kwargs = {name: kw for name, _, kw in calls}
    assert all(kw["subfolder"] == name for name, kw in kwargs.items())
    assert kwargs["transformer"]["dtype"] == kwargs["vae"]["dtype"] == torch.bfloat16
    assert "dtype" not in kwargs["processor"] and "dtype" not in kwargs["tokenizer"]
    assert m.transformer.dtype == m.vae.dtype == torch.bfloat16 and m.options["pipeline"] == "edit_plus"


def test_a_lora_and_its_schedule_are_applied_at_load(tmp_path, qwen):
    """``model.lora`` (a safetensors file in the diffusers format) fused through the pipeline's LoRA loader, and
    ``model.scheduler`` (Lightning's shift) replacing keys of the scheduler config."""
    adapted = build_tiny_qwen_image(0)["transformer"].eval()
    adapted.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                                   init_lora_weights=False))  # random, so that it changes the output
    QwenImageEditPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(adapted),
                                            safe_serialization=True)
    (lora,) = tmp_path.glob("*.safetensors")
    fused = load(TINY, lora=str(lora), scheduler={"base_shift": 1.0986, "max_shift": 1.0986, "shift_terminal": None})
    assert (fused.scheduler.config.base_shift, fused.scheduler.config.shift_terminal) == (1.0986, None)
    x, cond = torch.randn(1, 4, 4, 4), qwen.conditioning(PROMPTS[:1])
    with torch.no_grad():
        expected = qwen.derive(transformer=adapted).predict(x, 0.5, cond)
    assert (expected - qwen.predict(x, 0.5, cond)).abs().max() > 1e-3  # the LoRA does change the velocity
    torch.testing.assert_close(fused.predict(x, 0.5, cond), expected, rtol=1e-5, atol=1e-5)
    assert not any("lora" in name for name, _ in fused.transformer.named_modules())  # fused, adapters unloaded


def test_refusals_name_what_to_do(monkeypatch, qwen):
    with pytest.raises(ModelLoadError, match="model.pipeline='plus'; expected edit or edit_plus"):
        load(TINY, pipeline="plus")
    with pytest.raises(ModelLoadError, match="model.resolution=72 must be a multiple of 32"):
        load(TINY, resolution=72)
    with pytest.raises(EditorConfigError, match="editor ddim runs on the generic model families, not on qwen_image; "
                                                "editors for qwen_image models: qwen_image_edit"):
        build_editor({"name": "ddim", "num_steps": 2}, qwen)
    # an older diffusers (without the Qwen-Image classes): refused at load, naming both versions
    monkeypatch.setitem(sys.modules, "diffusers", SimpleNamespace(__version__="0.34.0"))
    with pytest.raises(ModelLoadError, match=r"QwenImageTransformer2DModel is not in the installed diffusers 0\.34\.0"
                                             r"; it needs diffusers >= 0\.35\.0"):
        load(TINY)


def test_the_full_size_architecture_has_its_parameter_counts():
    with torch.device("meta"):  # shapes only: Qwen-Image-Edit ~28.8 B parameters
        modules = build_qwen_image_arch()
    count = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()
             if isinstance(module, torch.nn.Module)}
    assert count["transformer"] == 20_430_401_088  # Qwen/Qwen-Image(-Edit) transformer
    assert count["text_encoder"] == 8_292_166_656  # Qwen/Qwen2.5-VL-7B-Instruct
    assert count["vae"] == 126_892_531
    assert all(p.dtype == torch.bfloat16 for p in modules["transformer"].parameters())
    assert torch.get_default_dtype() == torch.float32  # restored
    assert modules["processor"].image_processor.size["longest_edge"] == 12845056  # Qwen2.5-VL-7B-Instruct's max_pixels
