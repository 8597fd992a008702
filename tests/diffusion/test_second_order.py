"""Second-order flow steps against closed forms in float64: RF-Solver's update is the midpoint rule, the midpoint
rule and FireFlow converge at second order where Euler converges at first, FireFlow's N + 1 calls, and the
round trip (inversion, then sampling) that makes these solvers worth their calls."""

import math

import pytest
import torch

from editlab.diffusion.schedules import FlowSchedule
from editlab.diffusion.solver import euler_step, midpoint_step, reusing_midpoints, solve

FLOW = FlowSchedule()


def uniform_pairs(n: int, inverse: bool = False) -> list[tuple[float, float]]:
    sigmas = [1 - k / n for k in range(n + 1)]
    pairs = list(zip(sigmas[:-1], sigmas[1:]))
    return [(s, t) for t, s in reversed(pairs)] if inverse else pairs


def run(x, pairs, velocity, solver: str, calls: list | None = None):
    """Integrate dx/dsigma = velocity(x, sigma) over ``pairs`` with ``solver`` (euler / midpoint / fireflow)."""
    def model_fn(i, y, sigma):
        if calls is not None:
            calls.append((i, float(sigma)))
        return velocity(y, float(sigma))

    step = euler_step if solver == "euler" else midpoint_step
    fn = reusing_midpoints(model_fn) if solver == "fireflow" else model_fn
    return solve(x, pairs, fn, FLOW, step=step, predicts="flow")[-1]


def decay(x, sigma):  # dx/dsigma = -(1 + sigma) x: from sigma = 1 to 0, x(0) = x(1) exp(3/2)
    return -(1 + sigma) * x


def test_rf_solver_update_as_its_authors_write_it_is_the_midpoint_rule():
    """x + h v + h^2/2 (v_mid - v) / (h/2), RF-Solver's Taylor form, equals x + h v_mid."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64) / 3
    x = torch.randn(2, 6, generator=g, dtype=torch.float64)

    def field(y, sigma):
        return torch.tanh(y @ a) * (1 + sigma) - y

    for t, s in [(1.0, 0.8), (0.3, 0.55)]:  # sampling and inversion directions
        h = s - t
        v = field(x, t)
        v_mid = field(x + h / 2 * v, t + h / 2)
        taylor = x + h * v + 0.5 * h**2 * (v_mid - v) / (h / 2)
        torch.testing.assert_close(run(x, [(t, s)], field, "midpoint"), taylor, rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("midpoint", 2), ("fireflow", 2)])
def test_convergence_order_on_a_linear_ode(solver, order):
    x = torch.ones(1, dtype=torch.float64)
    errors = [float((run(x, uniform_pairs(n), decay, solver) - math.exp(1.5)).abs()) for n in (8, 16, 32, 64)]
    ratios = [a / b for a, b in zip(errors[:-1], errors[1:])]
    assert all(abs(math.log2(r) - order) < 0.2 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("solver, calls_for", [("euler", lambda n: n), ("midpoint", lambda n: 2 * n),
                                               ("fireflow", lambda n: n + 1)])
def test_calls_per_solve(solver, calls_for):
    calls = []
    run(torch.ones(3, dtype=torch.float64), uniform_pairs(8), decay, solver, calls)
    assert len(calls) == calls_for(8)
    assert calls[0] == (0, 1.0)  # every solver starts with a call where the path starts
    if solver != "euler":  # and evaluates at each step's midpoint time
        midpoints = sorted({sigma for _, sigma in calls} - {1 - k / 8 for k in range(9)}, reverse=True)
        assert midpoints == pytest.approx([1 - (k + 0.5) / 8 for k in range(8)])


def test_fireflow_reuses_the_previous_midpoint_velocity_exactly():
    """FireFlow's step k > 0 is the midpoint step with v(x_k, t_k) replaced by step k - 1's midpoint velocity."""
    x = torch.tensor([1.0, -0.5], dtype=torch.float64)
    pairs = uniform_pairs(4)
    y, v_prev = x, None
    for t, s in pairs:
        h = s - t
        v = decay(y, t) if v_prev is None else v_prev
        v_prev = decay(y + h / 2 * v, t + h / 2)
        y = y + h * v_prev
    torch.testing.assert_close(run(x, pairs, decay, "fireflow"), y, rtol=0, atol=0)


def test_euler_round_trip_on_a_linear_field_is_the_closed_form_product():
    """On v = a x, an inversion step multiplies x by (1 + a h) and the sampling step back by (1 - a h)."""
    a, n = 0.7, 10
    x = torch.tensor([2.0], dtype=torch.float64)
    noise = run(x, uniform_pairs(n, inverse=True), lambda y, s: a * y, "euler")
    back = run(noise, uniform_pairs(n), lambda y, s: a * y, "euler")
    torch.testing.assert_close(back, x * (1 - (a / n) ** 2) ** n, rtol=1e-14, atol=0)


def gaussian_field(mu: torch.Tensor, s2: float):
    """The exact velocity of data N(mu, s2 I) under x_sigma = (1 - sigma) x0 + sigma eps."""
    def v(z, sigma):
        a = (sigma - (1 - sigma) * s2) / ((1 - sigma) ** 2 * s2 + sigma**2)
        return -mu + a * (z - (1 - sigma) * mu)
    return v


@pytest.mark.parametrize("n", [10, 28, 50])
def test_second_order_round_trips_beat_euler_by_orders_of_magnitude(n):
    mu = torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64)
    field = gaussian_field(mu, 0.3)
    x = mu + torch.tensor([0.4, -0.2, 0.1], dtype=torch.float64)
    error = {}
    for solver in ("euler", "midpoint", "fireflow"):
        noise = run(x, uniform_pairs(n, inverse=True), field, solver)
        error[solver] = float((run(noise, uniform_pairs(n), field, solver) - x).norm() / x.norm())
    assert error["midpoint"] < error["euler"] / 20 and error["fireflow"] < error["euler"] / 5, error
