"""iCD math: grids and boundaries, jumps, losses, guidance. Pure, fast."""

from __future__ import annotations

import math

import pytest
import torch

from editlab.diffusion.ddim import add_noise, ddim_jump, jump
from editlab.diffusion.schedules import VPSchedule
from editlab.diffusion.solver import solve
from editlab.icd.guidance import GuidancePolicy, classic_to_code, code_to_classic, dynamic_scale
from editlab.icd.losses import (
    forward_consistency,
    forward_preservation,
    pseudo_huber,
    reverse_consistency,
    reverse_preservation,
)
from editlab.icd.schedule import (
    BoundarySchedule,
    consistency_jumps,
    ddim_grid,
    default_boundaries,
    forward_pairs,
    reverse_pairs,
    substep_pairs,
)
from editlab.models.guidance import guidance_embedding

SD15_REVERSE, SD15_FORWARD = [259, 519, 779, 999], [19, 259, 519, 779]
SDXL_REVERSE, SDXL_FORWARD = [249, 499, 699, 999], [19, 249, 499, 699]


def sd_abar(dtype=torch.float64) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(dtype)


def delta_teacher(x_star: torch.Tensor, abar: torch.Tensor):
    """Data = the single point x*: eps*(x, t) = (x - alpha_t x*) / sigma_t; DDIM is exact for any step."""

    def eps(x, t, text=None, w=None):
        a = abar[torch.as_tensor(t)].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    return eps


# -- 1. grids and boundaries ----------------------------------------------------------------------------------------
def test_grid_and_default_boundaries():
    assert ddim_grid() == [20 * k - 1 for k in range(1, 51)]
    assert default_boundaries(4) == ([0, 259, 519, 779], [259, 519, 779, 999])
    assert default_boundaries(3) == ([0, 339, 679], [339, 679, 999])
    s = BoundarySchedule(4)
    assert (s.reverse, s.forward) == ((0, 259, 519, 779), (259, 519, 779, 999))
    assert s.reverse_steps == SD15_REVERSE and s.forward_steps == SD15_FORWARD


def test_explicit_lists_are_honoured():
    s = BoundarySchedule(3, reverse=[0, 339, 699], forward=[339, 699, 999])  # the released 3-step model
    assert s.reverse == (0, 339, 699) and s.reverse_steps == [339, 699, 999] and s.forward_steps == [19, 339, 699]
    xl = BoundarySchedule.from_inference_steps(SDXL_REVERSE, SDXL_FORWARD)
    assert xl.reverse == (0, 249, 499, 699) and xl.forward == (249, 499, 699, 999)
    assert xl.reverse_steps == SDXL_REVERSE and xl.forward_steps == SDXL_FORWARD
    with pytest.raises(ValueError):
        BoundarySchedule(4, reverse=[0, 259, 519])


# -- 2. inference pairs ---------------------------------------------------------------------------------------------
def test_inference_pairs_without_mutation():
    rev, fwd = list(SD15_REVERSE), list(SD15_FORWARD)
    assert reverse_pairs(rev) == [(999, 779), (779, 519), (519, 259), (259, 0)]
    assert forward_pairs(fwd) == [(19, 259), (259, 519), (519, 779), (779, 999)]
    assert rev == SD15_REVERSE and fwd == SD15_FORWARD
    assert reverse_pairs(SDXL_REVERSE) == [(999, 699), (699, 499), (499, 249), (249, 0)]
    assert forward_pairs(SDXL_FORWARD) == [(19, 249), (249, 499), (499, 699), (699, 999)]
    s = BoundarySchedule(4)
    assert s.reverse_pairs() == reverse_pairs(SD15_REVERSE) and s.forward_pairs() == forward_pairs(SD15_FORWARD)


# -- 3. training boundary lookups -----------------------------------------------------------------------------------
def _reverse_table(schedule):
    t_start = torch.tensor(schedule.grid)
    t = schedule.reverse_step(t_start)
    return dict(zip(t_start.tolist(), zip(t.tolist(), schedule.reverse_boundary(t).tolist())))


def _forward_table(schedule):
    t_start = torch.tensor(schedule.grid[:-1])
    t = schedule.forward_step(t_start)
    return dict(zip(t_start.tolist(), zip(t.tolist(), schedule.forward_boundary(t).tolist())))


def test_training_boundary_lookup_sd15():
    s = BoundarySchedule(4)
    rev = _reverse_table(s)
    for start, (t, b) in rev.items():
        assert b == max(e for e in s.reverse if e <= max(start - 20, 0))
    assert rev[19] == (0, 0) and rev[259][1] == 0 and rev[279] == (259, 259) and rev[999][1] == 779
    assert sorted(start for start, (t, b) in rev.items() if t == b) == [19, 279, 539, 799]  # the anchors
    fwd = _forward_table(s)
    for start, (t, b) in fwd.items():
        assert b == min(f for f in s.forward if f >= start + 20)
    assert fwd[239] == (259, 259) and fwd[259][1] == 519 and fwd[979] == (999, 999)
    assert sorted(start for start, (t, b) in fwd.items() if t == b) == [239, 499, 759, 979]


def test_sdxl_segments_have_no_anchor_at_249():
    s = BoundarySchedule.from_inference_steps(SDXL_REVERSE, SDXL_FORWARD)
    rev, fwd = _reverse_table(s), _forward_table(s)
    assert rev[259][1] == 0 and rev[279][1] == 249
    assert not any(b == 249 and t == b for t, b in rev.values())
    assert fwd[219][1] == 249 and fwd[239][1] == 499
    assert not any(b == 249 and t == b for t, b in fwd.values())


# -- 4./5. jump identity, hard boundary, semigroup ------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_jump_identity_and_hard_boundary(dtype, tol):
    abar = sd_abar(dtype)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g, dtype=dtype), torch.randn(3, 4, 8, 8, generator=g, dtype=dtype)
    for t in (1, 19, 259, 999):
        assert ((jump(x, eps, t, t, abar) - x).abs().max() / x.abs().max()) <= tol
        exact_x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        assert torch.equal(jump(x, eps, t, 0, abar), exact_x0)
    t, s = torch.tensor([19, 259, 999]), torch.tensor([0, 259, 0])  # per-sample, mixed boundary rows
    out = jump(x, eps, t, s, abar)
    assert torch.equal(out[0], jump(x[:1], eps[:1], 19, 0, abar)[0])
    assert torch.allclose(out[1], x[1], atol=tol * 10)


def test_jump_semigroup_and_inverse_with_shared_eps():
    abar = sd_abar()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                       dtype=torch.float64)
    for t, s, u in [(999, 519, 19), (19, 779, 259), (259, 19, 999), (519, 999, 19)]:
        composed = jump(jump(x, eps, t, s, abar), eps, s, u, abar)
        assert torch.allclose(composed, jump(x, eps, t, u, abar), atol=1e-10)
        assert torch.allclose(jump(jump(x, eps, t, s, abar), eps, s, t, abar), x, atol=1e-10)


# -- 6. delta teacher: all losses vanish, encode -> decode is exact ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_teacher_zero_losses(dtype):
    abar = sd_abar(dtype)
    schedule = BoundarySchedule(4)
    n = len(schedule.grid)
    g = torch.Generator().manual_seed(2)
    x_star = torch.randn(1, 4, 8, 8, generator=g, dtype=dtype)
    x0 = x_star.expand(n, -1, -1, -1)
    noise = torch.randn(n, 4, 8, 8, generator=g, dtype=dtype)
    text = torch.zeros(n, 77, 8, dtype=dtype)
    eps = delta_teacher(x_star, abar)
    w = GuidancePolicy().sample_train(n, torch.Generator().manual_seed(0))

    pred, target = reverse_consistency(x0, noise, torch.arange(n), text, w, eps, eps, schedule, abar)
    assert (pred[1:] - target[1:]).abs().max() <= 1e-6  # every start t' >= 39
    alpha0, sigma0 = abar[0].sqrt(), (1 - abar[0]).sqrt()  # t' = 19: the anchor keeps noise level sigma_0
    assert torch.allclose(pred[0] - target[0], ((1 - alpha0) * x_star - sigma0 * noise[:1])[0], atol=1e-6)

    pred, target = forward_consistency(x0[:-1], noise[:-1], torch.arange(n - 1), text[:-1], eps, eps, schedule, abar)
    assert (pred - target).abs().max() <= 1e-6
    assert pseudo_huber(pred.double(), pred.double()) == 0

    segment = torch.arange(4)
    for loss in (forward_preservation, reverse_preservation):
        pred, target = loss(x0[:4], noise[:4], segment, text[:4], eps, eps, schedule, abar)
        assert (pred - target).abs().max() <= 1e-6


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_delta_teacher_encode_decode_is_exact(m):
    abar = sd_abar(torch.float32)
    schedule = BoundarySchedule(m)
    g = torch.Generator().manual_seed(3)
    x_star, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    eps = delta_teacher(x_star, abar)
    x = add_noise(x_star, noise, schedule.start, abar)
    x_T = consistency_jumps(x, schedule.forward_pairs(), lambda i, x, t: eps(x, t), VPSchedule(abar))
    assert torch.allclose(x_T, add_noise(x_star, noise, 999, abar), atol=1e-5)
    x_0 = consistency_jumps(x_T, schedule.reverse_pairs(), lambda i, x, t: eps(x, t), VPSchedule(abar))
    assert (x_0 - x_star).abs().max() <= 1e-5


def test_consistency_jumps_are_one_jump_per_pair_and_the_hook_after_each():
    abar = sd_abar(torch.float32)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pairs = BoundarySchedule(4).reverse_pairs()

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        return torch.tanh(x) * (t + 1) / 1000

    seen = []
    out = consistency_jumps(x, pairs, lambda i, x, t: eps(x, t), VPSchedule(abar),
                            after=lambda i, x: seen.append(i) or x)
    expected = x
    for t, s in pairs:
        expected = jump(expected, eps(expected, t), t, s, abar)
    assert torch.allclose(out, expected, atol=1e-5) and seen == list(range(len(pairs)))


# -- 7. convergence to exact inversion with sub-steps ----------------------------------------------------------------
def smooth_teacher(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64) / 8
    b = torch.randn(64, 64, generator=g, dtype=torch.float64) / 8
    c = torch.randn(64, generator=g, dtype=torch.float64)

    def eps(x, t):
        h = torch.tanh(x.flatten(1) @ a + c * (t / 1000))
        return (0.5 * x.flatten(1) + h @ b).view_as(x)

    return eps


def ddim_solve(x, eps, t, s, substeps, abar):
    return solve(x, substep_pairs(t, s, substeps), lambda i, x, t: eps(x, t), VPSchedule(abar))[-1]


def _round_trip(x, eps, schedule, substeps, abar):
    for t, s in schedule.forward_pairs():
        x = ddim_solve(x, eps, t, s, substeps, abar)
    for s, t in reversed(schedule.forward_pairs()):  # decode back down to 19, so both ends match
        x = ddim_solve(x, eps, t, s, substeps, abar)
    return x


def test_round_trip_converges_first_order():
    abar = sd_abar()
    schedule = BoundarySchedule(4)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = smooth_teacher()
    errors = [(_round_trip(x, eps, schedule, n, abar) - x).pow(2).mean().sqrt().item() for n in (1, 2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    for a, b in zip(errors[2:], errors[3:]):
        assert b / a <= 0.7, errors


def test_gaussian_teacher_flow_converges_to_identity():
    abar = sd_abar()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def eps(x, t):  # data N(0, I): score -x, eps = sigma_t x; the exact flow is the identity map
        return (1 - abar[t]).sqrt() * x

    for direction in ((999, 19), (19, 999)):
        errors = [(ddim_solve(x, eps, *direction, n, abar) - x).pow(2).mean().sqrt().item() for n in (4, 8, 16, 32)]
        assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] / errors[-2] <= 0.7, errors


# -- 8. targets -----------------------------------------------------------------------------------------------------
def test_targets_anchor_online_student_and_no_gradient():
    abar = sd_abar(torch.float32)
    schedule = BoundarySchedule(4)
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    text, w = torch.zeros(4, 77, 8), torch.full((4,), 7.0)
    teacher = delta_teacher(torch.randn(1, 4, 8, 8, generator=g), abar)
    scale = torch.nn.Parameter(torch.tensor(1.0))

    def student(x, t, text, w):
        return scale * teacher(x, t)

    # reverse starts 19 (t = s = 0) and 279 (t = s = 259) are anchors; 39 and 999 are not
    index = torch.tensor([0, 13, 1, 49])
    pred, target = reverse_consistency(x0, noise, index, text, w, student, teacher, schedule, abar)
    assert pred.requires_grad and not target.requires_grad
    t_start = schedule.grid_at(index)
    x_start = add_noise(x0, noise, t_start, abar)
    t_next = schedule.reverse_step(t_start)
    teacher_point = ddim_jump(x_start, teacher(x_start, t_start), abar[t_start].view(-1, 1, 1, 1),
                              abar[t_next].view(-1, 1, 1, 1))  # plain table: abar_0 = 0.99915 for 19 -> 0
    assert abs(abar[0].item() - 0.99915) < 1e-6
    assert torch.equal(target[:2], teacher_point[:2])
    with torch.no_grad():
        scale.fill_(1.7)  # perturb the student: anchors unchanged, other targets follow the online student
    _, moved = reverse_consistency(x0, noise, index, text, w, student, teacher, schedule, abar)
    assert torch.equal(moved[:2], target[:2]) and not torch.allclose(moved[2:], target[2:])
    s = schedule.reverse_boundary(t_next)
    expected = jump(teacher_point, 1.7 * teacher(teacher_point, t_next), t_next, s, abar)
    assert torch.allclose(moved[2:], expected[2:], atol=1e-6)

    # forward start 239 -> 259 is an anchor; the teacher steps with abar_{t+20}
    index = torch.tensor([11, 0, 12, 48])
    pred, target = forward_consistency(x0, noise, index, text, student, teacher, schedule, abar)
    assert not target.requires_grad
    t_start = schedule.grid_at(index)
    x_start = add_noise(x0, noise, t_start, abar)
    point = ddim_jump(x_start, teacher(x_start, t_start), abar[t_start].view(-1, 1, 1, 1),
                      abar[t_start + 20].view(-1, 1, 1, 1))
    assert torch.equal(target[0], point[0]) and torch.equal(target[3], point[3])  # 239 -> 259, 979 -> 999


# -- 10./11. guidance -------------------------------------------------------------------------------------------------
def test_guidance_embedding_values():
    w = torch.tensor([0.0, 7.0, 19.0])
    emb = guidance_embedding(w)
    assert emb.shape == (3, 512)
    assert torch.equal(emb[0], torch.cat([torch.zeros(256), torch.ones(256)]))
    j = torch.arange(256, dtype=torch.float64)
    angles = 1000 * 7.0 * torch.exp(-j * math.log(1e4) / 255)
    assert torch.allclose(emb[1].double(), torch.cat([angles.sin(), angles.cos()]), atol=1e-6)
    assert classic_to_code(8.0) == 7.0 and code_to_classic(19.0) == 20.0


def test_train_scales_sampled_from_discrete_set():
    policy = GuidancePolicy(train_scales=(0.0, 7.0, 11.0, 15.0, 19.0))
    w = policy.sample_train(1000, torch.Generator().manual_seed(0))
    assert set(w.tolist()) == {0.0, 7.0, 11.0, 15.0, 19.0}


def test_dynamic_cfg_step_function():
    def ws(tau, steps):
        return [dynamic_scale(19.0, t, tau) for t in steps]

    assert ws(0.8, [999, 779, 519, 259]) == [0, 19, 19, 19]
    assert ws(0.7, [999, 699, 499, 249]) == [0, 19, 19, 19]
    assert ws(0.7, [999, 779, 519, 259]) == [0, 0, 19, 19]
    assert ws(1.0, [999, 779, 519, 259]) == [19] * 4
    assert dynamic_scale(19.0, 800, 0.8) == 19.0  # t = 1000 tau exactly is guided
    policy = GuidancePolicy(scale=19.0, tau=0.8)
    assert policy.rows(519, 2, unguided_rows=[0]).tolist() == [0.0, 19.0]  # the source row is never guided
    assert policy.rows(999, 2, unguided_rows=[0]).tolist() == [0.0, 0.0]


def test_guidance_per_loss():
    """Reverse CD: w from the training set, identical for student, teacher and target; all other losses: w = 0."""
    abar = sd_abar(torch.float32)
    schedule = BoundarySchedule(4)
    g = torch.Generator().manual_seed(7)
    x0, noise, text = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g), torch.zeros(6, 77, 8)
    policy = GuidancePolicy()
    w = policy.sample_train(6, torch.Generator().manual_seed(1))
    calls = []

    def recorder(role):
        def eps(x, t, text, w):
            calls.append((role, w.clone()))
            return torch.zeros_like(x)
        return eps

    index = torch.arange(0, 48, 8)
    reverse_consistency(x0, noise, index, text, w, recorder("student"), recorder("teacher"), schedule, abar)
    assert set(w.tolist()) <= set(policy.train_scales)
    assert torch.equal(calls[0][1], w) and torch.equal(calls[1][1], w)  # student and teacher: the same w
    assert all(set(c[1].tolist()) <= set(w.tolist()) for c in calls[2:])  # target rows: their own w
    calls.clear()
    forward_consistency(x0, noise, index, text, recorder("student"), recorder("teacher"), schedule, abar)
    forward_preservation(x0, noise, torch.arange(6) % 4, text, recorder("fwd"), recorder("rev"), schedule, abar)
    reverse_preservation(x0, noise, torch.arange(6) % 4, text, recorder("fwd"), recorder("rev"), schedule, abar)
    assert calls and all(not c[1].any() for c in calls)
