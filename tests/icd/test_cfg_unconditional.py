"""CFG's unconditional branch follows the base model's pipeline: diffusers' SDXL pipelines (their config's
``force_zeros_for_empty_prompt``) and iCD-XL's training feed zero token and pooled embeddings, SD1.x pipelines the
encoded empty prompt; guidance distillation's two-pass target and iCD's ``guidance: cfg`` teacher, in training and in
the editor, do the same."""

from __future__ import annotations

import json

import pytest
import torch

from editlab.editors.base import build_editor
from editlab.icd.guidance import GuidancePolicy
from editlab.icd.guidance_distillation import DistillSettings, GuidanceDistillationModule
from editlab.icd.schedule import BoundarySchedule
from editlab.icd.training import ICDModule, OptimSettings, load_teacher
from editlab.models.families import family_of
from editlab.models.loading import load_components

TINY = {"name": "tiny", "kind": "tiny", "seed": 0, "resolution": 64}
TINY_SDXL = {"name": "tiny_sdxl", "kind": "tiny", "arch": "sdxl", "seed": 0, "resolution": 64}
FP32 = {"dtype": "float32", "vae_dtype": "float32"}


def unconditional_rows(guided, unet, text) -> tuple[torch.Tensor, dict | None]:
    """What a guided call hands the UNet as the unconditional rows (the first half of its CFG batch)."""
    seen = []
    handle = unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        guided(torch.randn(1, 4, 8, 8), torch.tensor([500]), text, torch.tensor([7.0]))
    finally:
        handle.remove()
    added = seen[0].get("added_cond_kwargs")
    return seen[0]["encoder_hidden_states"][:1], added and {k: v[:1] for k, v in added.items()}


@pytest.mark.parametrize("model,zeros", [(TINY, False), (TINY_SDXL, True)], ids=["sd", "sdxl"])
def test_the_unconditional_branch_is_zeros_for_sdxl_and_the_empty_prompt_for_sd(model, zeros):
    components = load_components(model, FP32, {"mode": "none"}, "cpu")
    empty = components.conditioning([""])
    distill = GuidanceDistillationModule(components, DistillSettings(), OptimSettings(lr=1e-3))
    icd = ICDModule(load_teacher(model, FP32, {"guidance": "cfg"}), BoundarySchedule(4), GuidancePolicy(scale=7.0),
                    guidance="cfg")
    editor = build_editor({"name": "icd", "method": "prompt_switch", "guidance": "cfg"}, components)
    text = components.conditioning(["a red circle"])
    teachers = (distill.guided[0], distill.teacher_unet), (icd.guided, icd.unet), (editor.eps, editor.components.unet)
    for guided, unet in teachers:
        uncond, added = unconditional_rows(guided, unet, text)
        assert torch.equal(uncond, torch.zeros_like(empty.text) if zeros else empty.text)
        if zeros:  # the pooled embedding is zero too; the size conditioning is the image's, as in the pipeline
            assert not added["text_embeds"].any() and torch.equal(added["time_ids"], empty.added["time_ids"])
        else:
            assert added is None and empty.text.abs().sum() > 0


def test_a_pretrained_sdxl_pipeline_says_which_in_its_model_index(tmp_path):
    sdxl = {"name": "sdxl", "kind": "pretrained", "family": "sdxl", "path": str(tmp_path)}
    assert family_of(sdxl).force_zeros_for_empty_prompt(sdxl)  # no model_index.json: diffusers' SDXL default
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                           "force_zeros_for_empty_prompt": False}))
    assert not family_of(sdxl).force_zeros_for_empty_prompt(sdxl)  # e.g. the SDXL refiner
    assert not family_of(TINY).force_zeros_for_empty_prompt(TINY)
