"""The iCD metric suite against the packages it follows, offline: the toy CLIP, a tiny random DINOv2, and random
VGG16 / LPIPS-head / InceptionV3 weights placed in a temporary torch hub cache under the names torchvision, piq and
torch-fidelity look for (torch.hub loads a cached file without downloading it)."""

import logging
import math
import sys
import types
import warnings
from logging.handlers import BufferingHandler

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.functional.multimodal import clip_score
from transformers import (
    AutoTokenizer,
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    Dinov2Config,
    Dinov2Model,
)

from editlab.evaluation.paper_metrics import (
    INCEPTION_FILE,
    PIQ_LPIPS_FILE,
    VGG16_FILE,
    ICDPaperMetrics,
    build_icd_metrics,
    fid_image,
    lpips_input,
    psnr_uint8,
)
from editlab.evaluation.protocol import build_metrics
from editlab.models.hub import REPO_ROOT
from editlab.toyworld.scenes import random_scene

TOY_CLIP = str(REPO_ROOT / "weights" / "toy" / "clip")
OFF = {"clip": {"path": None}, "dinov2": {"backbone": None}, "image_reward": {"path": None}, "lpips": {"net": None},
       "fid": {"backbone": None}}


def load_yaml(name):
    return OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "metrics" / name), resolve=True)


def noisy_scene(rng, shape, noise=0.25):
    """A toy scene (caption included) resized to ``shape`` and mixed with uniform noise: the toy CLIP still
    recognises it (positive scores), and odd sizes exercise the processors' resizing."""
    scene = random_scene(rng)
    base = np.asarray(Image.fromarray(scene.render(128)).resize(shape[::-1]), dtype=np.float64)
    image = (1 - noise) * base + noise * rng.integers(0, 256, base.shape)
    return np.clip(image, 0, 255).astype(np.uint8), scene.caption()


def pair(shape=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    source, prompt = noisy_scene(rng, shape)
    edited, target = noisy_scene(rng, shape)
    return source, edited, prompt, target


# ----------------------------------------------------------------------------------------------------------
# fixtures: random weights in a temporary torch hub cache, a tiny DINOv2


def _random_vgg16_state():
    from torchvision.models import vgg

    features = vgg.make_layers(vgg.cfgs["D"])
    for module in features.modules():
        if isinstance(module, torch.nn.Conv2d):  # torchvision's own VGG init, so activations keep their scale
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vgg.vgg16().state_dict().items() if k.startswith("classifier")}
    # piq only uses `.features`; a stride-0 view keeps the 400 MB classifier out of the file
    return state | {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}


def _random_inception_state():
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as patch:  # build the architecture without any weights
        patch.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.state_dict()


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(_random_vgg16_state(), checkpoints / VGG16_FILE)
    torch.save([torch.rand(1, c, 1, 1) for c in (64, 128, 256, 512, 512)], checkpoints / PIQ_LPIPS_FILE)
    torch.save(_random_inception_state(), checkpoints / INCEPTION_FILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8,
                          image_size=32)
    Dinov2Model(config).eval().save_pretrained(path)
    # dinov2-base's preprocessing at a tenth of the size: shortest edge (256 ->) 40 bicubic, centre crop 32
    BitImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def paper(torch_home, dinov2_dir):
    """Every backbone but ImageReward, as in the paper, with the toy CLIP and the random weights."""
    cfg = {"kind": "icd_paper", "clip": {"path": TOY_CLIP}, "dinov2": {"backbone": "dinov2", "path": str(dinov2_dir)},
           "image_reward": {"path": None}, "lpips": {"net": "vgg"}, "fid": {"backbone": "inception"},
           "on_missing": "error"}
    return build_icd_metrics(cfg)


@pytest.fixture(scope="module")
def toy():
    return build_icd_metrics(load_yaml("icd_paper_toy.yaml"))


def save_images(folder, images):
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


# ----------------------------------------------------------------------------------------------------------
# each metric against its package


class TensorFeatures(torch.nn.Module):
    """transformers 5's get_*_features return model outputs; torchmetrics 1.9's clip_score expects tensors."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_t_matches_torchmetrics_clip_score(toy):
    model = TensorFeatures(CLIPModel.from_pretrained(TOY_CLIP, dtype=torch.float32).eval())
    default = CLIPProcessor.from_pretrained(TOY_CLIP)  # what torchmetrics loads: transformers 5's torchvision backend
    pil = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(TOY_CLIP),
                        tokenizer=AutoTokenizer.from_pretrained(TOY_CLIP))
    rng = np.random.default_rng(0)
    scored = 0
    for shape in [(64, 64), (57, 71), (120, 90), (512, 512), (33, 47), (200, 130)]:
        image, caption = noisy_scene(rng, shape)
        ours = 100 * toy.compute(None, image, None, "", caption)["clip_t"]  # a plain cosine: x100 to compare
        pixels = torch.from_numpy(image).permute(2, 0, 1)
        same_processor = clip_score(pixels, caption, lambda: (model, pil)).item()
        torchvision_resize = clip_score(pixels, caption, lambda: (model, default)).item()
        if ours <= 0:  # torchmetrics clamps at 0
            assert same_processor == torchvision_resize == 0
            continue
        scored += 1
        assert ours == pytest.approx(same_processor, abs=1e-4)  # measured <= 4e-6
        # PIL bicubic (ours, as transformers 4.x) vs torchvision bicubic resize: measured <= 0.022 on the x100 scale
        assert ours == pytest.approx(torchvision_resize, abs=0.05)
    assert scored >= 4



def test_clip_t_is_unscaled_unclamped_and_strips_brackets(toy):
    image, caption = noisy_scene(np.random.default_rng(1), (64, 64))
    values = toy.compute(None, image, None, "", caption)
    bracketed = "[" + caption.replace(" on ", "] on ", 1)
    assert toy.compute(None, image, None, "", bracketed)["clip_t"] == values["clip_t"]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    negative = toy.compute(None, noise, None, "", "a red circle on a gray background")["clip_t"]
    assert 0 < values["clip_t"] <= 1 and -1 <= negative < 0  # no x100, no clamp
    assert math.isfinite(toy.compute(None, image, None, "", "word " * 60)["clip_t"])  # truncated, not an error


def test_clip_i_is_image_image_cosine(toy):
    source, edited, _, _ = pair()
    clip = toy.clip
    expected = torch.nn.functional.cosine_similarity(clip.image_embeds(source), clip.image_embeds(edited), dim=0)
    assert toy.compute(source, edited, None, "", "")["clip_i"] == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (57, 71), (512, 512)])
def test_psnr_matches_torchmetrics(shape):
    source, edited, _, _ = pair(shape)
    expected = peak_signal_noise_ratio(torch.from_numpy(edited).double(), torch.from_numpy(source).double(),
                                       data_range=255.0).item()
    # torchmetrics takes log(data_range) in float32 (it makes a float32 tensor of 255): measured <= 4e-7 dB apart
    assert psnr_uint8(source, edited) == pytest.approx(expected, abs=1e-5)
    mse = np.mean((source.astype(np.float64) - edited) ** 2)
    assert psnr_uint8(source, edited) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-12)
    assert ICDPaperMetrics().compute(source, edited, None, "", "")["psnr_uint8"] == psnr_uint8(source, edited)
    with pytest.raises(ValueError, match="shape"):
        psnr_uint8(source, edited[:32])


def test_lpips_matches_piq_on_224_resized_inputs(paper, torch_home):
    import piq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        direct = piq.LPIPS(reduction="none")
    pairs = [pair((96, 80), seed=3)]
    ours = [paper.compute(s, e, None, "", "")["lpips_vgg"] for s, e, _, _ in pairs]
    x = torch.cat([lpips_input(s) for s, _, _, _ in pairs])
    y = torch.cat([lpips_input(e) for _, e, _, _ in pairs])
    assert x.shape == (1, 3, 224, 224) and 0 <= x.min() and x.max() <= 1  # piq's [0, 1] range, ImageNet-normalised
    # the iCD code's `PIL.Image.resize((224, 224))`: PIL's default filter, bicubic
    resized = Image.fromarray(pairs[0][0]).resize((224, 224))
    assert torch.equal(x[0], torch.from_numpy(np.asarray(resized) / np.float32(255)).permute(2, 0, 1))
    with torch.no_grad():
        expected = direct(x, y)
    assert ours == pytest.approx(expected.tolist(), abs=1e-6) and min(ours) > 0
    assert paper.backbones["lpips_vgg"] == "piq:lpips-vgg16"


def test_dinov2_matches_pooler_output_cosine(paper, dinov2_dir):
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    processor = BitImageProcessorPil.from_pretrained(dinov2_dir)
    source, edited, _, _ = pair((90, 120), seed=5)
    with torch.no_grad():
        pooled = [model(**processor(images=[Image.fromarray(im)], return_tensors="pt")).pooler_output[0]
                  for im in (source, edited)]
    expected = torch.nn.functional.cosine_similarity(*pooled, dim=0).item()
    assert paper.compute(source, edited, None, "", "")["dinov2"] == pytest.approx(expected, abs=1e-6)
    assert paper.backbones["dinov2"] == f"dinov2:{dinov2_dir}"
    assert paper.compute(source, source, None, "", "")["dinov2"] == pytest.approx(1, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# FID


def test_fid_preprocessing_is_lanczos_short_side_256_and_centre_crop(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    expected = Image.fromarray(image).resize((341, 256), Image.Resampling.LANCZOS).crop((42, 0, 298, 256))
    out = fid_image(tmp_path / "a.png")
    assert out.dtype == torch.uint8 and out.shape == (3, 256, 256)
    assert torch.equal(out, torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def fid_folders(tmp_path, n=5):
    rng = np.random.default_rng(0)
    scenes = [noisy_scene(rng, (300, 260), noise=0.1)[0] for _ in range(n)]
    noise = [rng.integers(0, 256, (200, 256, 3), dtype=np.uint8) for _ in range(n)]
    return save_images(tmp_path / "scenes", scenes), save_images(tmp_path / "noise", noise)


def test_fid_with_toy_clip_features(toy, tmp_path):
    scenes, noise = fid_folders(tmp_path)
    assert toy.backbones["fid"] == "clip_vision:./weights/toy/clip"
    same = toy.finish(scenes, scenes)["fid"]
    different = toy.finish(scenes, noise)["fid"]
    assert abs(same) < 1e-3 and different > 1
    assert toy.finish(list(reversed(scenes)), scenes)["fid"] == pytest.approx(same, abs=1e-3)  # order-free
    assert math.isnan(toy.finish(scenes[:1], noise)["fid"]) and math.isnan(toy.finish(scenes, [])["fid"])


def test_fid_with_torch_fidelity_inception(paper, tmp_path):
    scenes, noise = fid_folders(tmp_path, n=3)
    assert paper.backbones["fid"] == "inception:torch-hub" and paper.fid.inception.features_list == ["2048"]
    same = paper.finish(scenes, scenes)["fid"]
    different = paper.finish(scenes, noise)["fid"]
    assert abs(same) < 1e-3 and different > 1


def test_fid_weights_from_a_local_file(torch_home):
    metrics = build_icd_metrics(OFF | {"fid": {"backbone": "inception",
                                                "weights": str(torch_home / "hub" / "checkpoints" / INCEPTION_FILE)}})
    assert metrics.fid is not None and metrics.set_unavailable == [] and metrics.backbones["fid"].endswith(".pth")


# ----------------------------------------------------------------------------------------------------------
# special cases


def test_identical_pair_gives_inf_psnr_only(paper):
    source, _, prompt, _ = pair()
    values = paper.compute(source, source.copy(), None, prompt, prompt)
    assert values["psnr_uint8"] == math.inf
    assert values["clip_i"] == pytest.approx(1, abs=1e-6) and values["dinov2"] == pytest.approx(1, abs=1e-6)
    assert values["lpips_vgg"] == pytest.approx(0, abs=1e-7)
    assert all(math.isfinite(values[k]) for k in ("clip_t", "clip_i", "dinov2", "lpips_vgg"))


def test_generation_has_no_paired_metrics(paper):
    _, edited, _, target = pair()
    values = paper.compute(None, edited, None, "", target)
    assert list(values) == list(ICDPaperMetrics.columns)
    assert all(math.isnan(values[k]) for k in ("clip_i", "dinov2", "lpips_vgg", "psnr_uint8", "image_reward"))
    assert math.isfinite(values["clip_t"])


class StubImageReward:
    calls: list = []

    @classmethod
    def from_pretrained(cls, path, device, key):
        cls.calls.append(("load", path, device, key))
        return cls()

    def score(self, image, prompt):
        self.calls.append(("score", image, prompt))
        return 0.25


def test_image_reward_scores_target_prompt_and_edited_image(monkeypatch):
    stub = types.SimpleNamespace(ImageRewardScorer=StubImageReward)
    monkeypatch.setitem(sys.modules, "editlab.evaluation.image_reward", stub)
    StubImageReward.calls = []
    metrics = build_icd_metrics(OFF | {"image_reward": {"path": "THUDM/ImageReward"}})
    assert StubImageReward.calls == [("load", "THUDM/ImageReward", "cpu", "metrics.image_reward.path")]
    source, edited, _, _ = pair()
    assert metrics.compute(source, edited, None, "a cat", "a [red] cat")["image_reward"] == 0.25
    assert metrics.compute(None, edited, None, "", "a [red] cat")["image_reward"] == 0.25  # generation too
    _, image, prompt = StubImageReward.calls[1]
    assert prompt == "a red cat" and np.array_equal(image, edited)
    assert metrics.unavailable == ["clip_t", "clip_i", "dinov2", "lpips_vgg"]
    assert metrics.backbones["image_reward"] == "image_reward:THUDM/ImageReward"


# ----------------------------------------------------------------------------------------------------------
# construction: on_missing, config files


def test_on_missing_error_names_the_config_key(tmp_path):
    missing = str(tmp_path / "no_such_model")
    for section, cfg, key in [
        ("clip", {"path": missing}, "metrics.clip.path"),
        ("dinov2", {"backbone": "dinov2", "path": missing}, "metrics.dinov2.path"),
        ("dinov2", {"backbone": "clip_vision", "path": missing}, "metrics.dinov2.path"),
        ("fid", {"backbone": "inception", "weights": missing + ".pth"}, "metrics.fid.weights"),
        ("fid", {"backbone": "clip_vision", "path": missing}, "metrics.fid.path"),
    ]:
        with pytest.raises(RuntimeError) as info:
            build_icd_metrics(OFF | {section: cfg, "on_missing": "error"})
        assert key in str(info.value) and missing in str(info.value) and "metrics.on_missing" in str(info.value)
    with pytest.raises(RuntimeError, match="--clip-model"):  # a caller's own names, e.g. a CLI's flags
        build_icd_metrics(OFF | {"clip": {"path": missing}}, names={"clip.path": "--clip-model"})


def test_on_missing_warn_gives_nan_and_lists_the_key(tmp_path, caplog, monkeypatch):
    missing = str(tmp_path / "no_such_model")
    # no scorer: the import fails
    monkeypatch.setitem(sys.modules, "editlab.evaluation.image_reward", types.SimpleNamespace())
    cfg = {"clip": {"path": missing}, "dinov2": {"backbone": "dinov2", "path": missing},
           "image_reward": {"path": missing}, "lpips": {"net": None},
           "fid": {"backbone": "inception", "weights": missing}, "on_missing": "warn"}
    with caplog.at_level(logging.WARNING):
        metrics = build_icd_metrics(cfg)
    assert metrics.unavailable == ["clip_t", "clip_i", "dinov2", "image_reward", "lpips_vgg"]
    assert metrics.set_unavailable == ["fid"] and metrics.backbones["clip_t"] is None
    assert "metrics.clip.path" in caplog.text and "metrics.image_reward.path" in caplog.text
    source, edited, _, _ = pair()
    values = metrics.compute(source, edited, None, "", "a cat")
    assert all(math.isnan(values[k]) for k in metrics.unavailable) and math.isfinite(values["psnr_uint8"])
    assert math.isnan(metrics.finish([tmp_path] * 3, [tmp_path] * 3)["fid"])


def test_lpips_without_cached_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache

    def offline(url, *args, **kwargs):
        raise OSError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="metrics.lpips.net") as info:
        build_icd_metrics(OFF | {"lpips": {"net": "vgg"}})
    assert PIQ_LPIPS_FILE in str(info.value) and "TORCH_HOME" in str(info.value)
    assert build_icd_metrics(OFF | {"lpips": {"net": "vgg"}, "on_missing": "warn"}).unavailable[-1] == "lpips_vgg"


def test_bad_settings_raise():
    for cfg, match in [({"on_missing": "ignore"}, "on_missing"), ({"dinov2": {"backbone": "dino"}}, "dinov2"),
                       ({"lpips": {"net": "alex"}}, "vgg"), ({"fid": {"backbone": "clip_vision"}}, "metrics.fid.path"),
                       ({"fid": {"backbone": "resnet"}}, "FID")]:
        with pytest.raises(ValueError, match=match):
            build_icd_metrics(OFF | cfg)


def test_toy_yaml_builds_offline_and_scores(toy):
    source, edited, prompt, target = pair()
    values = toy.compute(source, edited, None, prompt, target)
    assert list(values) == list(toy.columns) == ["clip_t", "clip_i", "dinov2", "image_reward", "lpips_vgg",
                                                   "psnr_uint8"]
    assert all(math.isfinite(values[k]) for k in ("clip_t", "clip_i", "dinov2", "psnr_uint8"))
    assert math.isnan(values["image_reward"]) and math.isnan(values["lpips_vgg"])
    assert toy.unavailable == ["image_reward", "lpips_vgg"] and toy.set_unavailable == []
    assert toy.backbones == {"clip_t": "clip:./weights/toy/clip", "clip_i": "clip:./weights/toy/clip",
                             "dinov2": "clip_vision:./weights/toy/clip", "image_reward": None, "lpips_vgg": None,
                             "psnr_uint8": "pixels (uint8)", "fid": "clip_vision:./weights/toy/clip"}


def test_config_files():
    real, toy_cfg = load_yaml("icd_paper.yaml"), load_yaml("icd_paper_toy.yaml")
    assert real["kind"] == toy_cfg["kind"] == "icd_paper" and toy_cfg["label"] == "toy" and "label" not in real
    assert set(real) | {"label"} == set(toy_cfg)
    assert real["on_missing"] == "error" and toy_cfg["on_missing"] == "warn"
    assert real["clip"]["path"] == "openai/clip-vit-large-patch14"
    assert real["dinov2"] == {"backbone": "dinov2", "path": "facebook/dinov2-base"}
    assert real["lpips"]["net"] == "vgg" and real["fid"] == {"backbone": "inception", "weights": None}


def test_the_toy_backbones_load_without_a_transformers_load_report():
    """A vision-only model loaded from the toy CLIP's whole checkpoint made transformers print a 20-row report of
    unexpected keys (the text tower) at every load; the vision tower of the model the weights hold has none."""
    library = logging.getLogger("transformers")  # the library's own root logger, not propagated to pytest's
    records, level = BufferingHandler(capacity=10_000), library.level
    library.addHandler(records)
    library.setLevel(logging.WARNING)
    try:
        build_metrics(load_yaml("toy.yaml"))  # structure distance on the vision tower, CLIP scores
        build_icd_metrics(load_yaml("icd_paper_toy.yaml"))  # "DINOv2" and FID on the vision tower
    finally:
        library.removeHandler(records)
        library.setLevel(level)
    assert not [r.getMessage() for r in records.buffer if "LOAD REPORT" in r.getMessage()]


def test_fid_inception_sees_the_icd_codes_pixel_scaling(monkeypatch):
    """The iCD code (pytorch-fid) feeds Inception 2 x / 255 - 1, torch-fidelity (x - 128) / 128: after the rescaling
    the first block's output on torch-fidelity's input equals the unmodified block's on the iCD code's."""
    import copy

    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    from editlab.evaluation.paper_metrics import scale_inputs_as_the_icd_code

    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})  # random weights, offline
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    original = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval()
    for module in original.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, so the bias matters downstream
            module.running_mean.uniform_(-1, 1)
    rescaled = copy.deepcopy(original)
    scale_inputs_as_the_icd_code(rescaled)
    x = torch.randint(0, 256, (2, 3, 64, 64)).float()
    with torch.no_grad():
        ours = rescaled.Conv2d_1a_3x3((x - 128) / 128)
        icd = original.Conv2d_1a_3x3(2 * x / 255 - 1)
        plain = original.Conv2d_1a_3x3((x - 128) / 128)
    torch.testing.assert_close(ours, icd, rtol=1e-5, atol=1e-5)
    assert (plain - icd).abs().max() > 1e-3  # the two conventions do differ
    with torch.no_grad():
        (features,) = rescaled(torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8))
    assert features.shape == (2, 2048) and features.isfinite().all()
