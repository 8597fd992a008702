import logging
import math
import warnings

import lpips
import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    ViTConfig,
    ViTModel,
)

from editlab.evaluation.backbones import CLIP_PATH, backbone_path, load_clip, processed
from editlab.evaluation.metrics import (
    DINO_PATH,
    ClipScorer,
    KeyBackbone,
    PieBenchMetrics,
    clip_edit_part,
    clip_score,
    key_self_similarity,
    lpips_unedit_part,
    mse_unedit_part,
    psnr_unedit_part,
    ssim_unedit_part,
    structure_distance,
)
from editlab.evaluation.protocol import build_metrics
from editlab.models.tokenizers import char_tokenizer


def tiny_clip_config():
    text = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)  # ids of models.tokenizers.char_tokenizer
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                              num_attention_heads=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)



def tiny_vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=37)
    return ViTModel(config, add_pooling_layer=False).eval()


def tiny_clip_parts():
    torch.manual_seed(0)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(tiny_clip_config()).eval(), char_tokenizer(), processor


@pytest.fixture(scope="module")
def dino():
    return KeyBackbone.from_vit(tiny_vit())


@pytest.fixture(scope="module")
def clip():
    return ClipScorer(*tiny_clip_parts())


@pytest.fixture(scope="module")
def lpips_net():
    with warnings.catch_warnings():  # lpips still calls torchvision with the deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="squeeze", pnet_rand=True, pretrained=True, verbose=False)  # offline: random backbone


def images(size=64, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.integers(20, 200, (size, size, 3), dtype=np.uint8)
    edited = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size))
    mask[size // 4 : size // 2, size // 8 : size // 2] = 1
    return source, edited, mask


def as_tensor(image):
    return torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()


# ---------------------------------------------------------------------------------------------------------
# background metrics


def test_zero_fill_not_area_normalised():
    source, noise, mask = images()
    delta = 10
    edited = np.where(mask[..., None] == 1, noise, source + delta).astype(np.uint8)  # x + delta on the background
    omega = (mask == 0).sum()
    expected = (delta / 255) ** 2 * omega / mask.size
    assert mse_unedit_part(source, edited, mask) == pytest.approx(expected, rel=1e-6)
    assert psnr_unedit_part(source, edited, mask) == pytest.approx(-10 * math.log10(expected), rel=1e-6)


def test_empty_mask_equals_whole_image_metrics(lpips_net):
    source, edited, _ = images()
    empty = np.zeros(source.shape[:2])
    x, y = as_tensor(edited), as_tensor(source)
    whole_psnr = peak_signal_noise_ratio(x, y, data_range=1.0).item()
    assert psnr_unedit_part(source, edited, empty) == pytest.approx(whole_psnr, abs=1e-6)
    assert mse_unedit_part(source, edited, empty) == pytest.approx(mean_squared_error(x, y).item(), abs=1e-6)
    whole_ssim = structural_similarity_index_measure(x, y, data_range=1.0).item()
    assert ssim_unedit_part(source, edited, empty) == pytest.approx(whole_ssim, abs=1e-6)
    whole_lpips = lpips_net(x * 2 - 1, y * 2 - 1).item()
    assert lpips_unedit_part(lpips_net, source, edited, empty) == pytest.approx(whole_lpips, abs=1e-6)


def test_lpips_sees_minus_one_in_the_edited_region(lpips_net):
    source, edited, mask = images()
    keep = torch.from_numpy(1 - mask).float()
    expected = lpips_net(as_tensor(edited) * keep * 2 - 1, as_tensor(source) * keep * 2 - 1).item()
    assert lpips_unedit_part(lpips_net, source, edited, mask) == pytest.approx(expected, abs=1e-6)


def test_full_mask_gives_nan(lpips_net, clip):
    source, edited, _ = images()
    full = np.ones(source.shape[:2])
    for metric in (psnr_unedit_part, mse_unedit_part, ssim_unedit_part):
        assert math.isnan(metric(source, edited, full))
    assert math.isnan(lpips_unedit_part(lpips_net, source, edited, full))
    assert math.isnan(clip_edit_part(clip, edited, np.zeros_like(full), "a cat"))


def test_identical_images(dino, lpips_net):
    source, _, mask = images(size=128)
    assert psnr_unedit_part(source, source, mask) == math.inf
    assert mse_unedit_part(source, source, mask) == 0
    assert ssim_unedit_part(source, source, mask) == pytest.approx(1, abs=1e-6)
    assert lpips_unedit_part(lpips_net, source, source, mask) == pytest.approx(0, abs=1e-6)
    assert structure_distance(dino, source, source) <= 1e-7


def test_shape_mismatch_raises():
    source, edited, mask = images()
    with pytest.raises(ValueError, match="shape"):
        mse_unedit_part(source, edited[:32], mask)


# ---------------------------------------------------------------------------------------------------------
# structure distance


def test_self_similarity_of_512_input(dino):
    source, _, _ = images(size=512)
    sim = key_self_similarity(dino, source)
    assert sim.shape == (785, 785)  # 28^2 patches of 8 px at 224, plus CLS
    assert torch.allclose(sim.diagonal(), torch.ones(785), atol=1e-6)


def test_structure_distance_symmetric_and_on_0_255(dino):
    source, edited, _ = images(size=96)
    d = structure_distance(dino, source, edited)
    assert d > 0 and d == pytest.approx(structure_distance(dino, edited, source), rel=1e-6)

    def distance(scale):
        sims = []
        for image in (source, edited):
            keys = dino.keys(torch.from_numpy(image.astype(np.float32) * scale).permute(2, 0, 1)[None])[0]
            keys = keys / keys.norm(dim=-1, keepdim=True)
            sims.append(keys @ keys.T)
        return ((sims[0] - sims[1]) ** 2).mean().item()

    assert d == pytest.approx(distance(1.0), rel=1e-4)  # the reference's 0-255 input
    assert abs(distance(1 / 255) - d) > 1e-3 * d  # a "fixed" [0, 1] input gives different numbers


def test_keys_are_last_layer_key_projection(dino):
    image = torch.rand(1, 3, 224, 224) * 255
    keys = dino.keys(image)
    pixels = (image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        hidden = dino.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # input of last layer
        last = dino.model.layers[-1]
        expected = last.attention.k_proj(last.layernorm_before(hidden))
    assert keys.shape == (1, 785, 32) and torch.allclose(keys, expected, atol=1e-5)
    assert dino._resize.antialias is False  # pinned to the reference's torchvision (< 0.17) behaviour


def test_clip_vision_backbone():
    model = CLIPVisionModel(tiny_clip_config().vision_config).eval()
    backbone = KeyBackbone.from_clip_vision(model)
    source, edited, _ = images()
    assert backbone.image_size == 32
    assert backbone.keys(torch.rand(1, 3, 64, 64) * 255).shape == (1, 17, 32)
    assert structure_distance(backbone, source, source) == 0 < structure_distance(backbone, source, edited)


# ---------------------------------------------------------------------------------------------------------
# CLIP


class StubClip:
    """Controlled embeddings; records what it was asked to embed."""

    def __init__(self, image_vec, text_vec):
        self.image_vec, self.text_vec, self.images, self.prompts = image_vec, text_vec, [], []

    def image_embeds(self, image):
        self.images.append(image)
        return torch.tensor(self.image_vec, dtype=torch.float32)

    def text_embeds(self, prompt):
        self.prompts.append(prompt)
        return torch.tensor(self.text_vec, dtype=torch.float32)


def test_clip_score_is_clamped_100_cos():
    image = np.zeros((8, 8, 3), np.uint8)
    assert clip_score(StubClip([3.0, 4.0], [1.0, 0.0]), image, "x") == pytest.approx(60.0)
    assert clip_score(StubClip([-1.0, 0.0], [1.0, 1.0]), image, "x") == 0.0


def test_clip_prompts_lose_brackets_and_edit_part_masks_image():
    stub = StubClip([1.0, 0.0], [1.0, 0.0])
    source, edited, mask = images()
    PieBenchMetrics(clip=stub).compute(source, edited, mask, "a [round] cake", "a [square] cake")
    assert stub.prompts == ["a round cake", "a square cake", "a square cake"]
    assert np.array_equal(stub.images[2], np.uint8(edited * mask[..., None]))


def test_tiny_clip_matches_manual_computation(clip):
    _, edited, mask = images()
    model, tokenizer, processor = tiny_clip_parts()
    with torch.no_grad():
        pixels = processor(images=[edited], return_tensors="pt")["pixel_values"]
        image_emb = model.get_image_features(pixel_values=pixels).pooler_output[0]
        text_emb = model.get_text_features(**tokenizer(["a cat"], return_tensors="pt")).pooler_output[0]
    cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=0).item()
    assert clip_score(clip, edited, "a cat") == pytest.approx(max(100 * cos, 0), abs=1e-4)
    masked = np.uint8(edited * mask[..., None])
    assert clip_edit_part(clip, edited, mask, "a cat") == clip_score(clip, masked, "a cat")
    assert clip_score(clip, edited, "word " * 60) >= 0  # > 77 tokens: truncated, not an error


# ---------------------------------------------------------------------------------------------------------
# the metric set and its construction


def test_compute_keys_and_unavailable(dino, clip, lpips_net):
    source, edited, mask = images()
    full = PieBenchMetrics(structure=dino, clip=clip, lpips=lpips_net)
    values = full.compute(source, edited, mask, "a cat", "a dog")
    assert list(values) == list(PieBenchMetrics.columns) and full.unavailable == []
    assert all(math.isfinite(v) for v in values.values())
    bare = PieBenchMetrics()
    values = bare.compute(source, edited, mask, "a cat", "a dog")
    assert bare.unavailable == [k for k in PieBenchMetrics.columns if k.startswith(("structure", "lpips", "clip"))]
    assert all(math.isnan(values[k]) for k in bare.unavailable)
    assert math.isfinite(values["psnr_unedit_part"])


def test_paper_scales():
    """The columns as the PnP-Inversion paper prints them: its names and factors, in its order."""
    printed = {c: (c.paper, c.factor) for c in PieBenchMetrics.columns if c.paper}
    assert printed == {"structure_distance": ("struct_x1e3", 1e3), "psnr_unedit_part": ("psnr", 1.0),
                       "lpips_unedit_part": ("lpips_x1e3", 1e3), "mse_unedit_part": ("mse_x1e4", 1e4),
                       "ssim_unedit_part": ("ssim_x1e2", 1e2), "clip_similarity_target_image": ("clip_whole", 1.0),
                       "clip_similarity_target_image_edit_part": ("clip_edited", 1.0)}
    assert list(printed) == [c for c in PieBenchMetrics.columns if c != "clip_similarity_source_image"]


def test_build_metrics_from_local_directories(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "vit")
    for part in tiny_clip_parts():
        part.save_pretrained(tmp_path / "clip")
    metrics = build_metrics(
        {"structure": {"backbone": "dino", "path": str(tmp_path / "vit")}, "clip": {"path": str(tmp_path / "clip")},
         "lpips": {"net": None}}
    )
    assert metrics.unavailable == ["lpips_unedit_part"] and metrics.structure.image_size == 224
    vision = build_metrics({"structure": {"backbone": "clip_vision", "path": str(tmp_path / "clip")},
                            "clip": {"path": None}, "lpips": {"net": "none"}})
    assert vision.structure.image_size == 32 and vision.clip is None


def test_build_metrics_missing_weights(tmp_path, caplog):
    missing = str(tmp_path / "no_such_model")
    cfg = {"structure": {"backbone": "dino", "path": missing}, "clip": {"path": None}, "lpips": {"net": None}}
    with pytest.raises(RuntimeError, match="structure_distance") as info:
        build_metrics(cfg | {"on_missing": "error"})
    assert missing in str(info.value) and "HF_HOME" in str(info.value) and "structure.path" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="editlab.evaluation.metrics"):
        metrics = build_metrics(cfg | {"on_missing": "warn"})
    assert "structure_distance" in metrics.unavailable
    assert "structure_distance" in caplog.text and missing in caplog.text
    with pytest.raises(ValueError, match="backbone"):
        build_metrics({"structure": {"backbone": "resnet"}})


def test_backbone_sections_name_their_kind_and_path():
    defaults = {"dino": DINO_PATH, "clip_vision": CLIP_PATH}
    assert backbone_path({}, "dino", defaults, "structure") == DINO_PATH
    assert backbone_path({"path": "/weights/clip"}, "clip_vision", defaults, "structure") == "/weights/clip"
    assert backbone_path({}, "clip_vision", {"clip_vision": None}, "FID") is None
    with pytest.raises(ValueError, match=r"^unknown structure backbone 'resnet'; use 'dino', 'clip_vision' or None$"):
        backbone_path({}, "resnet", defaults, "structure")


def test_load_clip_and_its_processed_pixels(tmp_path, caplog):
    for part in tiny_clip_parts():
        part.save_pretrained(tmp_path / "clip")
    clip = load_clip(str(tmp_path / "clip"), "clip_t", "cpu", "metrics.clip.path", "error", "metrics.on_missing")
    source, _, _ = images()
    pixels = processed(source, clip.processor, clip.model)
    expected = clip.processor(images=[Image.fromarray(source)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and torch.equal(pixels, expected)
    assert clip.image_embeds(source).shape == (16,)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="clip_t.*nowhere.*metrics.clip.path.*metrics.on_missing=warn"):
        load_clip(missing, "clip_t", "cpu", "metrics.clip.path", "error", "metrics.on_missing")
    assert load_clip(missing, "clip_t", "cpu", "metrics.clip.path", "warn", "metrics.on_missing") is None
    assert "clip_t is unavailable" in caplog.text
