"""Kernels and reference on non-finite input, aliasing, autograd's view of the in-place step,
and the direct ``torch.ops.advfast`` entry points; CPU against CUDA where a GPU is visible."""

import math

import pytest
import torch

from advfast import ops
from advfast.ops import reference
from conftest import CUDA, DEVICES
from fixtures import step_both

INF, NAN = math.inf, math.nan
COL = {name: i for i, name in enumerate(ops.HEAD_STATS)}
compiled = pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")


def _head_both(logits, target, source, loss):
    got = ops.loss_head(logits, target, source, loss)
    want = reference.loss_head(logits, target, source, loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, equal_nan=True)
    return got


def _masked_rows(device, classes=37):
    """-inf logits at the start of a row (the first elements of a CPU lane or CUDA thread),
    spread through it, and everywhere but one class."""
    logits = torch.randn(4, classes, device=device) * 3
    logits[0, :1] = -INF
    logits[1, :17] = -INF
    logits[2, ::3] = -INF
    logits[3, :] = -INF
    logits[3, 20] = 1.0
    return logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ops.LOSSES)
def test_masked_classes_match_torch_softmax(device, loss):
    small = torch.tensor([[-INF, 1.0, 2.0, 0.5]], device=device)
    for logits in (small, _masked_rows(device)):
        target = torch.full((len(logits),), 2, device=device)
        target[-1] = 1 if len(logits) == 1 else 20
        seed, stats = _head_both(logits, target, target.flip(0), loss)
        prob = torch.softmax(logits, dim=1)
        rows = torch.arange(len(logits), device=device)
        torch.testing.assert_close(stats[:, COL["target_prob"]], prob[rows, target])
        torch.testing.assert_close(stats[:, COL["max_prob"]], prob.max(1).values)
        assert (stats[:, COL["finite"]] == 1).all()
        assert torch.isfinite(seed).all()
        if loss in ("ce", "ce-sign"):
            onehot = torch.nn.functional.one_hot(target, logits.shape[1]).float()
            torch.testing.assert_close(seed, onehot - prob)
        torch.testing.assert_close(stats[:, COL["target_logprob"]],
                                   torch.log_softmax(logits, 1)[rows, target])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ops.LOSSES)
def test_unusable_rows_are_reported_and_others_unaffected(device, loss):
    logits = torch.randn(5, 10, device=device) * 4
    logits[1, 3] = NAN
    logits[2, 7] = INF
    logits[3, :] = -INF
    target = torch.tensor([1, 2, 3, 4, 5], device=device)
    seed, stats = _head_both(logits, target, target, loss)
    assert stats[:, COL["finite"]].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    # the usable rows are exactly what they are alone
    alone = ops.loss_head(logits[[0, 4]], target[[0, 4]], target[[0, 4]], loss)
    torch.testing.assert_close(seed[[0, 4]], alone[0])
    torch.testing.assert_close(stats[[0, 4]], alone[1])
    assert torch.isnan(stats[1:4, COL["target_prob"]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_is_the_argmax_as_in_torch(device):
    logits = torch.tensor([[1.0, NAN, 3.0, NAN] + [0.0] * 30,
                           [5.0, 1.0, 2.0, 3.0] + [0.0] * 29 + [NAN]], device=device)
    target = torch.tensor([2, 0], device=device)
    _, stats = _head_both(logits, target, target, "m-logit")
    assert stats[:, COL["pred"]].tolist() == logits.argmax(1).float().tolist() == [1.0, 33.0]
    assert stats[:, COL["runner_up"]].tolist() == [1.0, 33.0]


@pytest.mark.parametrize("device", DEVICES)
def test_runner_up_is_never_the_target(device):
    logits = torch.tensor([[2.0, -INF, -INF], [-INF, -INF, 2.0]], device=device)
    target = torch.tensor([0, 2], device=device)
    _, stats = _head_both(logits, target, target, "m-logit")
    assert stats[:, COL["runner_up"]].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("rule", [dict(alpha=0.01), dict(beta=0.5), dict(beta=0.5, exact_l1=True)],
                         ids=["alpha", "beta", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_gradient_elements_take_no_step(device, sign, rule, dtype):
    x0 = torch.full((3, 1000), 0.5, device=device)  # far from the box: no clipping
    x = x0.clone()
    grad = torch.randn(3, 1000, device=device)
    grad[0, 5], grad[0, 900], grad[1, 0], grad[1, 999] = NAN, INF, -INF, NAN
    grad = grad.to(dtype)
    bad = ~torch.isfinite(grad)
    stats = step_both(x, grad, x0, sign=sign, **rule)
    assert torch.isfinite(x).all() and torch.isfinite(stats).all()
    assert torch.equal(x[bad], x0[bad])  # no step where the gradient is not finite
    clean = torch.where(bad, torch.zeros_like(grad), grad).float()
    p = clean.sign() if sign else clean
    torch.testing.assert_close(stats[:, 0], p.abs().sum(1), rtol=1e-4, atol=0)
    if "beta" in rule:  # the finite elements still add exactly beta in L1
        torch.testing.assert_close(stats[:, 1], torch.full((3,), 0.5, device=device), rtol=1e-4,
                                   atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exact_l1", [False, True])
def test_all_non_finite_gradient_takes_no_step(device, exact_l1):
    x0 = torch.rand(2, 64, device=device)
    x = x0.clone()
    grad = torch.full((2, 64), NAN, device=device)
    grad[1] = INF
    stats = step_both(x, grad, x0, sign=False, beta=1.0, exact_l1=exact_l1)
    assert torch.equal(x, x0) and (stats == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_images_agree_under_the_exact_rule(device):
    """A NaN x (only a direct caller can pass one) has no room: it stays NaN, as under the
    paper's rule, and the sample's step_l1 is NaN, as sum |x_new - x_old|."""
    x0 = torch.rand(2, 50, device=device)
    x = x0.clone()
    x[0, 3] = NAN
    x0[1, 7] = NAN
    for exact_l1 in (False, True):
        stats = step_both(x.clone(), torch.randn(2, 50, device=device), x0, sign=True,
                           beta=0.3, eps=0.05, exact_l1=exact_l1)
        assert torch.isnan(stats[0, ops.STEP_STATS.index("step_l1")])


@pytest.mark.parametrize("device", DEVICES)
def test_linf_propagates_nan_like_amax(device):
    x0 = torch.rand(2, 40, device=device)
    x0[0, :] = NAN  # a NaN sample (only a direct caller can pass one)
    x0[1, 31] = NAN
    x = torch.rand(2, 40, device=device)
    stats = step_both(x, torch.zeros_like(x), x0, sign=False, alpha=0.1)
    assert torch.isnan(stats[:, 3]).all()


def _bad_alias_cases():
    buf = torch.rand(5, 8)
    x = torch.rand(4, 8)
    return [
        ("x is grad", dict(x=x, grad=x, x0=torch.rand(4, 8))),
        ("x is x0", dict(x=x, grad=torch.rand(4, 8), x0=x)),
        ("partial overlap", dict(x=buf[1:], grad=torch.rand(4, 8), x0=buf[:-1])),
        ("view of grad", dict(x=buf[:4], grad=buf.view(40)[:32].view(4, 8), x0=torch.rand(4, 8))),
    ]


@pytest.mark.parametrize("case", range(4))
def test_aliasing_is_rejected(case):
    name, args = _bad_alias_cases()[case]
    with pytest.raises(ValueError, match="must not share memory"):
        ops.perturb_step_(**args, sign=False, alpha=0.1)
    if ops.backend() != "reference":
        with pytest.raises(ValueError, match="must not share memory"):
            torch.ops.advfast.perturb_step_(args["x"], args["grad"], args["x0"], None, False,
                                            0.1, None, 0.0, 1.0, None)


def test_disjoint_views_of_one_buffer_are_accepted():
    buf = torch.rand(3, 4, 8)
    x0 = buf[0].clone()
    stats = step_both(buf[0], buf[1], x0, sign=False, alpha=0.1)
    assert stats.shape == (4, len(ops.STEP_STATS))


def test_step_moves_the_version_counter_and_autograd_notices():
    a = torch.rand(3, 5, requires_grad=True)
    x = a * 1.0
    y = (x * x).sum()  # saves x for backward
    before = x._version
    with torch.no_grad():
        ops.perturb_step_(x, torch.rand(3, 5), torch.rand(3, 5), sign=False, alpha=0.1)
    assert x._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@compiled
@pytest.mark.parametrize("bad", [dict(alpha=NAN), dict(beta=INF), dict(eps=NAN),
                                 dict(lo=-INF), dict(hi=NAN)])
def test_direct_step_call_rejects_non_finite_scalars(bad):
    kw = dict(alpha=None, beta=1.0, lo=0.0, hi=1.0, eps=None)
    if "alpha" in bad:
        kw["beta"] = None
    kw.update(bad)
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="finite"):
        torch.ops.advfast.perturb_step_(x, torch.rand(2, 3), torch.rand(2, 3), None, False,
                                        kw["alpha"], kw["beta"], kw["lo"], kw["hi"], kw["eps"])


@compiled
@pytest.mark.parametrize("kappa,threshold", [(NAN, 0.9), (INF, 0.9), (20.0, NAN)])
def test_direct_head_call_rejects_non_finite_scalars(kappa, threshold):
    with pytest.raises(ValueError, match="finite"):
        torch.ops.advfast.loss_head(torch.zeros(2, 3), torch.tensor([0, 1]),
                                    torch.tensor([0, 0]), "m-logit", kappa, "clamp", threshold)


def _random_head_inputs(device, batch=9, classes=1001):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(batch, classes, generator=gen) * 8
    logits[0, :5] = -INF
    logits[1, 100] = NAN
    logits[2, :] = -INF
    logits[3, 17] = INF
    target = torch.randint(0, classes, (batch,), generator=gen)
    return logits.to(device), target.to(device), target.flip(0).to(device)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("loss", ops.LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_cuda_heads_agree(loss, dtype):
    logits, target, source = _random_head_inputs("cpu")
    logits = logits.to(dtype)
    cpu = ops.loss_head(logits, target, source, loss)
    gpu = ops.loss_head(logits.cuda(), target.cuda(), source.cuda(), loss)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-6, rtol=1e-5, equal_nan=True)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("rule", [dict(alpha=0.01), dict(beta=0.5)], ids=["alpha", "beta"])
def test_cpu_and_cuda_steps_agree(sign, rule):
    gen = torch.Generator().manual_seed(4)
    x0 = torch.rand(4, 3, 33, 35, generator=gen)
    x = (x0 + 0.01 * torch.randn(x0.shape, generator=gen)).clamp(0, 1)
    grad = torch.randn(x0.shape, generator=gen)
    grad[0, 0, 0, :3] = torch.tensor([NAN, INF, -INF])
    x_gpu = x.cuda()
    cpu = ops.perturb_step_(x, grad, x0, sign=sign, eps=0.05, **rule)
    gpu = ops.perturb_step_(x_gpu, grad.cuda(), x0.cuda(), sign=sign, eps=0.05, **rule)
    torch.testing.assert_close(x_gpu.cpu(), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("sign", [False, True])
def test_cpu_and_cuda_exact_steps_agree(sign):
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(4, 3, 33, 35, generator=gen)
    x0[:, :, :20] = (x0[:, :, :20] > 0.5).float()  # many pixels at the box
    grad = torch.randn(x0.shape, generator=gen)
    grad[0, 0, 0, :3] = torch.tensor([NAN, INF, -INF])
    x, x_gpu = x0.clone(), x0.cuda()
    for eps in (None, 0.05):
        cpu = ops.perturb_step_(x, grad, x0, sign=sign, beta=3.0, eps=eps, exact_l1=True)
        gpu = ops.perturb_step_(x_gpu, grad.cuda(), x0.cuda(), sign=sign, beta=3.0, eps=eps,
                                exact_l1=True)
        torch.testing.assert_close(x_gpu.cpu(), x, atol=1e-6, rtol=0)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("ce_seed", ops.CE_SEEDS)
def test_cpu_and_cuda_ce_seeds_agree(ce_seed):
    logits, target, source = _random_head_inputs("cpu")
    logits[4, target[4]] += 40.0  # p_c rounds to 1
    cpu = ops.loss_head(logits, target, source, "ce", ce_seed=ce_seed)
    gpu = ops.loss_head(logits.cuda(), target.cuda(), source.cuda(), "ce", ce_seed=ce_seed)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-6, rtol=1e-5, equal_nan=True)
