"""ImageReward (THUDM's ImageReward-v1.0 human-preference reward model) as a small scorer of our own.

The ``image-reward`` package cannot be imported beside transformers 5: its BLIP code imports helpers that
transformers 5 removed (``apply_chunking_to_forward`` from ``transformers.modeling_utils``), and it pins timm 0.6.13
and fairscale and imports openai ``clip``. Here the same network is rebuilt from transformers' BLIP classes (a
ViT image encoder, a BERT text encoder with cross-attention over the image tokens, and the MLP reward head), the
released ``ImageReward.pt`` is mapped onto it, and `ImageRewardScorer.score` gives what the package's
``ImageReward.score(prompt, pil_image)`` gives.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from editlab.models.hub import hub_kwargs, is_local, resolve_local

DEFAULT_PATH = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER_PATH = "bert-base-uncased"  # BLIP's tokenizer; a local folder may ship it as ``tokenizer/``

# The package's reward normalisation: the raw head output's mean and std over its training comparisons.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# BLIP's (= CLIP's) pixel normalisation, applied after the 224 bicubic resize and centre crop.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35  # prompts are padded / truncated to 35 tokens, as the package does
VIT_HEAD_DIM = 64  # BLIP's ViT-B and ViT-L both use 64-wide heads; the checkpoint does not store the head count
VIT_LAYER_NORM_EPS = 1e-6  # timm's ViT as BLIP builds it (transformers' BLIP default is 1e-5)

# Checkpoint keys that exist in ImageReward.pt but take no part in scoring: BLIP's contrastive projections and the
# text embeddings' position-id buffer (a constant arange, non-persistent in transformers' BLIP).
UNUSED_KEYS = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids")

# timm ViT names (under blip.visual_encoder.) -> transformers BlipVisionModel names (under vision.)
_VISION_RULES = (
    (re.compile(r"cls_token"), "embeddings.class_embedding"),
    (re.compile(r"pos_embed"), "embeddings.position_embedding"),
    (re.compile(r"patch_embed\.proj\.(weight|bias)"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"blocks\.(\d+)\.norm1\.(weight|bias)"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"blocks\.(\d+)\.norm2\.(weight|bias)"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"blocks\.(\d+)\.attn\.proj\.(weight|bias)"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"norm\.(weight|bias)"), r"post_layernorm.\1"),
)
_HEAD_KEY = re.compile(r"mlp\.layers\.(\d+)\.(weight|bias)")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys do not fill our model exactly: some parameter has no source or some key no target."""


class RewardHead(nn.Module):
    """The package's MLP: a chain of Linear layers with no activation between them (its ReLUs are commented out;
    its dropouts are inactive at inference, so only the Linears are kept)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ImageRewardModel(nn.Module):
    """BLIP image encoder + cross-attending text encoder + reward head; ``forward`` gives the raw reward."""

    def __init__(self, vision_config: Any, text_config: Any, head_sizes: list[int]) -> None:
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = RewardHead(head_sizes)

    def text_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's first-token state, every layer cross-attending to all image tokens."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask)
        return out.last_hidden_state[:, 0, :].float()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.text_features(pixel_values, input_ids, attention_mask))


# ----------------------------------------------------------------------------------------------------------
# checkpoint -> our model


def _head_indices(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    """The nn.Sequential positions of the head's Linears (the dropouts between them hold no weights)."""
    return sorted({int(m.group(1)) for key in state_dict if (m := _HEAD_KEY.fullmatch(key))})


def map_checkpoint_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ImageReward.pt's keys renamed onto `ImageRewardModel`'s; returns (renamed state dict, keys no rule knows).
    Keys in `UNUSED_KEYS` are dropped silently: they are in the release but not in the scoring path."""
    head = {index: rank for rank, index in enumerate(_head_indices(state_dict))}
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new = None
        if UNUSED_KEYS.fullmatch(key):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            for pattern, target in _VISION_RULES:
                if pattern.fullmatch(rest):
                    new = "vision." + pattern.sub(target, rest)
                    break
        elif key.startswith("blip.text_encoder."):
            # BLIP's med.py keeps BERT's names, and so does transformers' BlipTextModel
            new = "text." + key[len("blip.text_encoder."):]
        elif m := _HEAD_KEY.fullmatch(key):
            new = f"head.layers.{head[int(m.group(1))]}.{m.group(2)}"
        if new is None:
            unknown.append(key)
        else:
            mapped[new] = value
    return mapped, unknown


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_checkpoint(model: ImageRewardModel, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Fill ``model`` from an ImageReward.pt state dict, insisting that every parameter gets a value and every
    checkpoint key (outside `UNUSED_KEYS`) a parameter: a silent partial load would score with random weights."""
    mapped, unknown = map_checkpoint_keys(state_dict)
    expected = model.state_dict()
    missing = [key for key in expected if key not in mapped]
    unexpected = unknown + [key for key in mapped if key not in expected]
    wrong_shape = [f"{key} {tuple(mapped[key].shape)} != {tuple(value.shape)}" for key, value in expected.items()
                   if key in mapped and mapped[key].shape != value.shape]
    problems = []
    if missing:
        problems.append(f"model parameters with no checkpoint key: {_listing(missing)}")
    if unexpected:
        problems.append(f"checkpoint keys with no model parameter: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches (checkpoint != model): {_listing(wrong_shape)}")
    if problems:
        where = f" {source}" if source else ""
        raise CheckpointMismatchError(f"ImageReward checkpoint{where} does not match the model: "
                                      + "; ".join(problems))
    model.load_state_dict(mapped, strict=True)


def vision_config_from_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> Any:
    """The ViT's shape as the checkpoint stores it (the package hard-codes ViT-L/16 at 224 for ImageReward)."""
    from transformers import BlipVisionConfig

    prefix = "blip.visual_encoder."
    try:
        width = state_dict[prefix + "cls_token"].shape[-1]
        patch = state_dict[prefix + "patch_embed.proj.weight"].shape[-1]
        positions = state_dict[prefix + "pos_embed"].shape[1]
        mlp = state_dict[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointMismatchError(f"ImageReward checkpoint lacks the image encoder key {err}") from None
    depth = len({m.group(1) for key in state_dict if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", key))})
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1 or width % VIT_HEAD_DIM:
        raise CheckpointMismatchError(f"ImageReward checkpoint has an unexpected ViT shape: {positions} positions "
                                      f"(a square grid plus a class token expected), width {width} (a multiple of "
                                      f"{VIT_HEAD_DIM} expected)")
    return BlipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                            num_attention_heads=width // VIT_HEAD_DIM, image_size=grid * patch, patch_size=patch,
                            hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS)


def text_config_from_med(med: Mapping[str, Any], encoder_width: int) -> Any:
    """BLIP's med_config.json as a transformers BlipTextConfig; like the package, the cross-attention width is the
    image encoder's (med_config's own ``encoder_width`` is overridden)."""
    from transformers.models.blip.configuration_blip import BlipTextConfig

    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"ImageReward med_config: position_embedding_type {med['position_embedding_type']!r} is "
                         "not supported (BLIP's text encoder uses absolute positions)")
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "initializer_range", "pad_token_id")
    # is_decoder: transformers' BLIP text layers only build their cross-attention blocks for a decoder config;
    # the forward pass still uses the bidirectional (encoder) mask unless asked for a causal one
    # bos/eos/sep ids only matter for generation; transformers' defaults (30522, 2, 102) fall outside small vocabs
    return BlipTextConfig(**{k: med[k] for k in fields if k in med}, encoder_hidden_size=encoder_width,
                          is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None)


def build_model(state_dict: Mapping[str, torch.Tensor], med: Mapping[str, Any], source: str = "") -> ImageRewardModel:
    """An `ImageRewardModel` shaped by ``med`` (text) and the checkpoint (image encoder, head), loaded, eval mode."""
    vision = vision_config_from_checkpoint(state_dict)
    text = text_config_from_med(med, vision.hidden_size)
    indices = _head_indices(state_dict)
    if not indices:
        where = f" {source}" if source else ""
        raise CheckpointMismatchError(f"ImageReward checkpoint{where} has no reward head (mlp.layers.*) keys")
    weights = [state_dict[f"mlp.layers.{i}.weight"] for i in indices if f"mlp.layers.{i}.weight" in state_dict]
    head_sizes = [text.hidden_size] + [w.shape[0] for w in weights]
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an internal helper: without it, only slower (random init of 450M weights, ~15 s on CPU)
        no_init_weights = contextlib.nullcontext
    # no random init: load_checkpoint overwrites every parameter or raises (the only buffer, the text position ids,
    # is an arange set in __init__, not by an init function)
    with no_init_weights():
        model = ImageRewardModel(vision, text, head_sizes)
    load_checkpoint(model, state_dict, source)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# files


def _local_files(path: str, key: str) -> tuple[Path, Path, Path | None]:
    """(checkpoint, med_config, tokenizer folder or None) for a local folder or a path to ImageReward.pt."""
    local = resolve_local(path)
    checkpoint = local if local.is_file() else local / CHECKPOINT_FILE
    folder = checkpoint.parent
    for file in (checkpoint, folder / MED_CONFIG_FILE):
        if not file.is_file():
            raise FileNotFoundError(f"{key}={path!r}: {file} does not exist (a local ImageReward needs "
                                    f"{CHECKPOINT_FILE} and {MED_CONFIG_FILE} side by side)")
    tokenizer = folder / "tokenizer"
    return checkpoint, folder / MED_CONFIG_FILE, tokenizer if tokenizer.is_dir() else None


def _tokenizer(source: str | Path, hub: Mapping[str, bool]) -> Any:
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(source), **hub)
    # BLIP's two added tokens, in BLIP's order ([DEC] = 30522, [ENC] = 30523 on bert-base-uncased); no-ops when
    # the tokenizer was saved with them
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardScorer:
    """ImageReward-v1.0 scores of (image, prompt) pairs, as the ``image-reward`` package computes them."""

    def __init__(self, model: ImageRewardModel, tokenizer: Any) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.image_size = model.vision.config.image_size  # 224 for the release
        if len(tokenizer) > model.text.config.vocab_size:
            raise ValueError(f"the ImageReward tokenizer has {len(tokenizer)} tokens, more than the text encoder's "
                             f"{model.text.config.vocab_size} embeddings")

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_PATH, device: str | torch.device = "cpu",
                        key: str = "image_reward.path") -> ImageRewardScorer:
        """``path``: a hub repo id (files ImageReward.pt and med_config.json, tokenizer bert-base-uncased from the
        hub), a local folder holding those two files (and optionally the tokenizer as ``tokenizer/``), or the path
        of a local ImageReward.pt. ``key`` names the setting in error messages."""
        if is_local(path) or Path(path).expanduser().exists():
            checkpoint, med_config, tokenizer_dir = _local_files(path, key)
            tokenizer_source: str | Path = tokenizer_dir or TOKENIZER_PATH
        else:
            from huggingface_hub import hf_hub_download

            hub = hub_kwargs(path, key)
            checkpoint = Path(hf_hub_download(path, CHECKPOINT_FILE, **hub))
            med_config = Path(hf_hub_download(path, MED_CONFIG_FILE, **hub))
            tokenizer_dir, tokenizer_source = None, TOKENIZER_PATH
        tokenizer_hub = {} if tokenizer_dir else hub_kwargs(TOKENIZER_PATH, key)
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = build_model(state_dict, json.loads(med_config.read_text()), str(checkpoint))
        return cls(model.to(device), _tokenizer(tokenizer_source, tokenizer_hub))

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, S, S) pixels as the package's transform makes them from a PIL image: shorter side resized to S
        (PIL bicubic), centre crop, RGB, [0, 1], BLIP normalisation."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = np.asarray(image)
        if image.dtype != np.uint8:
            # PIL would read floats as 32-bit pixels, not [0, 1] or [0, 255] intensities: refuse rather than guess
            raise TypeError(f"ImageReward scores uint8 images, got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"ImageReward scores HxWx3 RGB images, got shape {image.shape}")
        pil = Image.fromarray(image)
        pil = TF.center_crop(TF.resize(pil, self.image_size, interpolation=InterpolationMode.BICUBIC), self.image_size)
        pixels = TF.normalize(TF.to_tensor(pil.convert("RGB")), PIXEL_MEAN, PIXEL_STD)
        return pixels.unsqueeze(0)

    def tokenize(self, prompt: str) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask as the package's score() feeds them: [CLS] prompt [SEP], padded to 35. The
        package keeps [CLS] first here (BLIP's [ENC] replacement is for its image-text matching head)."""
        tokens = self.tokenizer(prompt, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    @torch.no_grad()
    def _reward(self, image: np.ndarray, prompt: str, normalise: bool) -> float:
        param = next(self.model.parameters())
        tokens = {k: v.to(param.device) for k, v in self.tokenize(prompt).items()}
        pixels = self.preprocess(image).to(param.device, param.dtype)
        reward = self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
        # normalised on the float32 tensor, as the package does, so the scores agree to the last float32 bit
        return ((reward - REWARD_MEAN) / REWARD_STD if normalise else reward).item()

    def raw_reward(self, image: np.ndarray, prompt: str) -> float:
        """The head's output before the package's normalisation."""
        return self._reward(image, prompt, normalise=False)

    def score(self, image: np.ndarray, prompt: str) -> float:
        """ImageReward score of a uint8 HxWx3 image for ``prompt``: (raw reward - mean) / std."""
        return self._reward(image, prompt, normalise=True)
