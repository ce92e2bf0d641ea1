"""advfast.ops.perturb_step_ against the pure-PyTorch reference."""

import os
import subprocess
import sys

import pytest
import torch

from advfast import ops
from advfast.ops import reference
from conftest import DEVICES

RULES = [dict(alpha=5e-3), dict(beta=2.0), dict(beta=2.0, exact_l1=True)]
RULE_IDS = ["alpha", "beta", "exact"]


def _inputs(shape, device, grad_dtype=torch.float32, grad_scale=1e-3):
    x0 = torch.rand(shape, device=device)
    x = (x0 + 0.02 * torch.randn(shape, device=device)).clamp(0, 1)
    grad = (torch.randn(shape, device=device) * grad_scale).to(grad_dtype)
    return x, grad, x0


def _compare(x, grad, x0, **kw):
    x_ref = x.clone()
    stats = ops.perturb_step_(x, grad, x0, **kw)
    ref_stats = reference.perturb_step_(x_ref, grad, x0, **kw)
    assert stats.shape == (x.shape[0], len(ops.STEP_STATS)) and stats.dtype == torch.float32
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats, ref_stats, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(x).all() and torch.isfinite(stats).all()
    return stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("rule", [dict(alpha=-5e-3), dict(beta=-2.0)], ids=["alpha", "beta"])
def test_negative_step_sizes_match_reference(device, sign, rule):
    # a negative alpha or beta moves against P (with the sign too: a * sign(grad), not |a|)
    x, grad, x0 = _inputs((3, 3, 9, 9), device)
    start, x_ref = x.clone(), x.clone()
    ops.perturb_step_(x, grad, x0, sign=sign, **rule)
    reference.perturb_step_(x_ref, grad, x0, sign=sign, **rule)
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=1e-5)
    assert not torch.equal(x, start)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (1, 3, 7, 7), (5, 3, 32, 32), (2, 278011)])
def test_matches_reference(device, sign, rule, dtype, shape):
    _compare(*_inputs(shape, device, dtype), sign=sign, **rule)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_non_contiguous_inputs(device, rule):
    x, grad, x0 = _inputs((4, 3, 9, 11), device)
    x_cl = x.to(memory_format=torch.channels_last)
    grad_strided = torch.zeros(4, 3, 9, 22, device=device)[..., ::2]
    grad_strided.copy_(grad)
    x0_t = x0.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (x_cl.is_contiguous() or grad_strided.is_contiguous() or x0_t.is_contiguous())
    x_ref = x.clone()
    stats = ops.perturb_step_(x_cl, grad_strided, x0_t, sign=False, **rule)
    ref_stats = reference.perturb_step_(x_ref, grad, x0, sign=False, **rule)
    assert x_cl.is_contiguous(memory_format=torch.channels_last)  # updated in place, layout kept
    torch.testing.assert_close(x_cl, x_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats, ref_stats, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_zero_gradient_takes_no_step(device, sign, rule):
    x, grad, x0 = _inputs((3, 2, 5, 5), device)
    grad[1] = 0
    before = x.clone()
    stats = _compare(x, grad, x0, sign=sign, **rule)
    assert torch.equal(x[1], before[1])
    assert stats[1, 0].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_denormal_gradient_gives_finite_unit_step(device):
    """beta / sum|P| overflows float32 for a denormal sum; the step must still be finite and
    add exactly beta in L1."""
    x0 = torch.full((1, 8), 0.5, device=device)
    x = x0.clone()
    grad = torch.zeros(1, 8, device=device)
    grad[0, :4] = 1e-45
    stats = _compare(x, grad, x0, sign=False, beta=0.1)
    assert stats[0, 1].item() == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sign", [False, True])
def test_equal_perturbation_adds_beta_in_l1(device, sign):
    x0 = torch.full((3, 3, 16, 16), 0.5, device=device)
    x = x0.clone()
    grad = torch.randn_like(x) * torch.tensor([1e-6, 1.0, 1e3], device=device)[:, None, None, None]
    stats = _compare(x, grad, x0, sign=sign, beta=1.5)
    torch.testing.assert_close(stats[:, 1], torch.full((3,), 1.5, device=device), rtol=1e-5, atol=0)
    torch.testing.assert_close((x - x0).abs().sum((1, 2, 3)), stats[:, 1], rtol=1e-5, atol=0)
    # from x0 the step's own L1 is the distance
    torch.testing.assert_close(stats[:, ops.STEP_STATS.index("step_l1")], stats[:, 1], rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_inactive_samples_untouched(device, rule):
    x, grad, x0 = _inputs((5, 3, 8, 8), device, grad_scale=1.0)
    active = torch.tensor([True, False, True, False, False], device=device)
    before = x.clone()
    stats = _compare(x, grad, x0, sign=True, active=active, **rule)
    assert torch.equal(x[~active], before[~active])
    assert not torch.equal(x[active], before[active])
    assert (stats[~active, 0] == 0).all()
    # The norms are still reported for inactive samples.
    torch.testing.assert_close(stats[~active, 3], (before - x0)[~active].abs().amax((1, 2, 3)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_eps_ball_and_box(device, rule):
    x, grad, x0 = _inputs((4, 3, 10, 10), device, grad_scale=10.0)
    for _ in range(5):
        _compare(x, grad, x0, sign=True, eps=0.03, lo=0.0, hi=1.0, **rule)
    assert (x - x0).abs().max().item() <= 0.03 + 1e-6
    assert x.min().item() >= 0.0 and x.max().item() <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, grad, x0 = _inputs((3, 2, 5, 7), device)
    active = torch.tensor([True, False, True], device=device)
    for args in [(x, grad, x0, None, True, 0.01, None, 0.0, 1.0, None),
                 (x, grad.half(), x0, active, False, None, 3.0, 0.0, 1.0, 0.1)]:
        torch.library.opcheck(torch.ops.advfast.perturb_step_.default, args)


def _args(**bad):
    args = dict(x=torch.rand(2, 3, 4), grad=torch.rand(2, 3, 4), x0=torch.rand(2, 3, 4),
                sign=False, alpha=0.1)
    args.update(bad)
    return args


@pytest.mark.parametrize(
    "bad,error",
    [
        (_args(grad=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError),
        (_args(x=torch.rand(2, 3, 4).double()), TypeError),
        (_args(x=torch.rand(2, 3, 4).half()), TypeError),
        (_args(x0=torch.rand(2, 3, 4).half()), TypeError),
        (_args(grad=torch.rand(2, 3, 5)), ValueError),
        (_args(x0=torch.rand(3, 3, 4)), ValueError),
        (_args(grad=torch.rand(2, 3, 4, device="meta")), ValueError),
        (_args(beta=1.0), ValueError),
        (_args(exact_l1=True), ValueError),
        (_args(alpha=None), ValueError),
        (_args(lo=1.0, hi=0.0), ValueError),
        (_args(eps=-0.1), ValueError),
        (_args(alpha=float("inf")), ValueError),
        (_args(alpha=1e39), ValueError),  # finite as a double, +inf as the kernels' float32
        (_args(active=torch.ones(3, dtype=torch.bool)), ValueError),
        (_args(active=torch.ones(2)), ValueError),
        (_args(x=[[0.0]]), TypeError),
    ],
)
@pytest.mark.parametrize("fallback", [False, True], ids=["op", "reference-fallback"])
def test_bad_input(bad, error, fallback, monkeypatch):
    """Refused by the compiled op, and by the reference fallback used without it."""
    if fallback:
        monkeypatch.setattr(ops, "_COMPILED", False)
    with pytest.raises(error):
        ops.perturb_step_(**bad)


def _isa_env(isa: str) -> dict:
    """The environment that caps the CPU kernels at ``isa``; skips where this CPU lacks it."""

    env = dict(os.environ, ADVFAST_CPU_ISA=isa)
    code = "import torch, advfast.ops; print(torch.ops.advfast.cpu_isa())"
    picked = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout.split()[-1]
    if picked != isa:
        pytest.skip(f"this CPU does not support {isa}")
    return env


KERNEL_TEST_FILES = ("test_perturb_step.py", "test_loss_head.py", "test_trajectory.py",
                     "test_adam_tanh_step.py", "test_nonfinite.py", "test_exact_l1.py",
                     "test_ce_seed.py")


@pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")
@pytest.mark.parametrize("test_file", KERNEL_TEST_FILES)
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_cpu_isa_copy_matches_reference(isa, test_file):
    """The CPU kernels are compiled once per instruction set; run every kernel test file's CPU
    tests on the copies this process does not pick by itself."""

    env = _isa_env(isa)
    here = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           "not cuda and not isa", os.path.join(here, test_file)], env=env,
                          capture_output=True, text=True, cwd=here)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("rule", RULES[:2], ids=RULE_IDS[:2])
def test_threads_do_not_change_a_bit(sign, rule):
    # Samples of three chunks each (kChunk = 2^15 elements), one inactive: the chunks are fixed
    # per sample and combined in order, whatever the threads (sample_chunks.h).
    torch.manual_seed(0)
    x, grad, x0 = _inputs((3, 3, 110, 220), "cpu")
    grad[2, 0, :50] *= 1e4  # a sample whose chunks sum to very different magnitudes
    active = torch.tensor([True, False, True])
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 8):
            torch.set_num_threads(count)
            xs = x.clone()
            outputs.append((xs, ops.perturb_step_(xs, grad, x0, sign=sign, active=active,
                                                  **rule)))
    finally:
        torch.set_num_threads(threads)
    (x1, s1), (x8, s8) = outputs
    assert torch.equal(x1, x8) and torch.equal(s1, s8)


# Run in a fresh interpreter per instruction set: the same seeded inputs (non-finite, -0,
# denormal gradients, NaN and -0 pixels, a NaN in x0, rows with tails of 1 and of 3 elements,
# samples of two chunks) through perturb_step_ with and without the sign, both rules with
# positive and negative step sizes, with and without the eps ball, two boxes, with and without an
# inactive sample; prints x's and the statistics' bits, in order.
_STEP_BITS = """
import itertools, sys, torch, advfast.ops as ops
torch.manual_seed(0)
torch.set_flush_denormal(sys.argv[1] == "flush")
out = []
for shape in [(5, 3, 7, 13), (2, 3, 1, 1), (2, 32768 + 35)]:
    x0 = torch.rand(shape)
    x = (x0 + 0.02 * torch.randn(shape)).clamp(0, 1)
    g = torch.randn(shape) * 1e-3
    flat = g.view(-1)
    n = flat.numel()
    for k, v in enumerate([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40,
                           -1e-40, 3.4e38]):
        flat[(k * 7919) % n] = v
    x.view(-1)[n // 2] = float("nan")
    x.view(-1)[n // 3] = -0.0
    x0.view(-1)[n // 5] = float("nan")
    active = torch.ones(shape[0], dtype=torch.bool)
    active[-1] = False
    rules = [dict(alpha=0.01), dict(beta=0.5), dict(alpha=-0.01), dict(beta=-0.5)]
    for sign, rule, eps, box, mask in itertools.product(
            [False, True], rules, [None, 0.03], [(0.0, 1.0), (0.2, 0.7)], [None, active]):
        xs = x.clone()
        stats = ops.perturb_step_(xs, g, x0, sign=sign, eps=eps, active=mask, lo=box[0],
                                  hi=box[1], **rule)
        out += [xs.view(torch.int32).flatten(), stats.view(torch.int32).flatten()]
print(torch.cat(out).tolist())
"""


@pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")
@pytest.mark.parametrize("denormals", ["keep", "flush"])
def test_the_avx512_step_is_the_generic_loop_bit_for_bit(denormals):
    """csrc/cpu/perturb_step_avx512.h's intrinsics against the default copy's compiled loop."""

    def bits(isa):
        return subprocess.run([sys.executable, "-c", _STEP_BITS, denormals], env=_isa_env(isa),
                              capture_output=True, text=True, check=True).stdout

    assert bits("avx512") == bits("default")
