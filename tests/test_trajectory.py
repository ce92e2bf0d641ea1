"""Whole 50-step attack trajectories: compiled ops against the reference, iterate by iterate,
and torch.compile(fullgraph=True) tracing code that calls the ops."""

import pytest
import torch
from torch import nn

from advfast import ops
from advfast.ops import reference
from conftest import DEVICES

STEPS = 50
RULES = {"alpha": dict(alpha=0.01), "beta": dict(beta=1.5)}


def _model(device):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).to(device).eval()
    model.requires_grad_(False)
    return model


def _trajectory(model, head, step, loss, rule, x0, target, source):
    x = x0.clone()
    out = []
    for _ in range(STEPS):
        xr = x.detach().requires_grad_(True)
        logits = model(xr)
        seed, head_stats = head(logits, target, source, loss, 20.0, "clamp", 0.9)
        (grad,) = torch.autograd.grad(logits, xr, seed)
        step_stats = step(x, grad, x0, sign=loss == "ce-sign", **rule)
        out.append((x.clone(), head_stats, step_stats))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ops.LOSSES)
@pytest.mark.parametrize("rule", RULES)
def test_fifty_step_trajectory_matches_reference(device, loss, rule):
    model = _model(device)
    x0 = torch.rand(6, 1, 8, 8, device=device)
    target = torch.randint(0, 10, (6,), device=device)
    source = model(x0).argmax(1)
    ours = _trajectory(model, ops.loss_head, ops.perturb_step_, loss, RULES[rule], x0, target,
                       source)
    ref = _trajectory(model, reference.loss_head, reference.perturb_step_, loss, RULES[rule], x0,
                      target, source)
    for n, ((x, hs, ss), (x_ref, hs_ref, ss_ref)) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(x, x_ref, atol=2e-5, rtol=0, msg=f"iterate {n}")
        torch.testing.assert_close(hs, hs_ref, atol=1e-4, rtol=1e-4, msg=f"head stats {n}")
        torch.testing.assert_close(ss, ss_ref, atol=1e-4, rtol=1e-4, msg=f"step stats {n}")
    # The attack really moved the images, so the comparison is not between two idle loops.
    assert ours[-1][2][:, 1].min().item() > 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    def attack_step(logits, target, source, x, grad, x0):
        seed, head_stats = ops.loss_head(logits, target, source, "m-logit")
        step_stats = ops.perturb_step_(x, grad, x0, sign=True, beta=2.0, eps=0.1)
        return seed * 2, head_stats, step_stats

    torch._dynamo.reset()
    compiled = torch.compile(attack_step, fullgraph=True, backend=backend)
    logits = torch.randn(4, 10) * 10
    target, source = torch.randint(0, 10, (4,)), torch.randint(0, 10, (4,))
    x0 = torch.rand(4, 3, 8, 8)
    grad = torch.randn(4, 3, 8, 8)
    x_eager, x_comp = x0.clone(), x0.clone()
    expected = attack_step(logits, target, source, x_eager, grad, x0)
    got = compiled(logits, target, source, x_comp, grad, x0)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(x_comp, x_eager)  # the in-place update survives compilation
    assert not torch.equal(x_comp, x0)
