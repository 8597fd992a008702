"""Stage 4, teacher: a 2-layer `CLIPTextModel` over the word tokenizer (every toy word one token) and an SD-shaped
`UNet2DConditionModel` (channels 64, 128, cross-attention at 8² and 4², 6.1 M parameters), trained jointly on
epsilon prediction with SD's noise schedule and caption dropout for classifier-free guidance; the EMA weights are
saved as a diffusers Stable Diffusion folder."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from editlab.experiments.toy_build.options import LATENT_SIZE
from editlab.experiments.toy_build.text_encoder import text_config, token_ids
from editlab.experiments.toy_build.training import autocast, ema_of, fit, save_ema
from editlab.experiments.toy_build.vae import encode_latents, load_vae
from editlab.experiments.toy_build.world import World
from editlab.models.loading import sd_scheduler

TEACHER_GENERATOR = 2  # the stage's `World.generator` number
INIT_SEED_OFFSET = 1  # torch's global seed for the random start: the build's seed plus this
TEXT_WIDTH = 64  # the text encoder's hidden size, so the UNet's cross-attention width
CAPTION_DROPOUT = 0.1  # the fraction of captions replaced by "": the model learns eps(x, "") for CFG
TEACHER_LR = 5e-4
MODEL_INDEX = {  # what diffusers' StableDiffusionPipeline (and `load_components`) reads from the folder
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def denoising_loss(unet, text_encoder, latents, ids, alphas_cumprod, gen, extra=None,
                   high_t_fraction: float = 0.0) -> torch.Tensor:
    """Epsilon-prediction MSE at a uniform random timestep (SD's objective); the first `high_t_fraction` of the
    batch draws its timestep from the upper half of the schedule instead."""
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    steps = len(alphas_cumprod)
    t = torch.randint(0, steps, (len(latents),), generator=gen, device=latents.device)
    if high := int(len(t) * high_t_fraction):
        t[:high] = torch.randint(steps // 2, steps, (high,), generator=gen, device=latents.device)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    if extra is not None:  # InstructPix2Pix: the source latent joins on channels
        noisy = torch.cat([noisy, extra], dim=1)
    with autocast(latents.device):
        text = text_encoder(ids)[0]
        eps = unet(noisy, t, encoder_hidden_states=text).sample
    return F.mse_loss(eps.float(), noise)


def stage_teacher(w: World) -> None:
    p, device = w.profile, w.device
    vae = load_vae(w)
    latents = encode_latents(vae, w.train.images, device)  # [N, 4, 8, 8]
    ids = token_ids(w.tokenizer, w.train.captions).to(device)
    empty = token_ids(w.tokenizer, [""]).to(device)  # the unconditional input, as encode_prompts([""]) gives
    torch.manual_seed(w.options.seed + INIT_SEED_OFFSET)
    if w.options.resume and (w.out / "unet").is_dir():
        text_encoder = CLIPTextModel.from_pretrained(w.out / "text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(w.out / "unet", dtype=torch.float32)
        w.log.write(stage="teacher", note="continued from the saved teacher")
    else:
        text_encoder = CLIPTextModel(text_config(len(w.tokenizer), hidden=TEXT_WIDTH, layers=2, heads=4))
        unet = build_unet(cross_attention_dim=TEXT_WIDTH)
    text_encoder, unet = text_encoder.to(device).train(), unet.to(device).train()
    scheduler = sd_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    emas = [ema_of(unet, p.ema_decay), ema_of(text_encoder, p.ema_decay)]
    gen = w.generator(TEACHER_GENERATOR)

    def loss_fn(step: int) -> torch.Tensor:
        idx = w.batch_index(len(latents), p.teacher_batch, gen)
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(len(idx), generator=gen, device=device) < CAPTION_DROPOUT] = empty
        return denoising_loss(unet, text_encoder, latents[idx], batch_ids, alphas_cumprod, gen)

    fit("teacher", [*unet.parameters(), *text_encoder.parameters()], loss_fn, p.teacher_steps, lr=TEACHER_LR,
        log=w.log, emas=emas, max_seconds=w.options.max_seconds.get("teacher"))
    save_ema(emas[0], w.out / "unet")
    save_ema(emas[1], w.out / "text_encoder")
    w.tokenizer.save_pretrained(w.out / "tokenizer")
    scheduler.save_pretrained(w.out / "scheduler")
    (w.out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
