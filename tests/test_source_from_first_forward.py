"""With no source given, a call whose rows start at their clean images (Eq. 11 without a random
start, L-BFGS) takes the source class from its first forward instead of a forward of its own:
the same results as with the prediction given, one forward of the batch fewer.  CW (its X'(w0)
is x0 only to float32 rounding), a random start and torch.compile keep the probe forward."""

import pytest
import torch
from torch import nn

import advfast
from advfast.attacks import CarliniWagnerL2, LBFGS
from fixtures import small_batch, small_model


class Rows:
    """Counts the rows that go through a model (a forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.seen = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.seen += len(args[0])


def _attacks(model: nn.Module) -> dict[str, object]:
    return {
        "eq11 fixed": advfast.Attack(model, loss="ce", beta=0.5, record=True, stop="never",
                                     iterations=6),
        "eq11 stream": advfast.Attack(model, loss="ce", beta=0.5, record=True, stop="flip",
                                      iterations=6, compact_every=2),
        "eq11 no steps": advfast.Attack(model, loss="ce", beta=0.5, record=True, stop="never",
                                        iterations=0),
        "ifgs": advfast.Attack(model, loss="ce-sign", step="equal-multiplier", alpha=0.05,
                               eps=0.3, stop="never", iterations=4),
        "lbfgs": LBFGS(model, steps=4, binary_search_steps=2),
    }


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


@pytest.mark.parametrize("name", list(_attacks(small_model())))
def test_the_source_taken_from_the_first_forward_is_the_prediction_and_changes_nothing(name):
    model = small_model(gain=3.0)
    x, target, _ = small_batch(model, n=12)
    with torch.no_grad():  # the oracle: the clean images' prediction, one image at a time
        prediction = torch.stack([model(x[i:i + 1]).argmax(1)[0] for i in range(len(x))])
    attack = _attacks(model)[name]
    derived, given = attack(x, target), attack(x, target, prediction)
    assert torch.equal(derived.source, prediction)
    for field in ("adversarial", "first_flip", "steps", "failure", "constant"):
        assert _same(getattr(derived, field), getattr(given, field)), field
    for norm in derived.final:
        assert _same(derived.final[norm], given.final[norm]), norm
    for column in derived.trajectory or {}:
        assert _same(derived.trajectory[column], given.trajectory[column]), column


@pytest.mark.parametrize("name", list(_attacks(small_model())))
def test_a_call_that_starts_at_x0_runs_one_forward_of_the_batch_fewer(name):
    """With no source the call costs what it costs with one given (one probe row for the class
    count); before, it probed the whole batch."""
    model = small_model()
    x, target, source = small_batch(model, n=9)
    rows = Rows(model)
    attack = _attacks(model)[name]
    attack(x, target, source)
    given, rows.seen = rows.seen, 0
    attack(x, target)
    assert rows.seen == given


@pytest.mark.parametrize("make", [
    lambda m: CarliniWagnerL2(m, steps=3, binary_search_steps=1),
    lambda m: advfast.Attack(m, loss="ce", beta=0.5, eps=0.3, random_start=True,
                             stop="never", iterations=3),
], ids=["cw", "random start"])
def test_rows_that_do_not_start_at_x0_probe_the_whole_batch(make):
    model = small_model()
    x, target, source = small_batch(model, n=9)
    rows = Rows(model)
    attack = make(model)
    torch.manual_seed(0)
    given_result = attack(x, target, source)
    given, rows.seen = rows.seen, 0
    torch.manual_seed(0)
    derived = attack(x, target)
    assert rows.seen == given + len(x) - 1
    assert torch.equal(derived.source, source)
    assert torch.equal(derived.adversarial, given_result.adversarial)


def test_under_bf16_the_source_is_the_autocast_prediction():
    model = small_model(gain=3.0)
    x, target, _ = small_batch(model, n=12)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        prediction = model(x).argmax(1)
    result = advfast.Attack(model, loss="ce", beta=0.5, stop="never", iterations=2,
                            amp="bf16")(x, target)
    assert torch.equal(result.source, prediction)
