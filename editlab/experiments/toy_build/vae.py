"""Stages 2 and 3, vae and decoder: an `AutoencoderKL` (block channels 32, 64, 64), 32² RGB <-> 4 x 8² latents,
trained on MSE with a tiny KL term and its scaling factor set to 1 / std of the latents (as SD's 0.18215); then
its decoder fine-tuned on the frozen encoder's latents (SD's ft-MSE decoder): sharper reconstructions, the same
latents, so it may run before or after the teacher. The later stages load and encode through it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from editlab.experiments.toy_build.options import SIZE
from editlab.experiments.toy_build.training import autocast, fit, save_half, to_pixels
from editlab.experiments.toy_build.world import World
from editlab.models.components import vae_encode

VAE_GENERATOR, DECODER_GENERATOR = 1, 5  # the stages' `World.generator` numbers
VAE_LR, DECODER_LR = 1e-3, 3e-4
KL_WEIGHT = 1e-6  # MSE is what PSNR measures; the KL term only keeps the latents bounded (SD's VAE uses 1e-6 too)
SCALING_IMAGES = 2048  # training images whose latents' std sets the scaling factor
SCALING_DIGITS = 5  # the scaling factor's rounding, as it is stored in the config
ENCODE_CHUNK, SCALING_CHUNK = 512, 256  # images per encoder call


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
        sample_size=SIZE,
    )


def load_vae(w: World) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(w.out / "vae", dtype=torch.float32).to(w.device).eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, device: torch.device,
                   scaled: bool = True) -> torch.Tensor:
    """Posterior means [N, 4, 8, 8] (times the scaling factor unless `scaled` is False, as IP2P's image input and
    as `InstructPix2PixEditor` divides it out again)."""
    latents = torch.cat([vae_encode(vae, to_pixels(c, device)) for c in images.split(ENCODE_CHUNK)])
    return latents if scaled else latents / vae.config.scaling_factor


def stage_vae(w: World) -> None:
    torch.manual_seed(w.options.seed)
    vae = build_vae().to(w.device).train()
    gen, images, p = w.generator(VAE_GENERATOR), w.train.images.to(w.device), w.profile

    def loss_fn(step: int) -> torch.Tensor:
        x = to_pixels(images[w.batch_index(len(images), p.vae_batch, gen)], w.device)
        with autocast(w.device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(gen)).sample
        return F.mse_loss(recon.float(), x) + KL_WEIGHT * posterior.kl().mean()

    fit("vae", list(vae.parameters()), loss_fn, p.vae_steps, lr=VAE_LR, log=w.log, weight_decay=0.0,
        max_seconds=w.options.max_seconds.get("vae"))
    vae.eval()
    with torch.no_grad():  # SD's 0.18215 plays this role: unit-variance latents for the diffusion model
        sample = images[: min(len(images), SCALING_IMAGES)]
        means = torch.cat([vae.encode(to_pixels(chunk, w.device)).latent_dist.mean
                           for chunk in sample.split(SCALING_CHUNK)])
    vae.register_to_config(scaling_factor=round(1.0 / means.std().item(), SCALING_DIGITS))
    w.log.write(stage="vae", scaling_factor=vae.config.scaling_factor)
    save_half(vae, w.out / "vae")


def stage_decoder(w: World) -> None:
    """Fine-tune the VAE decoder on the frozen encoder's latents (as SD's ft-MSE decoder): the latents the teacher
    learned stay exactly the same, so this can run before or after the teacher."""
    vae, p = load_vae(w), w.profile
    vae.decoder.train().requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    gen, images = w.generator(DECODER_GENERATOR), w.train.images.to(w.device)

    def loss_fn(step: int) -> torch.Tensor:
        x = to_pixels(images[w.batch_index(len(images), p.vae_batch, gen)], w.device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        with autocast(w.device):
            recon = vae.decode(z).sample
        return F.mse_loss(recon.float(), x)

    fit("decoder", params, loss_fn, p.decoder_steps, lr=DECODER_LR, log=w.log, weight_decay=0.0,
        max_seconds=w.options.max_seconds.get("decoder"))
    save_half(vae, w.out / "vae")
