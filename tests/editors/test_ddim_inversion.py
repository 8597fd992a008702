"""DDIM inversion through the editors' shared loop on the tiny model."""

import torch

from editlab.diffusion.ddim import ddim_jump
from editlab.editors.ddim_p2p import DDIMP2PEditor


def test_inversion_trajectory_shape_and_identity_first_step(tiny_components):
    editor = DDIMP2PEditor(tiny_components, num_steps=10)
    z0 = torch.randn(1, 4, 16, 16)
    trajectory = editor.invert(z0, tiny_components.encode_prompts(["a red circle"]))
    assert len(trajectory) == 11
    assert torch.equal(trajectory[1], trajectory[0])  # abar_final = abar_0: the first step is exactly the identity


def _round_trip_error(components, steps: int, z0, cond) -> float:
    editor = DDIMP2PEditor(components, num_steps=steps)
    z = editor.invert(z0, cond)[-1]
    with torch.no_grad():
        for t, s in editor.pairs:  # unguided (conditional) denoising, the exact reverse of the inversion
            z = ddim_jump(z, components.predict(z, t, cond), components.schedule.abar(t), components.schedule.abar(s))
    return (z - z0).pow(2).mean().item()


def test_inversion_reconstructs_better_with_more_steps(tiny_components):
    torch.manual_seed(0)
    z0 = torch.randn(1, 4, 16, 16)
    cond = tiny_components.encode_prompts(["a blue square"])
    errors = [_round_trip_error(tiny_components, n, z0, cond) for n in (10, 25, 100)]
    assert errors[0] > errors[1] > errors[2], errors
