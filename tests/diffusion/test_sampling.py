"""The one DDIM sampling loop: pairs, hooks, the skipped identity step, exactness on an analytic model."""

import math

import torch

from editlab.diffusion.ddim import ddim_timesteps
from editlab.diffusion.sampling import ddim_loop, ddim_pairs

ALPHAS = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64)  # a decreasing abar schedule


def abar(t: int) -> torch.Tensor:
    return ALPHAS[t] if t >= 0 else ALPHAS[0]  # abar_final = abar_0, as the reference DDIM


def test_pairs_walk_the_grid_both_ways():
    assert ddim_pairs(5) == [(800, 600), (600, 400), (400, 200), (200, 0), (0, -200)]
    assert ddim_pairs(5, inverse=True) == [(-200, 0), (0, 200), (200, 400), (400, 600), (600, 800)]
    assert [t for t, _ in ddim_pairs(50)] == ddim_timesteps(50)


def test_inversion_then_denoising_returns_exactly_when_the_prediction_does_not_move():
    """With a prediction that is the same at every point (a constant noise), each denoising step undoes its inversion
    step exactly: the loop pairs them up in reverse order."""
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=g) for _ in range(2))
    trajectory = ddim_loop(x0, ddim_pairs(10, inverse=True), lambda i, x, t: noise, abar, skip_identity=True)
    assert len(trajectory) == 11 and torch.equal(trajectory[1], trajectory[0])  # the identity step, skipped
    back = ddim_loop(trajectory[-1], ddim_pairs(10), lambda i, x, t: noise, abar)
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

    out = ddim_loop(torch.zeros((), dtype=torch.float64), [(600, 400), (400, 200)], eps, abar, before=before,
                    after=after)
    assert [s[:2] for s in seen] == [("before", 0), ("eps", 0), ("after", 0), ("before", 1), ("eps", 1), ("after", 1)]
    assert [s[2] for s in seen if s[0] == "eps"] == [600, 400]  # the noisier end of each pair
    inverse = []
    ddim_loop(torch.zeros((), dtype=torch.float64), [(200, 400)],
              lambda i, x, t: inverse.append(t) or torch.zeros((), dtype=torch.float64), abar)
    assert inverse == [400]
    # with eps = 0 a jump scales x by sqrt(abar_to / abar_from): (0 + 1) * r1 * 2, then (that + 1) * r2 * 2
    r1, r2 = math.sqrt(ALPHAS[400] / ALPHAS[600]), math.sqrt(ALPHAS[200] / ALPHAS[400])
    assert math.isclose(out[1].item(), 2 * r1) and math.isclose(out[2].item(), 2 * (2 * r1 + 1) * r2)


def test_skipped_identity_runs_no_hook_and_no_model():
    calls = []
    trajectory = ddim_loop(torch.ones(()), [(-20, 0)], lambda i, x, t: calls.append(t), abar,
                           before=lambda i, x: calls.append("before"), skip_identity=True)
    assert calls == [] and len(trajectory) == 2 and trajectory[1] == 1
