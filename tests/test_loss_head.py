"""advfast.ops.loss_head against the pure-PyTorch reference."""

import pytest
import torch

from advfast import ops
from advfast.ops import reference
from conftest import DEVICES

LOW = [torch.float16, torch.bfloat16]


def _inputs(batch, classes, device, dtype=torch.float32, scale=5.0):
    logits = (torch.randn(batch, classes, device=device) * scale).to(dtype)
    target = torch.randint(0, classes, (batch,), device=device)
    source = torch.randint(0, classes, (batch,), device=device)
    return logits, target, source


def _compare(logits, target, source, loss, mode="clamp", atol=1e-6):
    seed, stats = ops.loss_head(logits, target, source, loss, 20.0, mode)
    ref_seed, ref_stats = reference.loss_head(logits, target, source, loss, 20.0, mode)
    assert seed.dtype == stats.dtype == torch.float32
    assert seed.shape == logits.shape and stats.shape == (logits.shape[0], len(ops.HEAD_STATS))
    torch.testing.assert_close(seed, ref_seed, atol=atol, rtol=1e-5)
    torch.testing.assert_close(stats, ref_stats, atol=atol, rtol=1e-5)
    return seed, stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ops.LOSSES)
@pytest.mark.parametrize("mode", ops.KAPPA_MODES)
@pytest.mark.parametrize("batch,classes", [(0, 10), (1, 2), (7, 10), (5, 1000), (3, 1001)])
def test_matches_reference(device, loss, mode, batch, classes):
    _compare(*_inputs(batch, classes, device, scale=15.0), loss, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ops.LOSSES)
def test_non_contiguous_logits(device, loss):
    logits, target, source = _inputs(6, 37, device)
    transposed = logits.t().contiguous().t()  # column-major
    strided = torch.randn(6, 74, device=device)[:, ::2]
    strided.copy_(logits)
    for view in (transposed, strided):
        assert not view.is_contiguous()
        _compare(view, target, source, loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ops.LOSSES)
def test_all_negative_logits(device, loss):
    logits, target, source = _inputs(9, 10, device)
    logits = -logits.abs() - 50.0
    seed, stats = _compare(logits, target, source, loss)
    # c* must never be the target itself, even when every logit is negative.
    assert (stats[:, 6].long() != target).all()
    assert torch.isfinite(seed).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ties_resolve_to_first_index(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0]], device=device)
    target = torch.tensor([3, 0], device=device)
    seed, stats = _compare(logits, target, target.clone(), "m-logit")
    col = {name: i for i, name in enumerate(ops.HEAD_STATS)}
    assert stats[:, col["pred"]].tolist() == [1.0, 0.0]
    assert stats[:, col["runner_up"]].tolist() == [1.0, 1.0]
    assert stats[:, col["hit"]].tolist() == [0.0, 1.0]
    assert stats[:, col["margin"]].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,expected", [("clamp", [1.0, 0.0, 0.0]), ("balance", [1.0, 0.0, -1.0])])
def test_kappa_weight_below_at_above(device, mode, expected):
    # margins of 19, exactly 20 and 21 against c* = class 0
    logits = torch.tensor([[0.0, 19.0, -5.0], [0.0, 20.0, -5.0], [0.0, 21.0, -5.0]], device=device)
    target = torch.ones(3, dtype=torch.long, device=device)
    seed, stats = _compare(logits, target, torch.zeros_like(target), "m-logit", mode)
    assert seed[:, 1].tolist() == expected
    assert seed[:, 0].tolist() == [-w for w in expected]
    assert seed[:, 2].abs().sum().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_subspaces_follow_definition_iv1(device):
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 10.0, 0.0]], device=device)
    target = torch.ones(3, dtype=torch.long, device=device)
    _, stats = _compare(logits, target, torch.zeros_like(target), "ce")
    assert stats[:, ops.HEAD_STATS.index("subspace")].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("loss", ops.LOSSES)
def test_low_precision_accumulates_in_float(device, dtype, loss):
    """On fp16/bf16 logits the kernel computes in float32: against a float64 truth on the same
    rounded inputs its error is at float32's level (a few 1e-7 for probabilities),
    far below what rounding to the input precision would give (~1e-3)."""
    logits, target, source = _inputs(16, 1000, device, dtype=dtype)
    g = logits.double()  # the truth, in float64 on the rounded inputs
    prob = torch.softmax(g, dim=1)
    rows = torch.arange(len(g), device=device)
    onehot = torch.nn.functional.one_hot(target, g.shape[1]).double()
    seed, stats = _compare(logits, target, source, loss, atol=1e-5)
    if loss in ("ce", "ce-sign"):
        assert (seed.double() - (onehot - prob)).abs().max().item() <= 1e-6
    col = {name: i for i, name in enumerate(ops.HEAD_STATS)}
    truth = {"max_prob": prob.max(1).values, "target_prob": prob[rows, target],
             "source_prob": prob[rows, source],
             "target_logprob": torch.log_softmax(g, 1)[rows, target]}
    for name, value in truth.items():
        torch.testing.assert_close(stats[:, col[name]].double(), value, atol=1e-6,
                                   rtol=1e-6 if name == "target_logprob" else 0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_is_gradient_of_objective(device):
    """The CE seed is the autograd gradient of log softmax(g)_c, the logit seed of g_c."""
    logits, target, source = _inputs(4, 10, device)
    g = logits.clone().requires_grad_(True)
    objective = torch.log_softmax(g, dim=1).gather(1, target[:, None]).sum()
    (expected,) = torch.autograd.grad(objective, g)
    seed, _ = ops.loss_head(logits, target, source, "ce")
    torch.testing.assert_close(seed, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, target, source = _inputs(5, 11, device)
    for loss in ops.LOSSES:
        torch.library.opcheck(torch.ops.advfast.loss_head.default,
                              (logits, target, source, loss, 20.0, "balance", 0.9))


@pytest.mark.parametrize(
    "bad,error",
    [
        (dict(logits=torch.zeros(2, 3, dtype=torch.int64)), TypeError),
        (dict(logits=torch.zeros(2, 3, dtype=torch.float64)), TypeError),
        (dict(logits=torch.zeros(2, 3, 4)), ValueError),
        (dict(logits=torch.zeros(2, 1)), ValueError),
        (dict(target=torch.zeros(3, dtype=torch.long)), ValueError),
        (dict(target=torch.zeros(2, dtype=torch.int32)), TypeError),
        (dict(target=torch.tensor([0, 3])), IndexError),
        (dict(source=torch.tensor([-1, 0])), IndexError),
        (dict(target=torch.zeros(2, dtype=torch.long, device="meta")), ValueError),
        (dict(loss="hinge"), ValueError),
        (dict(kappa_mode="soft"), ValueError),
        (dict(kappa=float("nan")), ValueError),
    ],
)
@pytest.mark.parametrize("fallback", [False, True], ids=["op", "reference-fallback"])
def test_bad_input(bad, error, fallback, monkeypatch):
    """Refused by the compiled op, and by the reference fallback used without it."""
    if fallback:
        monkeypatch.setattr(ops, "_COMPILED", False)
    args = dict(logits=torch.zeros(2, 3), target=torch.tensor([0, 1]),
                source=torch.tensor([1, 0]), loss="ce", kappa=20.0, kappa_mode="clamp")
    args.update(bad)
    with pytest.raises(error):
        ops.loss_head(**args)


@pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")
def test_direct_op_call_rejects_bad_indices():
    with pytest.raises(IndexError, match="outside"):
        torch.ops.advfast.loss_head(torch.zeros(2, 3), torch.tensor([0, 5]), torch.tensor([0, 0]),
                                    "ce", 20.0, "clamp", 0.9)
    with pytest.raises(ValueError, match="unknown loss"):
        torch.ops.advfast.loss_head(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 0]),
                                    "nope", 20.0, "clamp", 0.9)
