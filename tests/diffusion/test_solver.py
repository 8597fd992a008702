"""The one solver: pairs, hooks, the skipped identity step, exactness on an analytic model, and DDIM = Euler in
rectified-flow coordinates."""

import math

import pytest
import torch

from editlab.diffusion.ddim import ddim_jump, ddim_timesteps
from editlab.diffusion.predictions import to_prediction
from editlab.diffusion.schedules import FlowSchedule, VPSchedule
from editlab.diffusion.solver import consistency_step, ddim_step, euler_step, noisier_end, solve

ALPHAS = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64)  # a decreasing abar schedule
VP = VPSchedule(ALPHAS)


def ddim_loop(x, pairs, eps_fn, **hooks):
    """The DDIM-family call: inversion evaluates the model at the noisier end of each pair."""
    return solve(x, pairs, eps_fn, VP, at=noisier_end, **hooks)


def ddim_pairs(num_steps, inverse=False):
    return VP.pairs(num_steps, inverse=inverse)


def test_pairs_walk_the_grid_both_ways():
    assert ddim_pairs(5) == [(800, 600), (600, 400), (400, 200), (200, 0), (0, -200)]
    assert ddim_pairs(5, inverse=True) == [(-200, 0), (0, 200), (200, 400), (400, 600), (600, 800)]
    assert [t for t, _ in ddim_pairs(50)] == ddim_timesteps(50)


def test_inversion_then_denoising_returns_exactly_when_the_prediction_does_not_move():
    """With a prediction that is the same at every point (a constant noise), each denoising step undoes its inversion
    step exactly: the loop pairs them up in reverse order."""
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=g) for _ in range(2))
    trajectory = ddim_loop(x0, ddim_pairs(10, inverse=True), lambda i, x, t: noise, skip_identity=True)
    assert len(trajectory) == 11 and torch.equal(trajectory[1], trajectory[0])  # the identity step, skipped
    back = ddim_loop(trajectory[-1], ddim_pairs(10), lambda i, x, t: noise)
    torch.testing.assert_close(back[-1], x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(back[5], trajectory[5], rtol=0, atol=1e-10)  # the same noise levels on the way


def test_hooks_run_in_order_and_eps_sees_the_noisier_end():
    seen = []

    def before(i, x):
        seen.append(("before", i))
        return x + 1

    def eps(i, x, t):
        seen.append(("eps", i, t, x.item()))
        return torch.zeros_like(x)

    def after(i, x):
        seen.append(("after", i))
        return x * 2

    out = ddim_loop(torch.zeros((), dtype=torch.float64), [(600, 400), (400, 200)], eps, before=before, after=after)
    assert [s[:2] for s in seen] == [("before", 0), ("eps", 0), ("after", 0), ("before", 1), ("eps", 1), ("after", 1)]
    assert [s[2] for s in seen if s[0] == "eps"] == [600, 400]  # the noisier end of each pair
    inverse = []
    ddim_loop(torch.zeros((), dtype=torch.float64), [(200, 400)],
              lambda i, x, t: inverse.append(t) or torch.zeros((), dtype=torch.float64))
    assert inverse == [400]
    # with eps = 0 a jump scales x by sqrt(abar_to / abar_from): (0 + 1) * r1 * 2, then (that + 1) * r2 * 2
    r1, r2 = math.sqrt(ALPHAS[400] / ALPHAS[600]), math.sqrt(ALPHAS[200] / ALPHAS[400])
    assert math.isclose(out[1].item(), 2 * r1) and math.isclose(out[2].item(), 2 * (2 * r1 + 1) * r2)


def test_skipped_identity_runs_no_hook_and_no_model():
    calls = []
    trajectory = ddim_loop(torch.ones(()), [(-20, 0)], lambda i, x, t: calls.append(t),
                           before=lambda i, x: calls.append("before"), skip_identity=True)
    assert calls == [] and len(trajectory) == 2 and trajectory[1] == 1


def test_start_rule_evaluates_where_each_step_begins():
    seen = []
    solve(torch.zeros(()), [(200, 400), (400, 200)], lambda i, x, t: seen.append(t) or torch.zeros(()), VP)
    assert seen == [200, 400]


def test_ddim_step_is_the_ddim_jump_bit_for_bit():
    """The solver's conversion + step reproduce `ddim_jump` exactly in fp32 (the editors' numbers do not move)."""
    abar = VPSchedule(ALPHAS.float())
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t, s in [(980, 960), (0, -20), (-20, 0), (500, 520)]:
        out = solve(x, [(t, s)], lambda i, x, t: eps, abar)[-1]
        assert torch.equal(out, ddim_jump(x, eps, abar.abar(t), abar.abar(s)))


def test_consistency_step_lands_on_the_clean_prediction_at_zero():
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    x0 = solve(x, [(259, 0)], lambda i, x, t: eps, VP, step=consistency_step)[-1]
    torch.testing.assert_close(x0, (x - (1 - ALPHAS[259]).sqrt() * eps) / ALPHAS[259].sqrt(), rtol=0, atol=1e-12)
    assert torch.equal(solve(x, [(259, 19)], lambda i, x, t: eps, VP, step=consistency_step)[-1],
                       solve(x, [(259, 19)], lambda i, x, t: eps, VP)[-1])


def _epsilon_model(seed: int = 0):
    """A nonlinear epsilon model on a VP schedule."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ a + t / 1000).view_as(x)

    return eps


@pytest.mark.parametrize("inverse", [False, True])
def test_euler_on_the_rectified_flow_view_of_an_epsilon_model_is_ddim(inverse):
    """DDIM is Euler in rectified-flow coordinates: with y = x / (alpha + sigma) and r = sigma / (alpha + sigma),
    the epsilon model is a velocity field v(y, r) = eps - x0, and Euler steps on r reproduce DDIM's steps on x."""
    eps = _epsilon_model()
    pairs = VP.pairs(10, inverse=inverse)[1 if inverse else 0:]  # no identity pair: r(-20) = r(0)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ddim = solve(x, pairs, lambda i, x, t: eps(x, t), VP, at=noisier_end)

    def scale(t: int) -> torch.Tensor:
        alpha, sigma = VP.scales(t)
        return alpha + sigma

    class FlowView:  # the epsilon model's schedule seen in flow coordinates
        @staticmethod
        def scales(r):
            r = torch.as_tensor(r, dtype=torch.float64)
            return 1 - r, r

    def velocity(i, y, r):  # the model at x_t, evaluated at the noisier end as the DDIM inversion does
        t, s = pairs[i]
        assert r == float(VP.flow_time(max(t, s)))
        x_t = y * scale(t)
        return to_prediction(eps(x_t, max(t, s)), "epsilon", x_t, *VP.scales(t)).velocity

    flow_pairs = [(float(VP.flow_time(t)), float(VP.flow_time(s))) for t, s in pairs]
    y = solve(x / scale(pairs[0][0]), flow_pairs, velocity, FlowView, step=euler_step, predicts="flow",
              at=noisier_end)
    for k, (t, s) in enumerate(pairs):
        torch.testing.assert_close(y[k + 1] * scale(s), ddim[k + 1], rtol=0, atol=1e-12)


def test_ddim_step_on_a_flow_schedule_runs_from_pure_noise():
    """A velocity model's (x0, eps) pair needs no division by alpha, so DDIM steps start at sigma = 1 too; on a
    straight-line field (constant velocity) DDIM and Euler agree exactly."""
    flow = FlowSchedule()
    v = torch.randn(2, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pairs = flow.pairs(8)
    ddim = solve(x, pairs, lambda i, x, t: v, flow, step=ddim_step, predicts="flow")[-1]
    euler = solve(x, pairs, lambda i, x, t: v, flow, step=euler_step, predicts="flow")[-1]
    torch.testing.assert_close(ddim, euler, rtol=0, atol=1e-12)
    torch.testing.assert_close(euler, x - v, rtol=0, atol=1e-12)  # sigma 1 -> 0 along v
