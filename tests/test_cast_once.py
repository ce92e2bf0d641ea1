"""Under amp an attack casts its model's conv and linear weights once (engine.core's
weights_cast_once) instead of autocast casting them on every call: the same bits, and the model
as it was afterwards."""

from contextlib import nullcontext

import pytest
import torch
from torch import nn

import advfast
from advfast.attacks import base
from advfast.engine.core import weights_cast_once


class Tied(nn.Module):
    """A conv net whose last linear layer shares its weight with a module autocast does not
    cast (a plain parameter use): that weight must keep its float32 data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.out = nn.Linear(10, 10)
        self.scale = nn.Module()
        self.scale.weight = self.out.weight

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x))).flatten(1)
        return self.out(self.fc(h)) + self.scale.weight.float().sum() * 1e-3


def _model():
    torch.manual_seed(0)
    model = Tied().eval().requires_grad_(False)
    model.norm.running_mean.uniform_(-0.1, 0.1)
    return model


def _logits_and_grad(model, x):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    (grad,) = torch.autograd.grad(logits.float().sum(), x)
    return logits, grad


def test_the_same_bits_as_autocast_and_the_model_restored():
    model, x = _model(), torch.rand(3, 1, 8, 8)
    before = {name: (p, p.data, p.detach().clone()) for name, p in model.named_parameters()}
    want = _logits_and_grad(model, x)
    with weights_cast_once(model, "bf16"):
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        got = _logits_and_grad(model, x)
    assert dtypes["conv.weight"] == dtypes["fc.bias"] == torch.bfloat16
    assert dtypes["norm.weight"] == torch.float32  # batch norm is not autocast to bf16
    assert dtypes["out.weight"] == torch.float32  # also held by a module autocast leaves alone
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for name, p in model.named_parameters():
        same, data, value = before[name]
        assert p is same and p.data.data_ptr() == data.data_ptr() and torch.equal(p, value)


def test_nothing_is_cast_without_amp_and_an_error_still_restores():
    model = _model()
    with weights_cast_once(model, None):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(RuntimeError, match="inside"):
        with weights_cast_once(model, "bf16"):
            assert model.conv.weight.dtype == torch.bfloat16
            raise RuntimeError("inside")
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("attack", ["eq11", "cw"])
def test_an_attack_under_amp_casts_once_and_returns_the_same_images(attack, monkeypatch):
    model, x = _model(), torch.rand(4, 1, 8, 8)
    target = torch.tensor([1, 2, 3, 4])
    seen = []
    model.conv.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))

    def run():
        if attack == "eq11":
            return advfast.Attack(model, loss="ce", beta=0.5, iterations=6, amp="bf16")(x, target)\
                .adversarial
        return advfast.attacks.CarliniWagnerL2(model, c=1.0, steps=6, lr=0.05,
                                               binary_search_steps=2, amp="bf16")(x, target)\
            .adversarial

    once = run()
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    monkeypatch.setattr(base, "weights_cast_once", lambda model, amp: nullcontext(model))
    per_call = run()
    assert set(seen) == {torch.float32}
    assert torch.equal(once, per_call)
