"""bench/batch_cost.py: the call-cost fit, the counter of an attack's calls and rows, and
cw_paired's prediction from them."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from batch_cost import (Counter, cast_once_gain, fit, onednn_reorder_share,  # noqa: E402
                        packed_gain)
import batch_cost  # noqa: E402
from cw_paired import predicted_seconds  # noqa: E402


def test_the_fit_recovers_a_line_and_its_least_squares_slope():
    assert fit({1: 0.025, 2: 0.030, 4: 0.040, 16: 0.100}) == pytest.approx((0.020, 0.005))
    # off the line: 5.5 / 5 through the means (2.5, 2.75), worked by hand; not the ends' 4 / 3
    fixed, per_row = fit({1: 1.0, 2: 3.0, 3: 2.0, 4: 5.0})
    assert per_row == pytest.approx(1.1) and fixed == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="two batch sizes"):
        fit({8: 1.0})


def test_the_counter_tells_steps_from_checks_and_stops_when_closed():
    model = torch.nn.Linear(3, 2)
    with Counter(model) as counter:
        x = torch.zeros(5, 3, requires_grad=True)
        torch.autograd.grad(model(x).sum(), x)
        model(torch.zeros(2, 3))
        with torch.no_grad():
            model(torch.zeros(4, 3))
    model(torch.zeros(7, 3))
    assert counter.figures() == {"calls": 2, "rows": 7, "checks": 1, "check_rows": 4}


def test_a_prediction_prices_steps_and_checks_each_by_their_own_fit():
    fits = {"step_fixed_s": 2.0, "step_per_row_s": 0.5, "check_fixed_s": 1.0,
            "check_per_row_s": 0.25}
    counts = {"calls": 3, "rows": 10, "checks": 2, "check_rows": 4}
    assert predicted_seconds(fits, counts) == pytest.approx(6 + 5 + 2 + 1)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_onednn_reorder_share_reads_the_log_of_a_convolution(capfd):
    model = torch.nn.Conv2d(16, 16, 3).eval().requires_grad_(False)
    total, share = onednn_reorder_share(model, torch.rand(2, 16, 8, 8))
    assert total > 0 and 0 < share < 1
    print("still printing")
    out = capfd.readouterr().out
    assert out == "still printing\n"  # the log stayed out, standard output came back


def test_the_cast_once_timing_leaves_the_model_in_float32():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval().requires_grad_(False)
    times = cast_once_gain(model, (3, 8, 8), [1, 3], 1, "bf16")
    assert sorted(times) == [1, 3] and all(a > 0 and b > 0 for a, b in times.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_the_packed_timing_leaves_every_forward_as_it_was():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5)).eval().requires_grad_(False)
    times = packed_gain(model, (3, 8, 8), [1, 3], 1)
    assert sorted(times) == [1, 3] and all(a > 0 and b > 0 for a, b in times.values())
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_the_one_position_timing_takes_both_paths_and_puts_the_rule_back(monkeypatch, amp):
    from advfast.engine import packing
    if amp == "bf16" and not packing.bf16_packs_supported():
        pytest.skip("oneDNN has no bf16 convolutions on this CPU")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 5)).eval().requires_grad_(False)
    rule, answers = packing.single_window, []

    def watched(*args):
        answers.append(rule(*args))
        return answers[-1]
    monkeypatch.setattr(packing, "single_window", watched)
    convolution, convolved = packing._PackedConvolution.apply, []

    def packed(*args):
        convolved.append(len(answers))
        return convolution(*args)
    monkeypatch.setattr(packing._PackedConvolution, "apply", packed)
    times = batch_cost.one_position_gain(model, (3, 2, 2), [1, 3], 1, amp=amp)
    assert sorted(times) == [1, 3] and all(a > 0 and b > 0 for a, b in times.values())
    assert packing.single_window is watched  # put back, also after the timed calls
    assert answers and all(a == (2, 2) for a in answers)  # the product timed, its input whole
    assert convolved  # and the packed convolution without it
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())
