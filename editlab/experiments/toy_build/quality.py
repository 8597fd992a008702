"""Stage 8, eval: the quality bars, measured through `models.loading.load_components` on the saved files and
written to ``<out>/quality.json``: VAE PSNR, CLIP zero-shot accuracy, teacher samples judged by the toy CLIP (next
to the judge's score on the real scenes of the same captions), DDIM inversion round trips (unguided, CFG 7.5, CFG
7.5 with Null-Text Inversion), InstructPix2Pix edits of held-out triples against their ground truth, and the flow
teacher's samples and round trips."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from editlab.conf import CONF, group_config
from editlab.diffusion.solver import euler_step, midpoint_step, solve
from editlab.experiments.toy_build.data import EVAL_EDIT_STREAM, item_rng
from editlab.experiments.toy_build.flow import FLOW_FOLDER
from editlab.experiments.toy_build.judge import ToyClip, accuracy, psnr
from editlab.experiments.toy_build.options import LATENT_SIZE, SIZE
from editlab.experiments.toy_build.vae import encode_latents
from editlab.experiments.toy_build.world import World
from editlab.models.components import vae_decode
from editlab.models.guidance import Guidance
from editlab.models.images import to_uint8
from editlab.models.loading import load_components
from editlab.toyworld.scenes import make_edit

FP32 = {"dtype": "float32", "vae_dtype": "float32"}  # the bars are measured in full precision
TEACHER_SCALES = (3.0, 5.0, 7.5)  # the CFG scales of the teacher's samples; 3: the toy tour's guidance
ROUND_TRIP_SCALE = 7.5  # the CFG scale of the guided round trips (SD's usual one, as in Null-Text Inversion)
FLOW_SAMPLE_STEPS, FLOW_SAMPLE_SCALE = 28, 3.0  # SD3's default step count; the toy's best CFG


@torch.no_grad()
def guided_denoise(c, x_t: torch.Tensor, cond: torch.Tensor, uncond_steps: list[torch.Tensor], scale: float,
                   num_steps: int) -> torch.Tensor:
    """Plain DDIM sampling from x_t [B, 4, h, w] with CFG `scale` (1 = conditional only, no unconditional pass);
    `uncond_steps[i]` is the unconditional embedding of step i ([1 or B, L, D])."""
    guidance = Guidance(c.predict)

    def eps(i: int, latents: torch.Tensor, t: int) -> torch.Tensor:
        return guidance(latents, t, cond, scale, uncond_steps[i] if guidance.needs_uncond(scale) else None)

    return solve(x_t, c.schedule.pairs(num_steps), eps, c.schedule)[-1]


def decode(c, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return to_uint8(vae_decode(c.vae, latents))


def stage_eval(w: World) -> dict:
    from editlab.editors.ddim_p2p import DDIMP2PEditor
    from editlab.editors.null_text import NullTextEditor

    p, device = w.profile, w.device
    model = {"name": "toy", "kind": "pretrained", "path": str(w.out.resolve()), "resolution": SIZE}
    c = load_components(model, FP32, {"mode": "none"}, str(device))
    judge = ToyClip(w.out / "clip", device)
    held, n = w.heldout, min(p.eval_images, len(w.heldout.captions))
    report: dict = {"profile": w.options.profile, "eval_images": n, "ddim_steps": p.eval_steps}

    # 1. VAE reconstruction on held-out scenes (the ceiling of every edit)
    images = held.images[:n]
    z0 = encode_latents(c.vae, images, device)
    recon = decode(c, z0)
    report["vae_psnr"] = float(np.mean([psnr(a, b) for a, b in zip(recon, images.numpy())]))

    # 2. toy CLIP zero-shot: shape, colour and background of held-out scenes
    report["clip_zero_shot"] = accuracy(judge.checks(held.images, held.scenes))

    # 3. teacher: held-out captions sampled with 50-step DDIM + CFG, judged by the toy CLIP
    m = min(p.teacher_images, len(held.captions))
    report["teacher_images"] = m
    uncond = c.encode_prompts([""])
    cond = c.encode_prompts(held.captions[:m])
    gen = torch.Generator(device).manual_seed(w.options.seed)
    noise = torch.randn((m, 4, LATENT_SIZE, LATENT_SIZE), generator=gen, device=device)
    for scale in TEACHER_SCALES:
        samples = decode(c, guided_denoise(c, noise, cond, [uncond] * p.eval_steps, scale, p.eval_steps))
        report[f"teacher_cfg{scale:g}"] = accuracy(judge.checks(torch.from_numpy(samples), held.scenes[:m]))
    # the judge's own score on the real scenes of those captions, and on their VAE reconstructions: every sample is
    # decoded by this VAE, so a teacher that drew the exact latents of the real scenes would score the latter
    report["teacher_judge_on_real_scenes"] = accuracy(judge.checks(held.images[:m], held.scenes[:m]))
    reconstructions = torch.from_numpy(decode(c, encode_latents(c.vae, held.images[:m], device)))
    report["teacher_judge_on_vae_reconstructions"] = accuracy(judge.checks(reconstructions, held.scenes[:m]))
    seen = set(w.train.captions) if w.train else set()
    report["teacher_captions_unseen_in_training"] = float(np.mean([cap not in seen for cap in held.captions[:m]]))
    cond = cond[:n]

    # 4. DDIM inversion round trips: unguided, and under CFG 7.5 with the "" embedding or Null-Text Inversion's
    ddim = DDIMP2PEditor(c, num_steps=p.eval_steps)
    trajectory = ddim.invert(z0, cond)
    sources = images.numpy()

    def round_trip(latents: torch.Tensor, k: int | None = None) -> float:
        out = decode(c, latents)
        return float(np.mean([psnr(a, b) for a, b in zip(out, sources[: k or n])]))

    report["ddim_round_trip_psnr"] = round_trip(guided_denoise(c, trajectory[-1], cond, [], 1.0, p.eval_steps))
    report["ddim_cfg7.5_round_trip_psnr"] = round_trip(
        guided_denoise(c, trajectory[-1], cond, [uncond] * p.eval_steps, ROUND_TRIP_SCALE, p.eval_steps))
    k = min(p.nti_images, n)
    nti = NullTextEditor(c, num_steps=p.eval_steps)
    nti_latents, plain_latents = [], []
    for i in range(k):
        traj = nti.invert(z0[i : i + 1], cond[i : i + 1])
        nulls, _ = nti.null_embeddings(traj, cond[i : i + 1], uncond)
        nti_latents.append(guided_denoise(c, traj[-1], cond[i : i + 1], nulls, ROUND_TRIP_SCALE, p.eval_steps))
        plain_latents.append(guided_denoise(c, traj[-1], cond[i : i + 1], [uncond] * p.eval_steps, ROUND_TRIP_SCALE,
                                            p.eval_steps))
    report["nti_images"] = k
    report["ddim_cfg7.5_round_trip_psnr_nti_subset"] = round_trip(torch.cat(plain_latents), k)
    report["nti_cfg7.5_round_trip_psnr"] = round_trip(torch.cat(nti_latents), k)
    report["vae_psnr_nti_subset"] = float(np.mean([psnr(a, b) for a, b in zip(recon[:k], sources[:k])]))

    # 5. the InstructPix2Pix UNet on held-out edit triples
    if (w.out / "ip2p_unet").is_dir():
        report["ip2p"] = ip2p_report(w, model, judge, n=max(1, n // 2), steps=p.eval_steps)

    # 6. the flow teacher: samples and Euler / midpoint round trips
    if (w.out / FLOW_FOLDER / "transformer").is_dir():
        report["flow"] = flow_report(w, judge, z0, report["vae_psnr"])
    return report


@torch.no_grad()
def flow_sample(c, x: torch.Tensor, cond, scale: float, num_steps: int, inverse: bool = False,
                step=euler_step) -> torch.Tensor:
    """The flow model's ODE from x over its ``num_steps`` grid (``inverse``: data to noise) under CFG ``scale``."""
    guidance = c.guidance()
    return solve(x, c.schedule.pairs(num_steps, inverse=inverse), lambda i, y, t: guidance(y, t, cond, scale),
                 c.schedule, step=step, predicts="flow")[-1]


def flow_report(w: World, judge: ToyClip, z0: torch.Tensor, vae_psnr: float) -> dict:
    """The toy flow teacher (``model=toy_flow``, loaded from ``<out>/flow``): held-out captions sampled with
    `FLOW_SAMPLE_STEPS` Euler steps at the toy's CFG 3 and judged by the toy CLIP; unguided inversion then
    regeneration of held-out scenes (their own captions, `eval_steps` steps) with Euler and with the midpoint rule
    (RF-Solver's step, twice the calls), against the VAE's own PSNR on them (the ceiling)."""
    p, held = w.profile, w.heldout
    model = {**group_config("model", "toy_flow"),
             "path": str((w.out / FLOW_FOLDER).resolve()), "vae_path": str((w.out / "vae").resolve())}
    c = load_components(model, FP32, {"mode": "none"}, str(w.device))
    m = min(p.teacher_images, len(held.captions))
    gen = torch.Generator(w.device).manual_seed(w.options.seed)
    noise = torch.randn((m, *z0.shape[1:]), generator=gen, device=w.device)
    samples = decode(c, flow_sample(c, noise, c.conditioning(held.captions[:m]), FLOW_SAMPLE_SCALE,
                                    FLOW_SAMPLE_STEPS))
    report = {"images": m, "sample_steps": FLOW_SAMPLE_STEPS, "sample_cfg": FLOW_SAMPLE_SCALE,
              "samples": accuracy(judge.checks(torch.from_numpy(samples), held.scenes[:m])),
              "round_trip_steps": p.eval_steps, "vae_psnr": vae_psnr}
    cond, sources = c.conditioning(held.captions[: len(z0)]), held.images[: len(z0)].numpy()
    for name, step in (("euler", euler_step), ("midpoint", midpoint_step)):
        noised = flow_sample(c, z0, cond, 1.0, p.eval_steps, inverse=True, step=step)
        out = decode(c, flow_sample(c, noised, cond, 1.0, p.eval_steps, step=step))
        report[f"{name}_round_trip_psnr"] = float(np.mean([psnr(a, b) for a, b in zip(out, sources)]))
    return report


def ip2p_settings(steps: int) -> dict[str, DictConfig]:
    """The InstructPix2Pix editor's settings as `python run.py` composes them: "piebench", its own
    (conf/editor/instruct_pix2pix.yaml) at `steps` steps (PIE-Bench: 50), and "tour", the toy tour's
    (conf/editor_settings/toy over them, settings=toy)."""
    single_job = ["~experiment", "editor=instruct_pix2pix"]
    with contextlib.ExitStack() as stack:
        if not GlobalHydra.instance().is_initialized():  # inside a Hydra app (or test) its own config search applies
            stack.enter_context(initialize_config_dir(config_dir=str(CONF), version_base="1.3"))
        return {"piebench": compose(config_name="run", overrides=[*single_job, f"editor.num_steps={steps}"]).editor,
                "tour": compose(config_name="run", overrides=[*single_job, "settings=toy"]).editor}


def ip2p_report(w: World, model: dict, judge: ToyClip, n: int, steps: int) -> dict:
    """InstructPix2Pix edits of `n` edit triples from a stream its training never saw, with the editor's PIE-Bench
    settings and with the toy tour's (`ip2p_settings`): PSNR to the ground-truth target and the toy-CLIP gain of the
    target caption (cosine x 100), next to the unedited source's PSNR to the target (what a do-nothing edit scores)."""
    from editlab.editors.instruct_pix2pix import InstructPix2PixEditor

    settings = ip2p_settings(steps)
    c = load_components({**model, "unet_path": str(w.out / "ip2p_unet")}, FP32, {"mode": "none"}, str(w.device))
    edits = [make_edit("0", item_rng(w.options.seed, EVAL_EDIT_STREAM, i), SIZE) for i in range(n)]
    sources = np.stack([e.source.render(SIZE) for e in edits])
    targets = np.stack([e.target.render(SIZE) for e in edits])
    image_latents = encode_latents(c.vae, torch.from_numpy(sources), w.device, scaled=False)
    target_text = judge.text([e.target.caption() for e in edits])

    def target_score(images: np.ndarray) -> np.ndarray:
        return 100 * (judge.image(torch.from_numpy(images)) * target_text).sum(-1).cpu().numpy()

    report = {"items": n, "source_gt_psnr": float(np.mean([psnr(a, b) for a, b in zip(sources, targets)]))}
    for name, config in settings.items():
        options = {key: config[key] for key in ("num_steps", "guidance_scale", "image_guidance_scale")}
        editor = InstructPix2PixEditor(c, **options)
        edited = np.concatenate([
            decode(c, editor.sample(image_latents[i : i + 1], e.instruction, torch.Generator("cpu").manual_seed(i)))
            for i, e in enumerate(edits)
        ])
        report[name] = {**options, "gt_psnr": float(np.mean([psnr(a, b) for a, b in zip(edited, targets)])),
                        "clip_gain": float(np.mean(target_score(edited) - target_score(sources)))}
    return report
