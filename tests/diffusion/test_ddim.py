"""DDIM math: grids, jumps, CFG."""

import torch

from editlab.diffusion.ddim import ddim_jump, ddim_timesteps


def test_reference_grid():
    assert ddim_timesteps(50) == list(range(980, -1, -20))
    assert ddim_timesteps(10)[:2] == [900, 800] and ddim_timesteps(10)[-1] == 0
    assert ddim_timesteps(6) == [830, 664, 498, 332, 166, 0]  # stride 1000 // 6, always ending at 0


def test_jump_round_trip_and_identity():
    torch.manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    a, b = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    assert torch.allclose(ddim_jump(ddim_jump(x, eps, a, b), eps, b, a), x, atol=1e-12)
    assert torch.allclose(ddim_jump(x, eps, a, a), x, atol=1e-12)
    x0 = ddim_jump(x, eps, a, 1.0)  # hard boundary: the clean prediction
    assert torch.allclose(x0, (x - (1 - a).sqrt() * eps) / a.sqrt())


