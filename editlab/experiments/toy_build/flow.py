"""Stage 7, flow: the toy world's flow-matching teacher, an SD3-shaped `SD3Transformer2DModel` (6 joint blocks,
128 wide, 8² latent tokens of patch 1, 3.5 M parameters) on the toy VAE's latents and the teacher's frozen text
encoder, trained with the plain rectified-flow velocity loss, saved as a diffusers SD3 folder ``<out>/flow``
(``model=toy_flow``).

- Objective: x_sigma = (1 - sigma) x0 + sigma n, the network predicts n - x0, unweighted MSE; sigma = sigmoid(u),
  u ~ N(0, 1) (the logit-normal sampling of Esser et al. 2024, sec. 3.1, at m = 0, s = 1), shift 1 in training
  and sampling (SD3's shift 3 corrects for 1024² images; these have 64 tokens).
- Text: SD3's inputs from the one toy encoder: its penultimate hidden states [B, 24, 64] as the joint text tokens,
  its pooled output as the pooled projection (the encoder is saved with an identity projection, so the SD3 family
  reads it as CLIP-L's ``text_embeds``). No second CLIP and no T5 (``clip_g: false``, ``t5: false``,
  ``max_sequence_length: 0`` in the model config). Frozen, so the embedding space the toy CLIP judges stays.
- 10 % caption dropout to "" (the family's unconditional branch) for classifier-free guidance; EMA weights saved.
"""

from __future__ import annotations

import copy
import json

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from editlab.experiments.toy_build.options import LATENT_SIZE
from editlab.experiments.toy_build.teacher import CAPTION_DROPOUT, TEACHER_LR, TEXT_WIDTH
from editlab.experiments.toy_build.text_encoder import token_ids
from editlab.experiments.toy_build.training import autocast, ema_of, fit, save_ema, save_half
from editlab.experiments.toy_build.vae import encode_latents, load_vae
from editlab.experiments.toy_build.world import World

FLOW_GENERATOR = 6  # the stage's `World.generator` number
INIT_SEED_OFFSET = 6  # torch's global seed for the random start: the build's seed plus this
FLOW_FOLDER = "flow"
TRANSFORMER = {  # 3.5 M parameters: 6 blocks of 4 heads x 32, 64 image tokens + 24 text tokens
    "sample_size": LATENT_SIZE, "patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 6,
    "num_attention_heads": 4, "attention_head_dim": 32, "caption_projection_dim": 128,
    "joint_attention_dim": TEXT_WIDTH, "pooled_projection_dim": TEXT_WIDTH, "pos_embed_max_size": LATENT_SIZE,
}
SCHEDULER = {"shift": 1.0}
MODEL_INDEX = {  # what diffusers' StableDiffusion3Pipeline (and `load_components`) reads from the folder
    "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_2": [None, None], "tokenizer_2": [None, None],
    "text_encoder_3": [None, None], "tokenizer_3": [None, None], "vae": [None, None],
}


def with_projection(config):
    config = copy.deepcopy(config)
    config.projection_dim = TEXT_WIDTH
    return config


def projected_text_encoder(w: World) -> CLIPTextModelWithProjection:
    """The teacher's text encoder with an identity ``text_projection``: its ``text_embeds`` are its pooled output."""
    teacher = CLIPTextModel.from_pretrained(w.out / "text_encoder", dtype=torch.float32)
    encoder = CLIPTextModelWithProjection(with_projection(teacher.config))
    encoder.text_model.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        encoder.text_projection.weight.copy_(torch.eye(TEXT_WIDTH))
    return encoder.to(w.device).eval().requires_grad_(False)


@torch.no_grad()
def sd3_text(encoder: CLIPTextModelWithProjection, ids: torch.Tensor, chunk: int = 1024
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the SD3 family feeds the transformer for token ids [N, 24]: the penultimate hidden states [N, 24, 64]
    and ``text_embeds`` [N, 64] (`models.families.sd3.SD3.encode` with one CLIP and no T5)."""
    states, pooled = [], []
    for part in ids.split(chunk):
        out = encoder(part, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    return torch.cat(states), torch.cat(pooled)


def flow_loss(transformer: SD3Transformer2DModel, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
              gen: torch.Generator) -> torch.Tensor:
    """The rectified-flow velocity MSE at logit-normal noise levels, as the SD3 family calls the transformer."""
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    sigma = torch.sigmoid(torch.randn(len(latents), generator=gen, device=latents.device))
    s = sigma.view(-1, 1, 1, 1)
    with autocast(latents.device):
        velocity = transformer(hidden_states=(1 - s) * latents + s * noise, timestep=1000 * sigma,
                               encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
    return F.mse_loss(velocity.float(), noise - latents)


def stage_flow(w: World) -> None:
    p, device = w.profile, w.device
    latents = encode_latents(load_vae(w), w.train.images, device)  # [N, 4, 8, 8]
    encoder = projected_text_encoder(w)
    captions = sorted(set(w.train.captions))  # encode each distinct caption once; "" is the dropout caption
    text, pooled = sd3_text(encoder, token_ids(w.tokenizer, ["", *captions]).to(device))
    row = {caption: i + 1 for i, caption in enumerate(captions)}
    caption_rows = torch.tensor([row[c] for c in w.train.captions], device=device)
    torch.manual_seed(w.options.seed + INIT_SEED_OFFSET)
    if w.options.resume and (w.out / FLOW_FOLDER / "transformer").is_dir():
        transformer = SD3Transformer2DModel.from_pretrained(w.out / FLOW_FOLDER / "transformer", dtype=torch.float32)
        w.log.write(stage="flow", note="continued from the saved flow teacher")
    else:
        transformer = SD3Transformer2DModel(**TRANSFORMER)
    transformer = transformer.to(device).train()
    ema = ema_of(transformer, p.ema_decay)
    gen = w.generator(FLOW_GENERATOR)

    def loss_fn(step: int) -> torch.Tensor:
        idx = w.batch_index(len(latents), p.flow_batch, gen)
        rows = caption_rows[idx].clone()
        rows[torch.rand(len(idx), generator=gen, device=device) < CAPTION_DROPOUT] = 0
        return flow_loss(transformer, latents[idx], text[rows], pooled[rows], gen)

    fit("flow", list(transformer.parameters()), loss_fn, p.flow_steps, lr=TEACHER_LR, log=w.log, emas=[ema],
        max_seconds=w.options.max_seconds.get("flow"))
    folder = w.out / FLOW_FOLDER
    save_ema(ema, folder / "transformer")
    save_half(encoder, folder / "text_encoder")
    w.tokenizer.save_pretrained(folder / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
