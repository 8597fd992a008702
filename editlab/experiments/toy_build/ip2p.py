"""Stage 6, ip2p: an InstructPix2Pix-style UNet (8 input channels: noisy latent + source latent), initialised from
the teacher and fine-tuned on the edit triples with text and image dropout (the two guidance terms)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from editlab.experiments.toy_build.teacher import denoising_loss
from editlab.experiments.toy_build.text_encoder import token_ids
from editlab.experiments.toy_build.training import ema_of, fit, save_ema
from editlab.experiments.toy_build.vae import encode_latents, load_vae
from editlab.experiments.toy_build.world import World
from editlab.models.loading import sd_scheduler

IP2P_GENERATOR = 4  # the stage's `World.generator` number
# 5 % without the instruction, 5 % without the image: the two unconditional terms of IP2P's guidance
TEXT_DROPOUT, IMAGE_DROPOUT = 0.05, 0.05
# half of the batch at t >= 500, where the noisy latent no longer shows the layout and only the source image can:
# the uniform draw left the edits blurred and shifted (8,000 such steps on CPU: toy-CLIP gain on 32 held-out edits
# -17.4 -> +16.4, PSNR to the true edit 17.2 -> 23.3 dB)
HIGH_T_FRACTION = 0.5
# 5e-4, not SD-IP2P's 1e-4, and ten times that on conv_in: Adam moves a weight about lr per step, and the
# zero-initialised image channels of conv_in must grow to the size of the others (after 1,227 steps at 1e-4 and
# 399 at 5e-4 they were at 10 % of it, and the edits did not keep the source).
IP2P_LR, CONV_IN_LR = 5e-4, 5e-3


def stage_ip2p(w: World) -> None:
    p, device = w.profile, w.device
    vae = load_vae(w)
    target = encode_latents(vae, w.edits.targets, device)  # scaled, the denoising target
    source = encode_latents(vae, w.edits.sources, device, scaled=False)  # posterior mode, unscaled, as IP2P
    text_encoder = CLIPTextModel.from_pretrained(w.out / "text_encoder", dtype=torch.float32).to(device)
    text_encoder.eval().requires_grad_(False)
    if w.options.resume and (w.out / "ip2p_unet").is_dir():
        unet = UNet2DConditionModel.from_pretrained(w.out / "ip2p_unet", dtype=torch.float32)
        w.log.write(stage="ip2p", note="continued from the saved IP2P UNet")
    else:
        teacher = UNet2DConditionModel.from_pretrained(w.out / "unet", dtype=torch.float32)
        unet = UNet2DConditionModel.from_config({**teacher.config, "in_channels": 8})
        state = teacher.state_dict()
        conv_in = state.pop("conv_in.weight")  # [C, 4, 3, 3]: the source-latent channels start at zero
        unet.load_state_dict(state, strict=False)
        with torch.no_grad():
            unet.conv_in.weight.zero_()
            unet.conv_in.weight[:, :4] = conv_in
    unet.to(device).train()
    ids = token_ids(w.tokenizer, w.edits.instructions).to(device)
    empty = token_ids(w.tokenizer, [""]).to(device)
    alphas_cumprod = sd_scheduler().alphas_cumprod.to(device)
    ema, gen = ema_of(unet, p.ema_decay), w.generator(IP2P_GENERATOR)

    def loss_fn(step: int) -> torch.Tensor:
        idx = w.batch_index(len(target), p.ip2p_batch, gen)
        batch_ids, image = ids[idx].clone(), source[idx].clone()
        batch_ids[torch.rand(len(idx), generator=gen, device=device) < TEXT_DROPOUT] = empty
        image[torch.rand(len(idx), generator=gen, device=device) < IMAGE_DROPOUT] = 0
        return denoising_loss(unet, text_encoder, target[idx], batch_ids, alphas_cumprod, gen, extra=image,
                              high_t_fraction=HIGH_T_FRACTION)

    conv_in = list(unet.conv_in.parameters())
    rest = [q for name, q in unet.named_parameters() if not name.startswith("conv_in.")]
    fit("ip2p", [{"params": rest}, {"params": conv_in, "lr": CONV_IN_LR}], loss_fn, p.ip2p_steps, lr=IP2P_LR,
        log=w.log, emas=[ema], max_seconds=w.options.max_seconds.get("ip2p"))
    save_ema(ema, w.out / "ip2p_unet")
