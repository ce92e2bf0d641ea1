"""perturb_step_'s exact equal perturbation (exact_l1) and the step_l1 column: each step adds
exactly beta in L1 where the box (and eps ball) leave room, all the room where they do not,
and step_l1 reports the L1 any step actually added.  Checked against an independent float64
oracle (a sort of the breakpoints) and against the reference."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advfast import ops
from conftest import DEVICES
from fixtures import step_both

STEP_L1 = ops.STEP_STATS.index("step_l1")


def oracle(x, p, x0, beta, lo=0.0, hi=1.0, eps=None):
    """The exact step in float64 by sorting: (new x [B, N], the L1 it adds [B])."""
    x, p, x0 = (np.asarray(t, dtype=np.float64).reshape(len(t), -1) for t in (x, p, x0))
    lo_b = np.full_like(x0, lo) if eps is None else np.maximum(x0 - eps, lo)
    hi_b = np.full_like(x0, hi) if eps is None else np.minimum(x0 + eps, hi)
    room = np.clip(np.where(p > 0, hi_b - x, np.where(p < 0, x - lo_b, 0.0)), 0.0, None)
    news, added = [], []
    for xs, ps, rs in zip(x, p, room):
        a = _oracle_scale(np.abs(ps), rs, beta)
        move = np.minimum(a * np.abs(ps), rs) if np.isfinite(a) else np.where(ps != 0, rs, 0.0)
        news.append(xs + np.sign(ps) * move)
        added.append(move.sum())
    return np.stack(news), np.array(added)


def _oracle_scale(q, room, beta):
    """a with sum min(a q, room) = beta (inf when the total room is at most beta)."""
    use = (q > 0) & (room > 0)
    q, room = q[use], room[use]
    if room.sum() <= beta:
        return np.inf
    t = room / q
    order = np.argsort(t, kind="stable")
    t, q, room = t[order], q[order], room[order]
    clipped_room = np.concatenate([[0.0], np.cumsum(room)])  # rooms of the first k clipped
    free_q = q.sum() - np.concatenate([[0.0], np.cumsum(q)])   # sum q of the others
    f_at = clipped_room[:-1] + t * free_q[:-1]  # f at each breakpoint
    k = int(np.searchsorted(f_at, beta))  # the segment (t_{k-1}, t_k] holds the root
    return (beta - clipped_room[k]) / free_q[k]


@functools.lru_cache(maxsize=1)
def _digits_case():
    """The first 16 test digits and the gradient of log softmax(g)_target by backward."""
    from advfast import models
    from advfast.io import selection

    model = models.load("digits")
    inputs, _ = selection.prepare(model, selection.DigitsSource("test"), 16, seed=0)
    x0 = inputs.images.float().contiguous()
    x = x0.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), inputs.targets, reduction="sum")
    (grad,) = torch.autograd.grad(-loss, x)
    return x0, grad.detach()


def _saturated_case(batch=4, n=2000):
    """90 % of the pixels at 0 or 1 with P pointing out of the box, the rest inside."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(batch, n, generator=gen) * 0.8 + 0.1
    grad = torch.randn(batch, n, generator=gen)
    at_box = torch.rand(batch, n, generator=gen) < 0.9
    up = torch.rand(batch, n, generator=gen) < 0.5
    x0 = torch.where(at_box, up.float(), x0)
    grad = torch.where(at_box, torch.where(up, grad.abs(), -grad.abs()), grad)
    return x0, grad


CASES = {"digits": _digits_case, "saturated": _saturated_case}


def _step(x0, grad, device, **kw):
    x = x0.clone().to(device)
    stats = ops.perturb_step_(x, grad.to(device), x0.to(device), **kw)
    return x.cpu(), stats.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_exact_step_adds_beta_where_room_allows(device, case, sign, beta):
    # (float32 quantises each element's move to ulp(x): with n elements moving, the added L1
    # is beta within about n * ulp(x) / 2 in the worst case, so beta per element is kept well
    # above the ulps here: 1e-5 relative is then float32's honest limit.)
    x0, grad = (t.clone() for t in CASES[case]())
    x, stats = _step(x0, grad, device, sign=sign, beta=beta, exact_l1=True)
    p = grad.sign() if sign else grad
    want_x, want_l1 = oracle(x0, p, x0, beta)
    np.testing.assert_allclose(want_l1, beta, rtol=1e-12, err_msg="room allows beta here")
    added = (x.double() - x0.double()).flatten(1).abs().sum(1).numpy()
    np.testing.assert_allclose(added, beta, rtol=1e-5)
    np.testing.assert_allclose(stats[:, STEP_L1].numpy(), beta, rtol=1e-5)
    np.testing.assert_allclose(x.flatten(1).numpy(), want_x, atol=2e-6, rtol=0)
    # the paper's rule from the same images adds less, and says so
    paper_x, paper = _step(x0, grad, device, sign=sign, beta=beta)
    paper_added = (paper_x.double() - x0.double()).flatten(1).abs().sum(1)
    torch.testing.assert_close(paper[:, STEP_L1].double(), paper_added, rtol=1e-5, atol=0)
    assert (paper[:, STEP_L1] < stats[:, STEP_L1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("share", [0.05, 0.3, 0.9])
def test_exact_step_where_many_elements_clip(device, sign, share):
    # beta a large share of the room: at beta / S most elements overshoot their bound, so the
    # scale takes several Newton evaluations (and the predicted last step must be checked).
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 3000, generator=gen)
    grad = torch.randn(6, 3000, generator=gen) * torch.rand(6, 3000, generator=gen) ** 4
    p = grad.sign() if sign else grad
    room = torch.where(p > 0, 1 - x0, x0).double().sum(1)
    beta = float(share * room.min())
    x, stats = _step(x0, grad, device, sign=sign, beta=beta, exact_l1=True)
    want_x, want_l1 = oracle(x0, p, x0, beta)
    np.testing.assert_allclose(want_l1, beta, rtol=1e-12)
    np.testing.assert_allclose(stats[:, STEP_L1].numpy(), beta, rtol=1e-5)
    # each move is right to the scale's relative accuracy (about 1e-6: what Newton and the
    # last round's check leave of beta), on top of float32's resolution of x
    move = np.abs(want_x - x0.flatten(1).numpy())
    assert (np.abs(x.flatten(1).numpy() - want_x) <= 2e-6 + 1e-5 * move).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("eps", [None, 0.01])
def test_exact_step_adds_all_the_room_when_there_is_less(device, case, eps):
    x0, grad = (t.clone() for t in CASES[case]())
    beta = 1e4
    x, stats = _step(x0, grad, device, sign=False, beta=beta, eps=eps, exact_l1=True)
    want_x, want_l1 = oracle(x0, grad, x0, beta, eps=eps)
    assert (want_l1 < beta).all()
    np.testing.assert_allclose(stats[:, STEP_L1].numpy(), want_l1, rtol=1e-5)
    np.testing.assert_allclose(x.flatten(1).numpy(), want_x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_exact_step_in_the_eps_ball(device, case):
    x0, grad = (t.clone() for t in CASES[case]())
    start = (x0 + (0.004 * torch.randn(x0.shape)).clamp(-0.009, 0.009)).clamp(0, 1)
    x = start.clone().to(device)
    stats = ops.perturb_step_(x, grad.to(device), x0.to(device), sign=False, beta=0.5, eps=0.01,
                              exact_l1=True)
    want_x, want_l1 = oracle(start, grad, x0, 0.5, eps=0.01)
    np.testing.assert_allclose(stats[:, STEP_L1].cpu().numpy(), want_l1, rtol=1e-5)
    np.testing.assert_allclose(x.cpu().flatten(1).numpy(), want_x, atol=1e-6, rtol=0)
    assert (x.cpu() - x0).abs().max() <= 0.01 + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("eps", [None, 0.02])
def test_kernel_matches_reference(device, case, sign, eps):
    x0, grad = (t.clone() for t in CASES[case]())
    x0, grad = x0.to(device), grad.to(device)
    active = torch.ones(len(x0), dtype=torch.bool, device=device)
    active[1] = False
    before = x0.clone()
    stats = step_both(x0.clone(), grad, x0, sign=sign, beta=0.5, eps=eps, exact_l1=True,
                     active=active)
    assert stats[1, STEP_L1] == 0 and stats[1, 0] == 0
    x = x0.clone()
    step_both(x, grad, before, sign=sign, beta=0.5, eps=eps, exact_l1=True, active=active)
    assert torch.equal(x[1], before[1])


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_gradient_and_denormal_sum(device):
    x0 = torch.rand(3, 300, device=device)
    x0[:, :200] = 1.0
    grad = torch.rand(3, 300, device=device)
    grad[0, 250], grad[0, 260], grad[1, 270] = float("nan"), float("inf"), -float("inf")
    grad[2] = 0.0
    grad[2, 210:214] = 1e-45  # beta / sum|P| overflows: each element divides instead
    stats = step_both(x0.clone(), grad, x0, sign=False, beta=0.1, exact_l1=True)
    torch.testing.assert_close(stats[:, STEP_L1], torch.full((3,), 0.1, device=device),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x0, grad = _saturated_case(3, 200)
    x0, grad = x0.to(device), grad.to(device)
    active = torch.tensor([True, False, True], device=device)
    for args in [(x0.clone(), grad, x0, None, True, None, 0.5, 0.0, 1.0, None, True),
                 (x0.clone(), grad.half(), x0, active, False, None, 3.0, 0.0, 1.0, 0.1, True),
                 (x0.clone(), grad, x0, None, False, None, 0.5, 0.0, 1.0, None, False)]:
        torch.library.opcheck(torch.ops.advfast.perturb_step_.default, args)


@pytest.mark.parametrize("fallback", [False, True], ids=["op", "reference-fallback"])
def test_exact_l1_refuses_alpha(fallback, monkeypatch):
    if fallback:
        monkeypatch.setattr(ops, "_COMPILED", False)
    x = torch.rand(2, 5)
    with pytest.raises(ValueError, match="exact_l1"):
        ops.perturb_step_(x, torch.rand(2, 5), x.clone(), sign=False, alpha=0.1, exact_l1=True)


@pytest.mark.parametrize("device", DEVICES)
def test_step_l1_of_the_adam_step(device):
    shape = (3, 2, 5, 5)
    x0 = torch.rand(shape, device=device)
    w = torch.atanh((2 * x0 - 1) * (1 - 1e-6))
    x = (torch.tanh(w) + 1) / 2
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    active = torch.tensor([True, False, True], device=device)
    before = x.clone()
    stats = ops.adam_tanh_step_(w, m, v, x, torch.randn(shape, device=device), x0,
                                torch.ones(3, device=device),
                                torch.ones(3, dtype=torch.int64, device=device), lr=0.01,
                                active=active)
    torch.testing.assert_close(stats[:, STEP_L1], (x - before).abs().sum((1, 2, 3)))
    assert stats[1, STEP_L1] == 0
