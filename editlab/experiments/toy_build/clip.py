"""Stage 5, clip: a small `CLIPModel` (3-layer ViT, patch 4; 2-layer text tower) trained contrastively, each image
also against a caption that differs in one attribute, so it can tell "red circle" from "blue circle". It scores
CLIP similarity on toy runs, its vision tower serves the structure distance there, and it judges the quality bars."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from editlab.evaluation.metrics import CLIP_MEAN, CLIP_STD
from editlab.experiments.toy_build.data import NEGATIVES
from editlab.experiments.toy_build.options import SIZE
from editlab.experiments.toy_build.text_encoder import text_config, token_ids
from editlab.experiments.toy_build.training import autocast, fit, save_half
from editlab.experiments.toy_build.world import World

CLIP_GENERATOR = 3  # the stage's `World.generator` number
INIT_SEED_OFFSET = 2  # torch's global seed for the random start: the build's seed plus this
CLIP_LR = 5e-4
MAX_LOGIT_SCALE = 100  # CLIP's own cap on its learnt temperature


def build_clip(vocab_size: int) -> CLIPModel:
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE,
                  patch_size=4, hidden_act="quick_gelu")
    text = text_config(vocab_size, hidden=64, layers=2, heads=4).to_dict()
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def clip_pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 32, 32, 3] -> CLIP inputs: what the saved `CLIPImageProcessor` gives a 32² image."""
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return (images.to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std


def pooled(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features, with the projection in pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def stage_clip(w: World) -> None:
    p, device = w.profile, w.device
    torch.manual_seed(w.options.seed + INIT_SEED_OFFSET)
    if w.options.resume and (w.out / "clip").is_dir():
        model = CLIPModel.from_pretrained(w.out / "clip", dtype=torch.float32)
        w.log.write(stage="clip", note="continued from the saved CLIP")
    else:
        model = build_clip(len(w.tokenizer))
    model = model.to(device).train()
    ids = token_ids(w.tokenizer, w.train.captions).to(device)  # [N, 24]
    negatives = [token_ids(w.tokenizer, [neg[k] for neg in w.train.negatives]) for k in range(NEGATIVES)]
    negatives = torch.stack(negatives, dim=1).to(device)  # [N, 4, 24]
    images, gen = w.train.images.to(device), w.generator(CLIP_GENERATOR)

    def loss_fn(step: int) -> torch.Tensor:
        idx = w.batch_index(len(ids), p.clip_batch, gen)
        k = torch.randint(0, NEGATIVES, (len(idx),), generator=gen, device=device)
        texts = torch.cat([ids[idx], negatives[idx, k]])  # [2B, 24]: captions, then one hard negative each
        with autocast(device):
            image = F.normalize(pooled(model.get_image_features(
                pixel_values=clip_pixels(images[idx], device))).float(), dim=-1)
            text = F.normalize(pooled(model.get_text_features(input_ids=texts)).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * image @ text.T  # [B, 2B]
        target = torch.arange(len(idx), device=device)
        # images pick their caption among all 2B texts; captions pick their image among the B images
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(idx)].T, target)) / 2

    fit("clip", list(model.parameters()), loss_fn, p.clip_steps, lr=CLIP_LR, log=w.log,
        max_seconds=w.options.max_seconds.get("clip"))
    save_half(model, w.out / "clip")
    w.tokenizer.save_pretrained(w.out / "clip")
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": SIZE}, do_center_crop=True, crop_size={"height": SIZE, "width": SIZE},
        do_rescale=True, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(w.out / "clip")
