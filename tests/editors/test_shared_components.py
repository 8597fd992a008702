"""Editors leave the shared components as they found them: every editor, in turn on one set of components per
architecture, edits and is closed; after each edit the UNet's weights, parameter names, attention processors and
adapters are those it had before the edit, and after closing those it had before the editor was built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editlab.editors.base import EditRequest, build_editor
from editlab.models.loading import load_components

FP32, NO_OFFLOAD = {"dtype": "float32", "vae_dtype": "float32"}, {"mode": "none"}
P2P = {"num_steps": 3}
SD = [("ddim_p2p", P2P), ("npi", P2P), ("direct_inversion", P2P), ("null_text", P2P | {"num_inner_steps": 2}),
      ("pix2pix_zero", {"num_steps": 3, "num_reg_steps": 1}), ("identity", {}), ("icd", {}),
      ("icd", {"fuse_adapters": True}), ("icd", {"method": "prompt_switch"})]
CASES = [("sd", SD), ("ip2p", [("instruct_pix2pix", {"num_steps": 2})]),
         ("sdxl", [("lcm_controlnet", {}), ("lcm_controlnet", {"attention_slicing": True}),
                   ("icd", {"method": "prompt_switch", "reverse_steps": [499, 999], "forward_steps": [19, 499]})])]


def state(components) -> dict:
    unet = components.unet
    return {"unet": unet, "weights": {k: v.clone() for k, v in unet.state_dict().items()},
            "processors": {k: type(p) for k, p in unet.attn_processors.items()},
            "adapters": sorted(getattr(unet, "peft_config", {})), "pipeline": components.pipeline}


def assert_same(before: dict, now: dict, when: str) -> None:
    assert now["unet"] is before["unet"], when
    assert now["weights"].keys() == before["weights"].keys(), when
    changed = [k for k in before["weights"] if not torch.equal(before["weights"][k], now["weights"][k])]
    assert not changed, (when, changed[:5])
    assert now["processors"] == before["processors"] and now["adapters"] == before["adapters"], when
    assert now["pipeline"] is before["pipeline"], when


@pytest.mark.parametrize(("arch", "editors"), CASES, ids=[arch for arch, _ in CASES])
def test_every_editor_leaves_the_shared_components_as_it_found_them(arch, editors):
    components = load_components({"name": f"tiny_{arch}", "kind": "tiny", "arch": arch, "seed": 0,
                                  "resolution": 64}, FP32, NO_OFFLOAD, "cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    request = EditRequest(image, "a cat on a mat", "a dog on a mat", "make it a dog", ("cat", "dog"), seed=0)
    for name, params in editors:
        original = state(components)
        with build_editor({"name": name, **params}, components) as editor:
            built = state(components)
            editor.edit(request)
            assert_same(built, state(components), f"{name} {params}: after an edit")
        assert_same(original, state(components), f"{name} {params}: after close")
