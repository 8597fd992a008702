"""The trained instruction editors on tiny random models: FLUX.1 Kontext (`editors.flux_kontext`) and Qwen-Image-Edit
(`editors.qwen_image_edit`). Their NFE formulas, the Kontext reference and output sizes (the pipeline's own encoding
and size rule), every setting reaching the pipeline, the refusals (another model, no instruction, an older
diffusers, mismatched dtypes), the shared model unchanged after an edit and `close`, and flux_kontext_dev's hub and
local loading."""

import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from editlab.editors import flux_kontext
from editlab.editors.base import EditorConfigError, EditRequest, build_editor
from editlab.models.components import ModelLoadError
from editlab.models.families import FAMILIES
from editlab.models.families.flux import build_tiny_flux, unpack
from editlab.models.loading import load_components

CONF = Path(__file__).resolve().parents[2] / "editlab" / "conf" / "model"
FP32, NO_OFFLOAD = {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}
TINY_KONTEXT = {"name": "tiny_flux_kontext", "kind": "tiny", "arch": "flux", "kontext": True, "resolution": 64}
TINY_QWEN = {"name": "tiny_qwen_image_edit", "kind": "tiny", "arch": "qwen_image", "resolution": 64}
KONTEXT = {"name": "flux_kontext", "num_steps": 2, "auto_resize": False}
QWEN = {"name": "qwen_image_edit", "num_steps": 2}


@pytest.fixture(scope="module")
def kontext():
    return load_components(TINY_KONTEXT, FP32, NO_OFFLOAD, "cpu")


@pytest.fixture(scope="module")
def qwen():
    return load_components(TINY_QWEN, FP32, NO_OFFLOAD, "cpu")


def _image(size=(64, 64)) -> Image.Image:
    pixels = np.full((size[1], size[0], 3), 30, np.uint8)
    pixels[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = (200, 40, 40)
    return Image.fromarray(pixels)


def _request(instruction="make the square blue", size=(64, 64)) -> EditRequest:
    return EditRequest(_image(size), "a red square", "a blue square", instruction, seed=3)


def _fingerprint(m) -> dict:
    """Everything of the shared model an editor could leave changed: weights, dtypes, attention processors, the
    scheduler's config and stepping state."""
    state = {}
    for name, module in m.modules.items():
        if isinstance(module, torch.nn.Module):
            digest = hashlib.sha256()
            for key, tensor in module.state_dict().items():
                digest.update(key.encode() + tensor.float().numpy().tobytes())
            processors = getattr(module, "attn_processors", {})
            state[name] = (digest.hexdigest(), module.dtype, module.training,
                           sorted((k, type(v).__name__) for k, v in processors.items()))
    state["scheduler"] = (dict(m.scheduler.config), m.scheduler.step_index, len(m.scheduler.timesteps))
    return state


class Spy:
    """A pipeline whose calls are recorded (their keyword arguments) and passed on."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)


def test_kontext_costs_one_call_per_step_and_two_with_true_cfg(kontext):
    with build_editor(KONTEXT, kontext) as editor:
        result = editor.edit(_request())
    assert result.nfe == 2 and result.edited.size == (64, 64)
    with build_editor({**KONTEXT, "true_cfg_scale": 2.0, "negative_prompt": " "}, kontext) as editor:
        assert editor.edit(_request()).nfe == 4
    with build_editor({**KONTEXT, "num_steps": 3}, kontext) as editor:
        assert editor.edit(_request()).nfe == 3


def test_kontext_encodes_the_reference_as_the_pipeline_does(kontext):
    """The editor encodes the reference itself (its VAE's dtype); in fp32 that is the pipeline's own encoding of
    the image, so the edit is the pipeline's."""
    request = _request()
    with build_editor(KONTEXT, kontext) as editor:
        result = editor.edit(request)
        tokens = editor.pipe(image=request.image, prompt=request.instruction, height=64, width=64, max_area=64 ** 2,
                             num_inference_steps=2, guidance_scale=2.5, _auto_resize=False,
                             generator=request.generator(), output_type="latent").images
    expected = kontext.decode_latents(unpack(tokens.float(), 16, 16))[0]
    difference = np.abs(np.asarray(result.edited, np.int16) - np.asarray(expected, np.int16))
    assert difference.max() <= 1  # uint8 rounding of the same image


def test_kontext_sizes_follow_the_pipeline(kontext, monkeypatch):
    assert flux_kontext.reference_size(512, 512, True, 16) == (1024, 1024)  # preferred: the nearest aspect
    assert flux_kontext.reference_size(768, 512, True, 16) == (1248, 832)
    assert flux_kontext.reference_size(100, 70, False, 16) == (96, 64)  # own size, floored
    assert flux_kontext.kontext_size(512, 512, 1024 ** 2, 16) == (1024, 1024)
    assert flux_kontext.kontext_size(768, 512, 512 ** 2, 16) == (624, 416)
    # auto_resize: the preferred entry nearest the image's aspect (here a tiny list of them) goes to the VAE
    monkeypatch.setattr("diffusers.pipelines.flux.pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS",
                        [(96, 32), (48, 48), (32, 96)])
    encoded, encode = [], flux_kontext.vae_encode
    monkeypatch.setattr(flux_kontext, "vae_encode", lambda vae, pixels: encoded.append(pixels.shape) or
                        encode(vae, pixels))
    with build_editor({**KONTEXT, "auto_resize": True, "max_area": 48 ** 2}, kontext) as editor:
        result = editor.edit(_request())
    # a 48² output (max_area) is resized back to the source's 64² for the metrics
    assert encoded == [(1, 3, 48, 48)] and result.edited.size == (64, 64) and result.nfe == 2


def test_kontext_settings_reach_the_pipeline(kontext):
    settings = {"num_steps": 3, "guidance_scale": 4.0, "max_area": 56 ** 2, "true_cfg_scale": 1.5,
                "negative_prompt": "blurry"}
    with build_editor({**KONTEXT, **settings}, kontext) as editor:
        editor.pipe = spy = Spy(editor.pipe)
        result = editor.edit(_request("turn it green"))
    (call,) = spy.calls
    assert (call["num_inference_steps"], call["guidance_scale"], call["max_area"], call["true_cfg_scale"],
            call["negative_prompt"], call["prompt"]) == (3, 4.0, 56 ** 2, 1.5, "blurry", "turn it green")
    assert call["max_sequence_length"] == 512 and call["image"].shape == (1, 16, 16, 16)  # the encoded reference
    assert result.nfe == 6 and result.edited.size == (64, 64)


def test_kontext_refusals(kontext, monkeypatch):
    tiny_flux = load_components({**TINY_KONTEXT, "name": "tiny_flux", "kontext": False}, FP32, NO_OFFLOAD, "cpu")
    with pytest.raises(EditorConfigError, match="needs a FLUX.1 Kontext model .* model=tiny_flux is not one"):
        build_editor(KONTEXT, tiny_flux)
    with pytest.raises(EditorConfigError, match="true_cfg_scale=2.0 needs editor.negative_prompt"):
        build_editor({**KONTEXT, "true_cfg_scale": 2.0}, kontext)
    with pytest.raises(EditorConfigError, match="max_area=16 is below one token"):
        build_editor({**KONTEXT, "max_area": 16}, kontext)
    with pytest.raises(EditorConfigError, match="runs on the flux model families, not on sd"):
        build_editor(KONTEXT, load_components({"name": "tiny", "kind": "tiny", "resolution": 64}, FP32, NO_OFFLOAD,
                                              "cpu"))
    with build_editor(KONTEXT, kontext) as editor, pytest.raises(ValueError, match="has no editing instruction"):
        editor.edit(_request(instruction=" "))
    with build_editor(KONTEXT, kontext) as editor:  # past CLIP's 77 tokens: only its pooled vector is cut
        assert editor.edit(_request(instruction="make it " + "very " * 50 + "blue")).nfe == 2
    with build_editor(KONTEXT, kontext) as editor, pytest.raises(ValueError, match=r"T5 \(model.max_sequence_length"):
        editor.edit(_request(instruction="make it " + "very " * 600 + "blue"))  # T5's 512: refused, not cut
    monkeypatch.setitem(sys.modules, "diffusers", SimpleNamespace(__version__="0.34.0"))  # an older diffusers
    with pytest.raises(ModelLoadError, match=r"FluxKontextPipeline is not in the installed diffusers 0\.34\.0; it "
                                             r"needs diffusers >= 0\.35\.0"):
        build_editor(KONTEXT, kontext)


@pytest.mark.parametrize("editor_config", [KONTEXT, QWEN], ids=["flux_kontext", "qwen_image_edit"])
def test_the_shared_model_is_unchanged_after_an_edit_and_close(editor_config, kontext, qwen):
    m = kontext if editor_config is KONTEXT else qwen
    before = _fingerprint(m)
    with build_editor(editor_config, m) as editor:
        editor.edit(_request())
        assert editor.pipe.scheduler is not m.scheduler  # the pipeline steps a scheduler of its own
    assert _fingerprint(m) == before


@pytest.mark.parametrize("pipeline", ["edit", "edit_plus"])
def test_qwen_costs_two_calls_per_step_with_true_cfg_and_one_without(pipeline, qwen):
    m = qwen if pipeline == "edit" else load_components({**TINY_QWEN, "pipeline": pipeline}, FP32, NO_OFFLOAD, "cpu")
    with build_editor(QWEN, m) as editor:
        result = editor.edit(_request())
    assert result.nfe == 2 * 2 and result.edited.size == (64, 64) and result.edited.mode == "RGB"
    with build_editor({**QWEN, "true_cfg_scale": 1.0}, m) as editor:  # a Lightning LoRA's setting
        assert editor.edit(_request()).nfe == 2


def test_qwen_settings_reach_the_pipeline(qwen):
    with build_editor({**QWEN, "num_steps": 3, "true_cfg_scale": 2.5, "negative_prompt": "low quality"},
                      qwen) as editor:
        editor.pipe = spy = Spy(editor.pipe)
        result = editor.edit(_request("turn it green"))
    (call,) = spy.calls
    assert (call["num_inference_steps"], call["true_cfg_scale"], call["negative_prompt"], call["prompt"]) == (
        3, 2.5, "low quality", "turn it green")
    assert (call["height"], call["width"], call["max_sequence_length"]) == (64, 64, 512) and result.nfe == 6
    with build_editor({**QWEN, "true_cfg_scale": 1.0}, qwen) as editor:  # CFG off: no negative prompt to encode
        editor.pipe = spy = Spy(editor.pipe)
        editor.edit(_request())
    assert spy.calls[0]["negative_prompt"] is None
    with build_editor({**QWEN, "max_area": 64 * 128}, qwen) as editor:  # the pipelines' own sizing at max_area
        editor.pipe = spy = Spy(editor.pipe)
        wide = editor.edit(EditRequest(Image.new("RGB", (80, 40), (90, 120, 40)), "", "", "turn it green"))
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    assert (spy.calls[0]["width"], spy.calls[0]["height"]) == calculate_dimensions(64 * 128, 2.0)[:2] == (128, 64)
    assert wide.edited.size == (80, 40)  # back at the source's size for the metrics


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_a_grey_or_rgba_source_is_edited_as_rgb(mode, kontext, qwen):
    source = Image.new(mode, (64, 64), 120)
    for config, model in ((KONTEXT, kontext), ({**QWEN, "num_steps": 2}, qwen)):
        with build_editor(config, model) as editor:
            result = editor.edit(EditRequest(source, "", "", "turn it green"))
        assert result.edited.mode == "RGB" and result.edited.size == (64, 64)


def test_kontext_refuses_a_source_too_narrow_for_one_token(kontext):
    too_narrow = r"a 7x64 source gives a 0x64 reference .* below one \d+-pixel"
    with build_editor(KONTEXT, kontext) as editor, pytest.raises(ValueError, match=too_narrow):
        editor.edit(EditRequest(Image.new("RGB", (7, 64)), "", "", "turn it green"))


def test_qwen_refusals(qwen, monkeypatch):
    with pytest.raises(EditorConfigError, match="true_cfg_scale=4.0 needs editor.negative_prompt"):
        build_editor({**QWEN, "negative_prompt": None}, qwen)
    mixed = load_components(TINY_QWEN, {"dtype": "float32", "vae_dtype": "bfloat16"}, NO_OFFLOAD, "cpu")
    with pytest.raises(EditorConfigError, match="shift_terminal=0.02: with one step that is 0/0"):
        build_editor({**QWEN, "num_steps": 1}, qwen)  # diffusers' stretch of a one-step schedule is NaN
    lightning = load_components({**TINY_QWEN, "scheduler": {"shift_terminal": None}}, FP32, NO_OFFLOAD, "cpu")
    with build_editor({**QWEN, "num_steps": 1, "true_cfg_scale": 1.0}, lightning) as editor:  # no stretch: fine
        assert editor.edit(_request()).nfe == 1
    with pytest.raises(EditorConfigError, match=r"set model.vae_dtype=\$\{precision.dtype\}"):
        build_editor(QWEN, mixed)
    with build_editor(QWEN, qwen) as editor, pytest.raises(ValueError, match="has no editing instruction"):
        editor.edit(_request(instruction=""))
    monkeypatch.setitem(sys.modules, "diffusers", SimpleNamespace(__version__="0.34.0"))
    with pytest.raises(ModelLoadError, match=r"QwenImageEditPipeline is not in the installed diffusers 0\.34\.0"):
        build_editor(QWEN, qwen)


def test_flux_kontext_dev_loads_from_its_hub_id_or_a_local_folder(tmp_path, monkeypatch, kontext):
    """``model=flux_kontext_dev``: every FLUX module from black-forest-labs/FLUX.1-Kontext-dev's subfolders, the
    networks in bf16 and the VAE in fp32 (no network: the classes' from_pretrained are stand-ins); the same config
    with a local diffusers folder as its path edits."""
    config = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / "flux_kontext_dev.yaml")).items()
              if k != "defaults"}
    kontext.family.pipeline(kontext).save_pretrained(tmp_path / "kontext")
    local = load_components({**config, "path": str(tmp_path / "kontext"), "resolution": 64}, FP32, NO_OFFLOAD,
                            "cpu")
    with build_editor(KONTEXT, local) as editor:
        assert editor.edit(_request()).nfe == 2

    built, calls = build_tiny_flux(0), []
    for name, cls in FAMILIES["flux"].modules.items():
        def fake(source, _name=name, **kwargs):
            calls.append((_name, source, kwargs))
            return built[_name]
        monkeypatch.setattr(cls, "from_pretrained", fake)
    monkeypatch.setattr("diffusers.DDIMScheduler.load_config", lambda source, **kwargs: dict(kontext.scheduler.config))
    monkeypatch.setattr("editlab.models.loading.hub_kwargs", lambda path, key: {})
    m = load_components({**config, "resolution": 64}, {"dtype": "bfloat16", "vae_dtype": "float32"}, NO_OFFLOAD,
                        "cpu")
    assert {source for _, source, _ in calls} == {"black-forest-labs/FLUX.1-Kontext-dev"}
    kwargs = {name: kw for name, _, kw in calls}
    assert all(kw["subfolder"] == name for name, kw in kwargs.items()) and len(kwargs) == 6
    assert kwargs["transformer"]["dtype"] == kwargs["text_encoder_2"]["dtype"] == torch.bfloat16
    assert kwargs["vae"]["dtype"] == torch.float32 and m.options["kontext"] is True


@pytest.mark.parametrize(("model", "editor_config", "vae_dtype"), [(TINY_KONTEXT, KONTEXT, "float32"),
                                                                   (TINY_QWEN, QWEN, "bfloat16")],
                         ids=["flux_kontext", "qwen_image_edit"])
def test_a_bf16_transformer_edits_as_on_a_gpu(model, editor_config, vae_dtype):
    """The GPU configurations: Kontext's bf16 networks with the fp32 VAE (the editor encodes the reference itself),
    Qwen's VAE in the compute dtype (its pipeline encodes the reference in it)."""
    m = load_components(model, {"dtype": "bfloat16", "vae_dtype": vae_dtype}, NO_OFFLOAD, "cpu")
    with build_editor({**editor_config, "num_steps": 2}, m) as editor:
        result = editor.edit(_request())
    assert result.edited.size == (64, 64) and result.nfe == (2 if editor_config is KONTEXT else 4)
    assert np.asarray(result.edited).std() > 0  # an image, not a constant fill


@pytest.mark.parametrize(("model", "editor_config"), [(TINY_KONTEXT, KONTEXT), (TINY_QWEN, QWEN)],
                         ids=["flux_kontext", "qwen_image_edit"])
def test_a_nan_edit_is_an_error_not_an_image(model, editor_config):
    m = load_components(model, FP32, NO_OFFLOAD, "cpu")  # its own: the hook below breaks the transformer
    m.transformer.register_forward_hook(lambda module, args, out: (out[0] * float("nan"),))
    with build_editor(editor_config, m) as editor, pytest.raises(FloatingPointError, match="NaN/inf.*float32"):
        editor.edit(_request())
