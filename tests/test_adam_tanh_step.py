"""advfast.ops.adam_tanh_step_ (Carlini-Wagner's Adam step in tanh space) against the
reference, against torch.optim.Adam + autograd over whole trajectories, and its contracts."""

import math

import pytest
import torch

from advfast import ops
from advfast.ops import reference
from conftest import CUDA, DEVICES

compiled = pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")


def _state(shape, device, seed=0, grad_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen)
    w = torch.atanh((2 * x0 - 1) * 0.999999) + 0.05 * torch.randn(shape, generator=gen)
    m = 0.01 * torch.randn(shape, generator=gen)
    v = 0.01 * torch.rand(shape, generator=gen)
    x = (torch.tanh(w) + 1) / 2
    grad = torch.randn(shape, generator=gen).to(grad_dtype)
    b = shape[0]
    c = torch.rand(b, generator=gen) * 10
    step = torch.randint(1, 50, (b,), generator=gen)
    return [t.to(device) for t in (w, m, v, x, grad, x0, c, step)]


def _both(w, m, v, x, grad, x0, c, step, **kw):
    ref = [t.clone() for t in (w, m, v, x)]
    stats = ops.adam_tanh_step_(w, m, v, x, grad, x0, c, step, **kw)
    ref_stats = reference.adam_tanh_step_(*ref, grad, x0, c, step, **kw)
    for got, want, name in zip((w, m, v, x), ref, "wmvx"):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(stats, ref_stats, atol=1e-5, rtol=1e-4)
    return stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (1, 1, 7, 7), (5, 3, 17, 19), (2, 70001)])
def test_matches_reference(device, dtype, shape):
    stats = _both(*_state(shape, device, grad_dtype=dtype), lr=0.01)
    assert stats.shape == (shape[0], len(ops.STEP_STATS))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_channels_last(device):
    w, m, v, x, grad, x0, c, step = _state((3, 3, 9, 11), device)
    layouts = [t.to(memory_format=torch.channels_last) for t in (w, m, v, x)]
    strided_grad = torch.zeros(3, 3, 9, 22, device=device)[..., ::2]
    strided_grad.copy_(grad)
    ref = [t.clone() for t in (w, m, v, x)]
    stats = ops.adam_tanh_step_(*layouts, strided_grad, x0, c, step, lr=0.02)
    ref_stats = reference.adam_tanh_step_(*ref, grad, x0, c, step, lr=0.02)
    for got, want in zip(layouts, ref):
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats, ref_stats, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_inactive_samples_untouched_and_non_finite_grad_ignored(device):
    w, m, v, x, grad, x0, c, step = _state((4, 2, 6, 6), device)
    grad[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    active = torch.tensor([True, False, True, False], device=device)
    before = [t.clone() for t in (w, m, v, x)]
    stats = _both(w, m, v, x, grad, x0, c, step, lr=0.01, active=active)
    for now, then in zip((w, m, v, x), before):
        assert torch.equal(now[~active], then[~active])
        assert not torch.equal(now[active], then[active])
    assert (stats[~active, 0] == 0).all() and torch.isfinite(w).all() and torch.isfinite(x).all()
    torch.testing.assert_close(stats[~active, 1], (x - x0)[~active].abs().sum((1, 2, 3)))


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 5 * 5, 16),
                                       torch.nn.Tanh(), torch.nn.Linear(16, 6))

    def forward(self, x):
        return self.net(x)


def _float64_step(w, x, grad, x0, c, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One first Adam step of CW in float64 with X' = e^w / (2 cosh w) and dX'/dw =
    1 / (2 cosh(w)^2): forms that neither cancel nor share the kernels' exp(-2 w)."""
    w, x, grad, x0 = (t.double() for t in (w, x, grad, x0))
    gw = (2 * (x - x0) - c * grad) / (2 * torch.cosh(w) ** 2)
    m, v = (1 - beta1) * gw, (1 - beta2) * gw * gw
    new_w = w - lr / (1 - beta1) * (m / (v.sqrt() / math.sqrt(1 - beta2) + eps))
    return gw, new_w


def _image64(w):
    w = w.double()
    return torch.exp(w) / (2 * torch.cosh(w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_saturated_pixels_step_and_map_as_float64_says(device, impl):
    """Where float32 tanh cancels -- 1 - tanh(w)^2 is 0 for |w| > 8.7 and tanh(w) + 1 is 0
    below w = -9 -- the step still moves w by what the float64 maths says, and X' keeps its
    relative precision (within 4 ulp) down to e^{2w} = 1e-35."""
    w = torch.cat([torch.linspace(-40, 40, 8001), torch.tensor([-12.0, -9.5, 9.5, 12.0])])
    w = w.view(1, -1).to(device)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(w.shape, generator=gen).to(device)
    grad = torch.randn(w.shape, generator=gen).to(device)
    x = _image64(w).float()
    c = torch.tensor([1.0], device=device)
    gw64, new_w64 = _float64_step(w, x, grad, x0, 1.0, lr=1e-2)
    step = (ops.adam_tanh_step_ if impl == "op" else reference.adam_tanh_step_)
    new_w = w.clone()
    stats = step(new_w, torch.zeros_like(w), torch.zeros_like(w), x, grad, x0, c,
                 torch.ones(1, dtype=torch.int64, device=device), lr=1e-2)
    ulp = torch.finfo(torch.float32).eps
    # the move itself, where float32 resolves it (one ulp of w at 40 is 4e-6)
    torch.testing.assert_close(new_w.double() - w.double(), new_w64 - w.double(), rtol=1e-5,
                               atol=4e-6)
    moved = (new_w != w) & (w.abs() > 9)
    assert moved.sum() > 500  # the saturated pixels do move
    torch.testing.assert_close(stats[0, 0].double(), gw64.abs().sum(), rtol=1e-5, atol=0)
    # X' of the new w, relative to its size, also where it is below 1e-30
    truth = _image64(new_w)
    assert ((x.double() - truth).abs() <= 4 * ulp * truth).all()
    assert truth.min() < 1e-34


@pytest.mark.parametrize("device", DEVICES)
def test_w_beyond_exps_range_maps_to_the_box_edges_and_nan_stays_nan(device):
    # exp(-2 w) overflows below w = -44 and underflows above 44: X' is 0 or 1 there (not, as
    # a clamped exp's stand-in would give, 1 / (1 + 2 * 120) at w = -60)
    w = torch.tensor([[-math.inf, -1e4, -60.0, -45.0, 45.0, 60.0, 1e4, math.inf, math.nan]],
                     device=device)

    def start():
        return [w.clone(), torch.zeros_like(w), torch.zeros_like(w), ops.tanh_image(w),
                torch.ones_like(w), torch.full_like(w, 0.5), torch.ones(1, device=device),
                torch.ones(1, dtype=torch.int64, device=device)]

    ours, theirs = start(), start()
    stats = ops.adam_tanh_step_(*ours, lr=0.1)
    ref_stats = reference.adam_tanh_step_(*theirs, lr=0.1)
    expected = torch.tensor([[0.0] * 4 + [1.0] * 4 + [math.nan]], device=device)
    torch.testing.assert_close(ours[3], expected, atol=1e-30, rtol=0, equal_nan=True)
    assert torch.equal(ours[0][:, :8], w[:, :8])  # a slope of 0: no step
    for got, want in zip(ours[:4] + [stats], theirs[:4] + [ref_stats]):
        torch.testing.assert_close(got, want, atol=1e-30, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kappa", [0.0, 2.0])
def test_forty_steps_equal_torch_adam_on_cw_loss(device, kappa):
    """The fused op with the M-logit head's seed reproduces CW's loss minimised by
    torch.optim.Adam through autograd, step for step."""
    model = TwoLayer().to(device).requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(3, 2, 5, 5, generator=gen).to(device)
    target = torch.tensor([1, 4, 5], device=device)
    c = torch.tensor([0.5, 3.0, 20.0], device=device)
    w0 = torch.atanh((2 * x0 - 1) * 0.999999)
    # torch.optim.Adam, one optimiser per sample so each has its own step count
    ws = [w0[i:i + 1].clone().requires_grad_(True) for i in range(3)]
    adams = [torch.optim.Adam([w], lr=0.05) for w in ws]
    # the fused op
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    x = (torch.tanh(w) + 1) / 2
    for n in range(40):
        for i in range(3):
            xi = (torch.tanh(ws[i]) + 1) / 2
            logits = model(xi)
            others = logits.clone()
            others[0, target[i]] = -math.inf
            margin = logits[0, target[i]] - others.max()
            loss = ((xi - x0[i:i + 1]) ** 2).sum() + c[i] * torch.clamp(-margin, min=-kappa)
            adams[i].zero_grad()
            loss.backward()
            adams[i].step()
        xr = x.detach().requires_grad_(True)
        logits = model(xr)
        seed, _ = ops.loss_head(logits.detach(), target, target, "m-logit", kappa, "clamp")
        (grad,) = torch.autograd.grad(logits, xr, seed)
        ops.adam_tanh_step_(w, m, v, x, grad, x0, c, torch.full((3,), n + 1, device=device),
                            lr=0.05)
        expected = torch.cat([wi.detach() for wi in ws])
        torch.testing.assert_close(w, expected, atol=2e-5, rtol=1e-5, msg=f"step {n}")
    torch.testing.assert_close(x, (torch.tanh(expected) + 1) / 2, atol=2e-5, rtol=0)
    assert (w - w0).abs().max() > 0.1  # it really moved


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w, m, v, x, grad, x0, c, step = _state((3, 2, 4, 5), device)
    active = torch.tensor([True, False, True], device=device)
    for args in [(w, m, v, x, grad, x0, c, step, None, 0.01, 0.9, 0.999, 1e-8),
                 (w, m, v, x, grad.half(), x0, c, step, active, 0.1, 0.5, 0.9, 1e-6)]:
        torch.library.opcheck(torch.ops.advfast.adam_tanh_step_.default, args)


def test_version_counters_move():
    w, m, v, x, grad, x0, c, step = _state((2, 3), "cpu")
    before = [t._version for t in (w, m, v, x)]
    ops.adam_tanh_step_(w, m, v, x, grad, x0, c, step, lr=0.01)
    assert all(t._version > b for t, b in zip((w, m, v, x), before))


def _bad(**change):
    w, m, v, x, grad, x0, c, step = _state((2, 3, 4), "cpu")
    args = dict(w=w, m=m, v=v, x=x, grad=grad, x0=x0, c=c, step=step, lr=0.01)
    args.update(change)
    return args


@pytest.mark.parametrize("args,error", [
    (_bad(w=torch.rand(2, 3, 4).double()), TypeError),
    (_bad(grad=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError),
    (_bad(m=torch.rand(2, 3, 5)), ValueError),
    (_bad(c=torch.rand(3)), ValueError),
    (_bad(step=torch.ones(2)), ValueError),
    (_bad(lr=0.0), ValueError),
    (_bad(lr=math.nan), ValueError),
    (_bad(beta1=1.0), ValueError),
    (_bad(active=torch.ones(2)), ValueError),
], ids=range(9))
@pytest.mark.parametrize("fallback", [False, True], ids=["op", "reference-fallback"])
def test_bad_input(args, error, fallback, monkeypatch):
    """Refused by the compiled op, and by the reference fallback used without it."""
    if fallback:
        monkeypatch.setattr(ops, "_COMPILED", False)
    with pytest.raises(error):
        ops.adam_tanh_step_(**args)


def test_aliasing_is_rejected():
    w, m, v, x, grad, x0, c, step = _state((2, 3), "cpu")
    for args in ((w, w, v, x, grad, x0), (w, m, v, x, x, x0), (w, m, v, x, grad, v)):
        with pytest.raises(ValueError, match="must not share memory"):
            ops.adam_tanh_step_(*args, c, step, lr=0.01)


def _nan_makers():
    """Arguments that made NaN before the op refused them (a NaN c, step 0, an eps that rounds
    to 0 in float32 where m = v = 0 gives 0 / 0)."""
    w, m, v, x, grad, x0, c, step = _state((2, 3), "cpu")
    zero = dict(m=torch.zeros_like(m), v=torch.zeros_like(v), x0=x.clone(),
                grad=torch.zeros_like(grad))
    return [
        ("nan c", _bad(c=torch.tensor([1.0, math.nan])), "c"),
        ("inf c", _bad(c=torch.tensor([math.inf, 1.0])), "c"),
        ("step 0", _bad(step=torch.tensor([3, 0])), "step"),
        ("negative step", _bad(step=torch.tensor([-1, 2])), "step"),
        ("eps rounds to 0", dict(_bad(**zero), w=w, x=x, eps=1e-50), "eps"),
        ("denormal eps", dict(_bad(**zero), w=w, x=x, eps=1e-45), "eps"),
        ("nan beta2", _bad(beta2=math.nan), "finite"),
        ("inf lr", _bad(lr=math.inf), "finite"),
    ]


@pytest.mark.parametrize("fallback", [False, True], ids=["op", "reference-fallback"])
@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _nan_makers()])
def test_arguments_that_make_nan_are_refused(case, fallback, monkeypatch):
    if fallback:
        monkeypatch.setattr(ops, "_COMPILED", False)
    _, args, match = _nan_makers()[case]
    before = [args[k].clone() for k in "wmvx"]
    with pytest.raises(ValueError, match=match):
        ops.adam_tanh_step_(**args)
    for k, old in zip("wmvx", before):
        assert torch.equal(args[k], old), k  # nothing was written


@compiled
@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _nan_makers()])
def test_direct_call_refuses_arguments_that_make_nan(case):
    _, a, match = _nan_makers()[case]
    with pytest.raises(ValueError, match=match):
        torch.ops.advfast.adam_tanh_step_(a["w"], a["m"], a["v"], a["x"], a["grad"], a["x0"],
                                          a["c"], a["step"], None, a["lr"],
                                          a.get("beta1", 0.9), a.get("beta2", 0.999),
                                          a.get("eps", 1e-8))


def test_inactive_samples_may_have_step_zero():
    """The engine keeps step = 0 for a sample that has not started; it is not stepped."""
    w, m, v, x, grad, x0, c, step = _state((2, 3), "cpu")
    step[1], c[1] = 0, math.nan
    before = w[1].clone()
    ops.adam_tanh_step_(w, m, v, x, grad, x0, c, step, lr=0.01,
                        active=torch.tensor([True, False]))
    assert torch.equal(w[1], before) and torch.isfinite(w).all()


def test_smallest_accepted_eps_keeps_zero_moments_finite():
    w, m, v, x, grad, x0, c, step = _state((2, 3), "cpu")
    m.zero_(), v.zero_(), grad.zero_()
    ops.adam_tanh_step_(w, m, v, x, grad, x.clone(), c, step, lr=0.01, eps=ops.MIN_ADAM_EPS)
    assert all(torch.isfinite(t).all() for t in (w, m, v, x))


@compiled
def test_direct_call_checks_scalars():
    w, m, v, x, grad, x0, c, step = _state((2, 3), "cpu")
    with pytest.raises(ValueError, match="finite"):
        torch.ops.advfast.adam_tanh_step_(w, m, v, x, grad, x0, c, step, None, math.inf, 0.9,
                                          0.999, 1e-8)


@CUDA
@pytest.mark.cuda
def test_cpu_and_cuda_agree():
    cpu = _state((3, 3, 33, 35), "cpu", seed=4)
    gpu = [t.cuda() for t in cpu]
    s_cpu = ops.adam_tanh_step_(*cpu, lr=0.01)
    s_gpu = ops.adam_tanh_step_(*gpu, lr=0.01)
    for a, b in zip(cpu[:4], gpu[:4]):
        torch.testing.assert_close(b.cpu(), a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-5, rtol=1e-5)
