"""iCD training with Lightning on a micro w-embedded UNet with Gaussian-mixture latents (no VAE in the loop), CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from editlab.editors.base import EditRequest, build_editor
from editlab.icd.data import collate
from editlab.icd.guidance import GuidancePolicy
from editlab.icd.lora import FORWARD, REVERSE, AdapterSwitch, load_adapter
from editlab.icd.schedule import BoundarySchedule
from editlab.icd.training import (
    LOSSES,
    ICDModule,
    LoraSettings,
    LossSettings,
    OptimSettings,
    labelled_grid,
    load_teacher,
)
from editlab.models.builders import build_tiny
from editlab.models.components import Components
from editlab.models.families import FAMILIES
from editlab.models.guidance import unet_guidance
from editlab.models.loading import load_components, sd_scheduler

CAPTIONS = ("a red circle", "a blue square", "a green star")


def micro_components(seed: int = 0) -> Components:
    """A w-embedded UNet on 8x8 latents (two blocks, one with cross-attention) and the tiny VAE / text encoder."""
    _, vae, text_encoder, tokenizer = build_tiny(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, time_cond_proj_dim=512,
    )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(name="micro", family=FAMILIES["sd"], scheduler=sd_scheduler(),
                      modules=dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer),
                      device=torch.device("cpu"), dtype=torch.float32, vae_dtype=torch.float32, resolution=32)


class MixtureLatents(Dataset):
    """x0 = centre_k + 0.1 noise with caption k; the centres are smooth [4, 8, 8] patterns."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(len(CAPTIONS), 4, 2, 2, generator=torch.Generator().manual_seed(0))
        centres = torch.nn.functional.interpolate(coarse, size=8, mode="bilinear", align_corners=False)
        self.labels = torch.randint(len(CAPTIONS), (n,), generator=g)
        self.latents = centres[self.labels] + 0.1 * torch.randn(n, 4, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "caption": CAPTIONS[int(self.labels[i])]}

    def captions(self) -> list[str]:
        return [CAPTIONS[int(k)] for k in self.labels]


def loader(n: int = 64, batch_size: int = 4) -> DataLoader:
    return DataLoader(MixtureLatents(n), batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate)


SMALL = dict(lora=LoraSettings(rank=4), optim=OptimSettings(lr=1e-3))


def make_module(**kwargs) -> ICDModule:
    return ICDModule(micro_components(), BoundarySchedule(4), GuidancePolicy(scale=7.0), **(SMALL | kwargs))


def trainer(iterations: int, module: ICDModule, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(max_steps=iterations * module.steps_per_iteration, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=list(callbacks), **kwargs)


def lora_snapshot(module: ICDModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.unet.named_parameters() if ".lora_" in n}


class StepRecorder(pl.Callback):
    """At every optimizer step: the loss being stepped, the optimizer, and which parameters hold a gradient."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        index = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
        with_grad = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        self.steps.append((module.current_loss, index, with_grad))


def names_of(module, adapter):
    return {n for n, p in module.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n}


def test_each_loss_steps_its_own_adapter_in_order():
    pl.seed_everything(0)
    module = make_module()
    recorder = StepRecorder()
    trainer(1, module, [recorder]).fit(module, train_dataloaders=loader())
    assert [(loss, index) for loss, index, _ in recorder.steps] == [
        ("reverse_cd", 0), ("forward_cd", 1), ("forward_preservation", 1), ("reverse_preservation", 0)]
    forward, reverse = names_of(module, FORWARD), names_of(module, REVERSE)
    for loss, _, with_grad in recorder.steps:
        own = reverse if loss in ("reverse_cd", "reverse_preservation") else forward
        assert with_grad and with_grad <= own, loss  # nothing outside the stepped adapter: base, cond_proj, VAE, CLIP
        assert len(with_grad) >= len(own) / 2  # at least every lora_B of it (lora_A has zero grad while B = 0)
    assert module.iteration == 1 and module.trainer.global_step == 4


def test_joint_topology_one_step_on_both_adapters():
    pl.seed_everything(0)
    module = make_module(optim=OptimSettings(topology="joint", lr=1e-3))
    recorder = StepRecorder()
    trainer(1, module, [recorder]).fit(module, train_dataloaders=loader())
    assert len(recorder.steps) == 1 and recorder.steps[0][0] == "total"
    with_grad = recorder.steps[0][2]
    assert with_grad & names_of(module, FORWARD) and with_grad & names_of(module, REVERSE)
    assert with_grad <= names_of(module, FORWARD) | names_of(module, REVERSE)


def test_students_start_as_the_teacher_and_move_apart():
    pl.seed_everything(0)
    module = make_module()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([19, 999]), module.encode_text(list(CAPTIONS[:2]))
    w = torch.tensor([0.0, 7.0])
    outputs = {a: module.eps_fn(a)(x, t, text, w) for a in (None, FORWARD, REVERSE)}
    assert torch.equal(outputs[FORWARD], outputs[None]) and torch.equal(outputs[REVERSE], outputs[None])
    trainer(2, module).fit(module, train_dataloaders=loader())
    with torch.no_grad():
        after = {a: module.eps_fn(a)(x, t, text, w) for a in (None, FORWARD, REVERSE)}
    assert torch.equal(after[None], outputs[None])  # the teacher (adapters disabled) never changes
    assert not torch.allclose(after[FORWARD], after[REVERSE])


def test_ema_targets_track_the_students():
    pl.seed_everything(0)
    module = make_module(loss=LossSettings(ema_decay=0.5))
    trainer(1, module).fit(module, train_dataloaders=loader())
    named = dict(module.named_parameters())
    for adapter in (FORWARD, REVERSE):
        online_b = [n for n in names_of(module, adapter) if ".lora_B." in n]
        assert online_b
        for name in online_b:  # B starts at 0 in both, so one EMA update with decay 0.5 halves the online B
            ema = named[name.replace(f".{adapter}.", f".{adapter}_ema.")]
            assert not ema.requires_grad and named[name].abs().sum() > 0
            assert torch.allclose(ema, 0.5 * named[name], atol=1e-7)


def test_checkpoint_holds_adapters_only_and_resumes(tmp_path):
    pl.seed_everything(0)
    module = make_module()
    first = trainer(1, module)
    first.fit(module, train_dataloaders=loader())
    first.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all(".lora_" in k for k in checkpoint["state_dict"])
    assert checkpoint["icd"]["iteration"] == 1 and len(checkpoint["optimizer_states"]) == 2
    saved = lora_snapshot(module)

    class Capture(pl.Callback):
        def on_train_start(self, trainer, module):
            self.weights = lora_snapshot(module)

    resumed, capture = make_module(), Capture()
    trainer(2, resumed, [capture]).fit(resumed, train_dataloaders=loader(), ckpt_path=tmp_path / "last.ckpt")
    assert all(torch.equal(capture.weights[n], saved[n]) for n in saved)
    assert resumed.iteration == 2 and resumed.trainer.global_step == 8

    bad = ICDModule(micro_components(), BoundarySchedule(3), GuidancePolicy(), lora=LoraSettings(rank=4))
    with pytest.raises(ValueError, match="boundaries"):
        trainer(2, bad).fit(bad, train_dataloaders=loader(), ckpt_path=tmp_path / "last.ckpt")


def test_validation_grid_is_enlarged_and_its_rows_labelled():
    rows = [torch.full((2, 3, 32, 48), value) for value in (0.0, 0.5, 1.0)]
    picture = np.asarray(labelled_grid(rows, ["originals", "reconstructions", "generations"]))
    margin = picture.shape[1] - 2 * 48 * 8  # 32 px high -> 256: eight times, nearest
    assert picture.shape[0] == 3 * 256 and margin > 0
    for row, value in enumerate((0, 128, 255)):
        band = picture[row * 256:(row + 1) * 256]
        assert (band[:, margin:] == value).all()  # the images, not smoothed
        assert (band[:, :margin] < 100).any() and (band[:, :margin] == 255).any()  # dark label on white


def test_export_is_what_the_editor_loads(tmp_path):
    pl.seed_everything(0)
    schedule = BoundarySchedule(3, reverse=[0, 339, 699], forward=[339, 699, 999])
    module = ICDModule(micro_components(), schedule, GuidancePolicy(), **SMALL)
    trainer(1, module).fit(module, train_dataloaders=loader())
    paths = module.export_adapters(tmp_path)
    info = json.loads((tmp_path / "schedule.json").read_text())
    assert info["reverse_steps"] == [339, 699, 999] and info["forward_steps"] == [19, 339, 699]
    assert BoundarySchedule.from_inference_steps(info["reverse_steps"], info["forward_steps"]).reverse_pairs() \
        == schedule.reverse_pairs()  # the tables every entry point builds agree

    fresh = micro_components().unet
    load_adapter(fresh, FORWARD, paths["forward"])
    load_adapter(fresh, REVERSE, paths["reverse"])
    switch = AdapterSwitch(fresh)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([259, 999])
    text, w = module.encode_text(list(CAPTIONS[:2])), torch.tensor([0.0, 7.0])
    for adapter in (FORWARD, REVERSE):
        switch.activate(adapter)
        with torch.no_grad():
            expected = module.eps_fn(adapter)(x, t, text, w)
            assert torch.allclose(unet_guidance(fresh)(x, t, text, w), expected, atol=1e-5)


def test_sdxl_family_trains_with_pooled_and_size_conditioning(tmp_path):
    """Tiny SDXL teacher (two text encoders, text_time conditioning, two-pass CFG): each loss steps its own adapter,
    and the exported adapters drive the iCD-XL editor."""
    pl.seed_everything(0)
    tiny_sdxl = {"name": "tiny_sdxl", "kind": "tiny", "arch": "sdxl", "seed": 0, "resolution": 64}
    fp32 = {"dtype": "float32", "vae_dtype": "float32"}
    module = ICDModule(load_teacher(tiny_sdxl, fp32, {"guidance": "cfg"}), BoundarySchedule(4),
                       GuidancePolicy(scale=7.0), **SMALL)
    cond = module.encode_text(list(CAPTIONS[:2]))
    assert cond.text.shape == (2, 77, 64) and cond.added["text_embeds"].shape == (2, 32)
    assert cond.added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert cond[1:].added["text_embeds"].shape == (1, 32)  # rows select every part
    recorder = StepRecorder()
    trainer(1, module, [recorder]).fit(module, train_dataloaders=loader())
    assert [loss for loss, _, _ in recorder.steps] == list(LOSSES)
    for loss, _, with_grad in recorder.steps:
        own = names_of(module, REVERSE if loss in ("reverse_cd", "reverse_preservation") else FORWARD)
        assert with_grad and with_grad <= own, loss

    paths = module.export_adapters(tmp_path)
    editor = build_editor({"name": "icd", "method": "prompt_switch", "reverse_steps": [249, 499, 699, 999],
                           "forward_steps": [19, 249, 499, 699], "forward_lora": str(paths["forward"]),
                           "reverse_lora": str(paths["reverse"])},
                          load_components(tiny_sdxl, fp32, {"mode": "none"}, "cpu"))
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    result = editor.edit(EditRequest(image, "a red circle", "a blue circle", seed=0))
    assert result.edited.size == (64, 64) and result.nfe == 8


def test_round_trip_is_exact_only_when_untrained_students_are_consistent():
    """Validation pass wiring: seeded, deterministic, and its MSE is what it reports."""
    module = make_module()
    data = MixtureLatents(4, seed=3)
    text = module.encode_text(data.captions())
    first, second = module.round_trip(data.latents, text), module.round_trip(data.latents, text)
    assert torch.equal(first["reconstruction"], second["reconstruction"])
    assert torch.isclose(first["latent_mse"], (first["reconstruction"] - data.latents).pow(2).mean())
    assert first["generation"].shape == data.latents.shape


@pytest.mark.slow
def test_training_lowers_all_four_losses_and_the_round_trip_error():
    """200 iterations of the full four-loss loop (m = 2) on mixture latents: every loss falls and the
    forward-then-reverse reconstruction error drops by well over 30 % (measured: the slowest loss, reverse CD, to
    0.87 of its start over 40-iteration windows; the round trip to 0.02)."""
    pl.seed_everything(0)
    module = ICDModule(micro_components(), BoundarySchedule(2), GuidancePolicy(scale=0.0),
                       lora=LoraSettings(rank=8), optim=OptimSettings(lr=2e-3))
    validation = MixtureLatents(16, seed=5)
    text = module.encode_text(validation.captions())

    class Record(pl.Callback):
        def __init__(self):
            self.losses, self.round_trip = [], []

        def on_train_start(self, trainer, module):
            self.round_trip.append(module.round_trip(validation.latents, text)["latent_mse"].item())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append([float(trainer.callback_metrics[f"train/{n}"]) for n in LOSSES])

        def on_train_end(self, trainer, module):
            self.round_trip.append(module.round_trip(validation.latents, text)["latent_mse"].item())

    record = Record()
    trainer(200, module, [record]).fit(module, train_dataloaders=loader(512, 8))
    losses = np.array(record.losses)  # [iterations, 4]
    first, last = losses[:40].mean(0), losses[-40:].mean(0)
    assert (last < first).all(), dict(zip(LOSSES, zip(first, last)))
    assert record.round_trip[-1] < 0.7 * record.round_trip[0], record.round_trip
