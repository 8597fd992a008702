"""editlab.evaluation.image_reward on a tiny random checkpoint in the released ImageReward.pt layout (timm ViT keys
under blip.visual_encoder, BERT keys under blip.text_encoder, the MLP as an nn.Sequential under mlp.layers),
cross-checked against a from-scratch forward pass over the checkpoint's own tensors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizer

import editlab.evaluation.image_reward as ir
from editlab.evaluation.image_reward import CheckpointMismatchError, ImageRewardScorer

# ViT: width 64 (one 64-wide head, as BLIP's ViTs), 2 blocks, 16px patches on a 32px image (2x2 grid + CLS)
V_WIDTH, V_DEPTH, V_MLP, PATCH, IMAGE = 64, 2, 96, 16, 32
# text encoder: width 32 in 2 heads, 2 layers, each with cross-attention to the image tokens
T_WIDTH, T_HEADS, T_LAYERS, T_FF = 32, 2, 2, 40
HEAD = [T_WIDTH, 24, 16, 8, 4, 1]  # the package's 768-1024-128-64-16-1 chain, narrower
HEAD_INDICES = [0, 2, 4, 6, 7]  # nn.Sequential positions of its Linears (dropouts between the first four)
# the package's ImageReward.mean / .std, written out here so the test does not read them from the module
PACKAGE_MEAN, PACKAGE_STD = 0.16717362830052426, 1.0333394966054072
WORDS = "an the of on with and photo cat dog red blue astronaut horse riding moon painting".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", *WORDS, "##s", "##ing"]
TEXT_VOCAB = len(VOCAB) + 2  # BLIP adds [DEC] and [ENC]


def med_config() -> dict:
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": T_WIDTH, "initializer_range": 0.02,
            "intermediate_size": T_FF, "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
            "num_attention_heads": T_HEADS, "num_hidden_layers": T_LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
            "vocab_size": TEXT_VOCAB, "encoder_width": 768, "add_cross_attention": True}


def tiny_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the release's key names (shapes as timm / BLIP's med.py / the package's MLP build)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, *shape: int, scale: float = 0.2, norm: bool = False) -> None:
        noise = torch.randn(*shape, generator=gen)
        sd[name] = 1 + 0.1 * noise if norm else scale * noise

    def linear(name: str, n_in: int, n_out: int, scale: float = 0.2) -> None:
        put(name + ".weight", n_out, n_in, scale=scale)
        put(name + ".bias", n_out, scale=scale)

    def layer_norm(name: str, width: int) -> None:
        put(name + ".weight", width, norm=True)
        put(name + ".bias", width, scale=0.1)

    v = "blip.visual_encoder."
    put(v + "cls_token", 1, 1, V_WIDTH)
    put(v + "pos_embed", 1, (IMAGE // PATCH) ** 2 + 1, V_WIDTH)
    put(v + "patch_embed.proj.weight", V_WIDTH, 3, PATCH, PATCH, scale=0.05)
    put(v + "patch_embed.proj.bias", V_WIDTH)
    for i in range(V_DEPTH):
        b = f"{v}blocks.{i}."
        layer_norm(b + "norm1", V_WIDTH)
        linear(b + "attn.qkv", V_WIDTH, 3 * V_WIDTH)
        linear(b + "attn.proj", V_WIDTH, V_WIDTH)
        layer_norm(b + "norm2", V_WIDTH)
        linear(b + "mlp.fc1", V_WIDTH, V_MLP)
        linear(b + "mlp.fc2", V_MLP, V_WIDTH)
    layer_norm(v + "norm", V_WIDTH)
    t = "blip.text_encoder."
    put(t + "embeddings.word_embeddings.weight", TEXT_VOCAB, T_WIDTH, scale=1.0)
    put(t + "embeddings.position_embeddings.weight", 40, T_WIDTH, scale=1.0)
    layer_norm(t + "embeddings.LayerNorm", T_WIDTH)
    sd[t + "embeddings.position_ids"] = torch.arange(40)[None]  # a persistent buffer in BLIP's med.py
    for i in range(T_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for part, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            linear(b + part + ".self.query", T_WIDTH, T_WIDTH)
            linear(b + part + ".self.key", kv_width, T_WIDTH)
            linear(b + part + ".self.value", kv_width, T_WIDTH)
            linear(b + part + ".output.dense", T_WIDTH, T_WIDTH)
            layer_norm(b + part + ".output.LayerNorm", T_WIDTH)
        linear(b + "intermediate.dense", T_WIDTH, T_FF)
        linear(b + "output.dense", T_FF, T_WIDTH)
        layer_norm(b + "output.LayerNorm", T_WIDTH)
    linear("blip.vision_proj", V_WIDTH, 16)  # BLIP's contrastive projections: in the release, unused in scoring
    linear("blip.text_proj", T_WIDTH, 16)
    for index, n_in, n_out in zip(HEAD_INDICES, HEAD[:-1], HEAD[1:]):
        linear(f"mlp.layers.{index}", n_in, n_out, scale=n_in ** -0.5)
    return sd


def write_release(folder, state_dict: dict[str, torch.Tensor], tokenizer: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med_config()))
    if tokenizer:
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("image_reward"), tiny_checkpoint())


@pytest.fixture(scope="module")
def scorer(release):
    return ImageRewardScorer.from_pretrained(str(release))


def image(h: int = 45, w: int = 70, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------
# an independent forward pass over the checkpoint's tensors, in its own (timm / BERT) names


def _ln(x: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _attend(q, k, v, heads: int, bias=None) -> torch.Tensor:
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(q.shape)


def reference_pixels(array: np.ndarray) -> torch.Tensor:
    """torchvision's Resize(S) + CenterCrop(S) on a PIL image, spelled out with PIL."""
    pil = Image.fromarray(array)
    w, h = pil.size
    size = (IMAGE, int(IMAGE * h / w)) if w <= h else (int(IMAGE * w / h), IMAGE)
    pil = pil.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - IMAGE) / 2)), int(round((size[1] - IMAGE) / 2))
    pixels = torch.from_numpy(np.asarray(pil.crop((left, top, left + IMAGE, top + IMAGE)), np.float32) / 255)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return ((pixels - mean) / std).permute(2, 0, 1)[None]


def reference_image_embeds(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[v + "cls_token"], x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(V_DEPTH):
        b = f"{v}blocks.{i}."
        q, k, val = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, -1)
        x = x + _lin(_attend(q, k, val, V_WIDTH // 64), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _ln(x, sd, v + "norm", 1e-6)


def reference_cls(sd: dict, ids: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    t = "blip.text_encoder."
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = _ln(x, sd, t + "embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(T_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for part, kv, bias in (("attention", None, pad_bias), ("crossattention", image_embeds, None)):
            kv = x if kv is None else kv
            p = b + part
            a = _attend(_lin(x, sd, p + ".self.query"), _lin(kv, sd, p + ".self.key"),
                        _lin(kv, sd, p + ".self.value"), T_HEADS, bias)
            x = _ln(_lin(a, sd, p + ".output.dense") + x, sd, p + ".output.LayerNorm", 1e-12)
        h = _lin(F.gelu(_lin(x, sd, b + "intermediate.dense")), sd, b + "output.dense")
        x = _ln(h + x, sd, b + "output.LayerNorm", 1e-12)
    return x[:, 0]


def reference_score(sd: dict, scorer: ImageRewardScorer, array: np.ndarray, prompt: str) -> float:
    tokens = scorer.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    x = reference_cls(sd, tokens["input_ids"], tokens["attention_mask"],
                      reference_image_embeds(sd, reference_pixels(array)))
    for index in HEAD_INDICES:
        x = _lin(x, sd, f"mlp.layers.{index}")
    return ((x - PACKAGE_MEAN) / PACKAGE_STD).item()


# ---------------------------------------------------------------------------------------------------------


def test_loads_every_tensor_where_it_belongs(release, scorer):
    sd, ours = tiny_checkpoint(), scorer.model.state_dict()
    pairs = {
        "blip.visual_encoder.cls_token": "vision.embeddings.class_embedding",
        "blip.visual_encoder.pos_embed": "vision.embeddings.position_embedding",
        "blip.visual_encoder.blocks.1.attn.qkv.weight": "vision.encoder.layers.1.self_attn.qkv.weight",
        "blip.visual_encoder.blocks.0.attn.proj.bias": "vision.encoder.layers.0.self_attn.projection.bias",
        "blip.visual_encoder.norm.weight": "vision.post_layernorm.weight",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight":
            "text.encoder.layer.1.crossattention.self.key.weight",
        "mlp.layers.6.weight": "head.layers.3.weight",
        "mlp.layers.7.bias": "head.layers.4.bias",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(sd[theirs], ours[mine]), (theirs, mine)
    mapped, unknown = ir.map_checkpoint_keys(sd)
    assert unknown == [] and set(mapped) == set(ours)  # complete both ways
    unused = set(sd) - {k for k in sd if not ir.UNUSED_KEYS.fullmatch(k)}
    assert len(mapped) == len(sd) - len(unused) and len(unused) == 5
    vision = scorer.model.vision.config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size) == (
        V_WIDTH, V_DEPTH, 1, IMAGE)
    assert not scorer.model.training
    # BLIP's tokenizer: the local tokenizer/ folder plus [DEC] (bos) and [ENC], in that order
    assert scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]
    assert scorer.tokenizer.bos_token == "[DEC]"


def test_path_to_the_checkpoint_file_and_hub_ids(release, scorer, monkeypatch):
    prompt, array = "a red cat", image()
    expected = scorer.score(array, prompt)
    assert ImageRewardScorer.from_pretrained(str(release / "ImageReward.pt")).score(array, prompt) == expected
    fetched = []

    def fake_download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        return str(release / filename)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(ir, "TOKENIZER_PATH", str(release / "tokenizer"))  # bert-base-uncased stands in here
    assert ImageRewardScorer.from_pretrained("THUDM/ImageReward").score(array, prompt) == expected
    assert fetched == [("THUDM/ImageReward", "ImageReward.pt"), ("THUDM/ImageReward", "med_config.json")]


def test_missing_local_files_name_the_setting(tmp_path):
    write_release(tmp_path / "r", tiny_checkpoint(), tokenizer=False)
    (tmp_path / "r" / "med_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"image_reward\.path=.*med_config\.json"):
        ImageRewardScorer.from_pretrained(str(tmp_path / "r"))


def test_matches_an_independent_forward_pass(scorer):
    sd = tiny_checkpoint()
    for seed, (prompt, shape) in enumerate([("a photo of a cat", (45, 70)), ("an astronaut riding a horse", (80, 33)),
                                            ("the moon " * 30, (32, 32)), ("", (20, 25))]):
        array = image(*shape, seed=seed)
        assert torch.allclose(scorer.preprocess(array), reference_pixels(array), atol=1e-6)
        with torch.no_grad():
            embeds = scorer.model.vision(pixel_values=reference_pixels(array)).last_hidden_state
            assert torch.allclose(embeds, reference_image_embeds(sd, reference_pixels(array)), atol=1e-5)
            tokens = scorer.tokenize(prompt)
            cls = scorer.model.text_features(reference_pixels(array), tokens["input_ids"], tokens["attention_mask"])
            expected = reference_cls(sd, tokens["input_ids"], tokens["attention_mask"], embeds)
        assert torch.allclose(cls, expected, atol=1e-5)
        assert scorer.score(array, prompt) == pytest.approx(reference_score(sd, scorer, array, prompt), abs=1e-5)


def test_tokens_as_the_package_feeds_them(scorer):
    tokens = scorer.tokenize("A photo of a CAT")
    ids = tokens["input_ids"][0].tolist()
    assert len(ids) == 35 and ids[0] == scorer.tokenizer.cls_token_id  # [CLS] first, not [ENC]
    assert tokens["attention_mask"][0].tolist() == [1] * 7 + [0] * 28  # [CLS] a photo of a cat [SEP], then [PAD]
    assert scorer.tokenize("cat " * 50)["input_ids"].shape == (1, 35)


def test_score_is_finite_deterministic_and_sensitive(scorer):
    array = image()
    first = scorer.score(array, "a red cat")
    assert math.isfinite(first) and scorer.score(array, "a red cat") == first
    assert scorer.score(image(seed=1), "a red cat") != first
    assert scorer.score(array, "a blue dog") != first


def test_normalisation_constants(release, tmp_path):
    """A head bias that puts the raw reward at the package's mean scores 0; one std higher scores 1."""
    scorer = ImageRewardScorer.from_pretrained(str(release))
    array, prompt = image(), "a dog on the moon"
    raw = scorer.raw_reward(array, prompt)
    assert scorer.score(array, prompt) == pytest.approx((raw - PACKAGE_MEAN) / PACKAGE_STD, abs=1e-6)
    sd = tiny_checkpoint()
    for target, expected in ((PACKAGE_MEAN, 0.0), (PACKAGE_MEAN + PACKAGE_STD, 1.0)):
        shifted = dict(sd, **{"mlp.layers.7.bias": sd["mlp.layers.7.bias"] + (target - raw)})
        folder = write_release(tmp_path / str(expected), shifted, tokenizer=False)
        (folder / "tokenizer").symlink_to(release / "tokenizer")
        assert ImageRewardScorer.from_pretrained(str(folder)).score(array, prompt) == pytest.approx(expected, abs=1e-5)


def test_uint8_in_only(scorer):
    array = image(64, 48)
    strided = np.ascontiguousarray(array[::-1, ::-1])[::-1, ::-1]  # same pixels, negative strides
    assert not strided.flags.c_contiguous
    assert scorer.score(strided, "a cat") == scorer.score(array, "a cat")
    with pytest.raises(TypeError, match="uint8"):
        scorer.score(array.astype(np.float32) / 255, "a cat")  # [0, 1] floats would be misread, not rescaled
    with pytest.raises(TypeError, match="uint8"):
        scorer.score(array.astype(np.int64), "a cat")
    with pytest.raises(ValueError, match="HxWx3"):
        scorer.score(array[..., 0], "a cat")


def test_mismatched_checkpoints_name_the_keys(tmp_path, release):
    def load(sd, med=None):
        folder = write_release(tmp_path / f"r{len(list(tmp_path.iterdir()))}", sd, tokenizer=False)
        if med is not None:
            (folder / "med_config.json").write_text(json.dumps(med))
        return ImageRewardScorer.from_pretrained(str(folder))

    sd = tiny_checkpoint()
    missing = {k: v for k, v in sd.items() if k != "blip.visual_encoder.blocks.1.attn.proj.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"no checkpoint key: vision\.encoder\.layers\.1\.self_attn"
                                                       r"\.projection\.weight"):
        load(missing)
    with pytest.raises(CheckpointMismatchError, match=r"no model parameter: blip\.itm_head\.weight"):
        load(dict(sd, **{"blip.itm_head.weight": torch.zeros(2, T_WIDTH)}))
    with pytest.raises(CheckpointMismatchError, match=r"no model parameter: text\.pooler\.dense\.bias"):
        load(dict(sd, **{"blip.text_encoder.pooler.dense.bias": torch.zeros(T_WIDTH)}))
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load(sd, dict(med_config(), intermediate_size=T_FF + 1))
    renamed = {k.replace("mlp.fc2", "mlp.lin2"): v for k, v in sd.items()}
    with pytest.raises(CheckpointMismatchError, match=r"no checkpoint key: .*no model parameter: blip\.visual_enc"):
        load(renamed)
