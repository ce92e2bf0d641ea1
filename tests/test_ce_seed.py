"""loss_head's CE seed at the target, 1 - p_c: ``exact`` sums the other classes' probabilities
(no cancellation where p_c rounds to 1 in float32), ``eager`` is float32's 1 - p_c."""

import math

import pytest
import torch

from advfast import ops
from advfast.ops import reference
from conftest import DEVICES


def _confident(device, batch=6, classes=10, gap=25.0):
    """Rows whose target logit is ``gap`` above the others: p_c is 1.0 in float32."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(batch, classes, generator=gen)
    target = torch.randint(0, classes, (batch,), generator=gen)
    logits[torch.arange(batch), target] += gap + torch.rand(batch, generator=gen) * 10
    return logits.to(device), target.to(device)


def _truth(logits, target):
    """1 - p_c in float64 from the same logits: the others' probabilities summed."""
    prob = torch.softmax(logits.double(), dim=1)
    return prob.scatter(1, target[:, None], 0.0).sum(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["ce", "ce-sign"])
@pytest.mark.parametrize("classes", [10, 1000])
def test_exact_target_element_is_the_float64_truth(device, loss, classes):
    logits, target = _confident(device, classes=classes)
    rows = torch.arange(len(target), device=device)
    assert (torch.softmax(logits, 1)[rows, target] == 1.0).all()  # float32 rounds p_c to 1
    seed, _ = ops.loss_head(logits, target, target, loss)
    truth = _truth(logits, target)
    assert (truth > 0).all()
    torch.testing.assert_close(seed[rows, target].double(), truth, rtol=1e-6, atol=0)
    eager, _ = ops.loss_head(logits, target, target, loss, ce_seed="eager")
    assert (eager[rows, target] == 0).all()
    # the other classes' elements are the same in both modes
    others = torch.ones_like(seed, dtype=torch.bool).scatter(1, target[:, None], False)
    assert torch.equal(seed[others], eager[others])


def _mixed_rows(device, classes=37):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(8, classes, generator=gen) * 6
    target = torch.randint(0, classes, (8,), generator=gen)
    logits[0, target[0]] += 40.0
    logits[1, :] = -math.inf
    logits[1, target[1]] = 2.0  # every other class masked: 1 - p_c = 0
    logits[2, ::3] = -math.inf
    logits[2, target[2]] = 1.0
    logits[3, 5] = math.nan
    logits[4, 7] = math.inf
    return logits.to(device), target.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ce_seed", ops.CE_SEEDS)
@pytest.mark.parametrize("loss", ops.LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_reference(device, ce_seed, loss, dtype):
    for logits, target in (_mixed_rows(device), _confident(device, classes=1001)):
        logits = logits.to(dtype)
        got = ops.loss_head(logits, target, target.flip(0), loss, ce_seed=ce_seed)
        want = reference.loss_head(logits, target, target.flip(0), loss, ce_seed=ce_seed)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("fallback", [False, True], ids=["op", "reference-fallback"])
def test_unknown_ce_seed_is_refused(fallback, monkeypatch):
    if fallback:
        monkeypatch.setattr(ops, "_COMPILED", False)
    with pytest.raises(ValueError, match="ce_seed"):
        ops.loss_head(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]), "ce",
                      ce_seed="lazy")


@pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, target = _confident(device)
    for ce_seed in ops.CE_SEEDS:
        args = (logits, target, target.flip(0), "ce", 20.0, "clamp", 0.9, ce_seed)
        torch.library.opcheck(torch.ops.advfast.loss_head.default, args)
