"""bench/cw_paired.py's verdict: a configuration's result is at least Foolbox's when its success
is at most 1 point below and its median L2 on the samples both succeed on at most 1.02x."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from cw_paired import compare, configurations, variants  # noqa: E402

PEER = (torch.tensor([True, True, True, False]), torch.tensor([1.0, 2.0, 3.0, 9.0]))


@pytest.mark.parametrize("ok,l2,ratio,verdict", [
    # same successes; on both the medians are 2.0 (ours) and 2.0
    ([True, True, True, False], [1.0, 2.0, 3.0, 0.5], 1.0, True),
    # more successes, smaller on the three both succeed on: median 1.5 vs 2.0
    ([True, True, True, True], [1.0, 1.5, 2.0, 4.0], 0.75, True),
    # same successes, 5 % farther on both: median 2.1 vs 2.0
    ([True, True, True, False], [1.0, 2.1, 3.0, 0.5], 1.05, False),
    # closer on both, but one success fewer (25 points)
    ([True, True, False, False], [0.5, 1.0, 0.1, 0.1], 0.5, False),
])
def test_at_least_foolbox_needs_its_successes_and_its_l2(ok, l2, ratio, verdict):
    # torch.median of an even count is the lower middle value
    figures = compare((torch.tensor(ok), torch.tensor(l2)), PEER)
    assert figures["l2_on_both_vs_foolbox"] == pytest.approx(ratio)
    assert figures["at_least_foolbox"] is verdict
    assert figures["success"] == sum(ok) / len(ok)


def test_no_common_success_has_no_ratio_and_is_not_at_least_foolbox():
    figures = compare((torch.tensor([False, False, False, True]), torch.ones(4)), PEER)
    assert figures["l2_on_both_vs_foolbox"] is None and figures["at_least_foolbox"] is False


def test_two_budgets_of_the_same_steps_are_refused():
    params = dict(c=1.0, steps=10, lr=0.01, search=2)
    assert len(configurations(params, [1.0, 0.4], variants(False, []))) == 4  # 1 + 2 + Foolbox
    with pytest.raises(SystemExit, match="gives 5 steps again"):
        configurations(params, [0.5, 0.52], variants(False, []))


def test_every_advfast_configuration_runs_once_per_precision_and_cadence(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, model, **kwargs):
            seen.append(kwargs)

        def __call__(self, x0, target):
            return type("Result", (), {"adversarial": x0})()

    monkeypatch.setattr("cw_paired.attacks.CarliniWagnerL2", Recorder)
    runs = configurations(dict(c=1.0, steps=10, lr=0.01, search=2), [0.4], variants(True, [8, 1]))
    advfast = [name for name in runs if name != "foolbox"]
    assert advfast[:2] == ["advfast, compact_every 8",
                           "advfast, warm start, 4 steps, compact_every 8"]
    assert advfast[-1] == "advfast, warm start, 4 steps, bf16 + channels_last, compact_every 1"
    for name in advfast:
        runs[name](None, torch.zeros(1), torch.zeros(1))
    assert [(k.get("amp"), k.get("channels_last"), k["compact_every"], k["warm_start"],
             k["steps"]) for k in seen] == [
        (None, None, 8, False, 10), (None, None, 8, True, 4), (None, None, 1, False, 10),
        (None, None, 1, True, 4), ("bf16", True, 8, False, 10), ("bf16", True, 8, True, 4),
        ("bf16", True, 1, False, 10), ("bf16", True, 1, True, 4)]
    assert list(runs)[-1] == "foolbox"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_the_replay_records_each_call_and_makes_the_same_calls_again():
    from cw_replay import recorded, replay_seconds
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval().requires_grad_(False)

    def run():
        x = torch.rand(3, 3, 8, 8, requires_grad=True)
        torch.autograd.grad(model(x).sum(), x)
        with torch.no_grad():
            model(torch.rand(2, 3, 8, 8))

    calls = recorded(model, run)
    assert calls == [(3, True), (2, False)]
    model(torch.rand(1, 3, 8, 8))  # the hook is gone
    assert len(calls) == 2
    again = recorded(model, lambda: replay_seconds(model, calls, (3, 8, 8)))
    assert again[-2:] == calls  # after one warm call per size, the same calls in order
    assert all("forward" not in m.__dict__ for m in model.modules())
