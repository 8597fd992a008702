"""Noise schedules: the one t < 0 convention, and the flow-matching grid as diffusers' scheduler builds it."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from editlab.diffusion.predictions import PREDICTION_TYPES, Prediction, from_prediction, to_prediction
from editlab.diffusion.schedules import FlowSchedule, VPSchedule
from editlab.models.loading import sd_scheduler


def test_time_below_zero_is_abar_0_the_reference_ddim_final_value():
    """One convention: every sampler's t < 0 is abar_0 — what the SD scheduler editlab builds stores as its final
    value (set_alpha_to_one=False), so the first inversion step is exactly the identity."""
    scheduler = sd_scheduler()
    vp = VPSchedule(scheduler.alphas_cumprod.float())
    assert torch.equal(vp.abar(-20), scheduler.final_alpha_cumprod) and torch.equal(vp.abar(-20), vp.abar(0))
    assert all(map(torch.equal, vp.scales(-1), vp.scales(0)))
    alpha, sigma = vp.scales(500)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.tensor(1.0))


def test_pairs_walk_the_ddim_grid_both_ways():
    vp = VPSchedule(DDIMScheduler().alphas_cumprod)
    assert vp.pairs(5) == [(800, 600), (600, 400), (400, 200), (200, 0), (0, -200)]
    assert vp.pairs(5, inverse=True) == [(-200, 0), (0, 200), (200, 400), (400, 600), (600, 800)]


@pytest.mark.parametrize("shift, steps", [(1.0, 28), (3.0, 50), (3.0, 4)])
def test_static_shift_grid_is_diffusers(shift, steps):
    """SD3's static shift, double shift included (the last non-zero sigma at shift 3, 50 steps is ~0.00893)."""
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(steps)
    ours = FlowSchedule(shift=shift).sigmas(steps)
    torch.testing.assert_close(torch.tensor(ours), reference.sigmas.float(), rtol=0, atol=1e-6)
    if shift == 3.0 and steps == 50:
        assert math.isclose(ours[-2], 0.00893, abs_tol=5e-5)


@pytest.mark.parametrize("seq_len", [64, 1024, 4096])
def test_dynamic_shift_grid_is_diffusers(seq_len):
    """FLUX: shift exp(mu), mu linear in the token count, over linspace(1, 1/N, N)."""
    schedule = FlowSchedule(dynamic=True)
    mu = math.log(schedule.shift_for(seq_len))
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    reference.set_timesteps(sigmas=[1.0 - k / 28 for k in range(28)], mu=mu)
    torch.testing.assert_close(torch.tensor(schedule.sigmas(28, seq_len)), reference.sigmas.float(), rtol=0,
                               atol=1e-6)
    with pytest.raises(ValueError, match="seq_len"):
        schedule.sigmas(28)


def test_the_grid_is_chosen_apart_from_the_shift():
    """The unshifted grid is the pipeline's choice: FLUX's pipelines pass linspace(1, 1/N, N) also to a static shift
    (schnell), and a dynamic shift without it steps on the scheduler's own grid; a schedule's ``seq_len`` is the
    default token count."""
    reference = FlowMatchEulerDiscreteScheduler(shift=1.0)
    reference.set_timesteps(sigmas=[1.0 - k / 4 for k in range(4)])
    torch.testing.assert_close(torch.tensor(FlowSchedule(grid="uniform").sigmas(4)), reference.sigmas, rtol=0, atol=0)
    schedule = FlowSchedule(dynamic=True, grid="train", seq_len=1024)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    reference.set_timesteps(10, mu=math.log(schedule.shift_for()))
    torch.testing.assert_close(torch.tensor(schedule.sigmas(10)), reference.sigmas, rtol=0, atol=1e-6)
    assert schedule.sigmas(10) != schedule.sigmas(10, seq_len=4096)
    with pytest.raises(ValueError, match="grid"):
        FlowSchedule(grid="karras")


def test_flow_scales_and_pairs():
    flow = FlowSchedule()
    alpha, sigma = flow.scales(0.25)
    assert alpha.item() == 0.75 and sigma.item() == 0.25
    pairs = flow.pairs(4)
    assert pairs[0][0] == 1.0 and pairs[-1][1] == 0.0 and flow.pairs(4, inverse=True)[0] == (0.0, pairs[-1][0])


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_predictions_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor(0.4, dtype=torch.float64)
    alpha = 1 - sigma if kind == "flow" else (1 - sigma**2).sqrt()
    x = alpha * x0 + sigma * eps
    out = from_prediction(Prediction(x0, eps), kind, alpha, sigma)
    back = to_prediction(out, kind, x, alpha, sigma)
    torch.testing.assert_close(back.x0, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(back.eps, eps, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="prediction type"):
        to_prediction(out, "sample", x, alpha, sigma)
