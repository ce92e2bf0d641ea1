"""bench/bound_bn_relu.py: the copy without BatchNorm and ReLU, and the alternated timing."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from bound_bn_relu import stripped, timed  # noqa: E402


def _net() -> nn.Module:
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), block,
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval().requires_grad_(False)


def test_the_copy_drops_every_bn_and_relu_nested_or_not_and_leaves_the_model_alone():
    model = _net()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)  # a BN that changes its input, so dropping it shows
    copy = stripped(model)
    kinds = [type(m) for m in copy.modules()]
    assert nn.BatchNorm2d not in kinds and nn.ReLU not in kinds
    assert kinds.count(nn.Conv2d) == 2 and kinds.count(nn.Identity) == 4
    assert [type(m) for m in model.modules()].count(nn.BatchNorm2d) == 2
    x = torch.rand(2, 3, 6, 6)
    # the copy is the convolutions and the linear layer alone, on the same weights
    body = nn.Sequential(model[0], model[3][0], model[4], model[5])
    torch.testing.assert_close(copy(x), body(x))
    assert not torch.allclose(copy(x), model(x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_the_timing_covers_every_size_and_model_and_gives_the_forwards_back(amp):
    model = _net()
    pair = {"packed": model, "without": stripped(model)}
    times = timed(pair, {1: torch.rand(1, 3, 6, 6), 3: torch.rand(3, 3, 6, 6)}, 2, amp)
    assert sorted(times) == [1, 3]
    assert all(sorted(t) == ["packed", "without"] and min(t.values()) > 0
               for t in times.values())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
