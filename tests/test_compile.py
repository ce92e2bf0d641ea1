"""torch.compile in the engine: compiled and eager runs agree, and nothing recompiles once
every batch size of a stream has been seen."""

import pytest
import torch
from torch._dynamo.utils import counters

import advfast
from advfast import ops
from advfast.engine import buckets
from fixtures import RULES, Smooth, list_feed, small_batch, small_model, smooth_batch


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("loss", ops.LOSSES)
@pytest.mark.parametrize("step", RULES)
@pytest.mark.parametrize("stop", ["never", "flip"])
def test_compiled_equals_eager(loss, step, stop):
    """aot_eager traces the forward and head into one graph (with the fused op in it) and runs
    the backward AOTAutograd made, without generating code, so it checks the tracing cheaply;
    test_inductor_equals_eager covers code generation."""
    model = small_model(gain=5.0)
    x0, target, _ = small_batch(model, n=10)
    common = dict(loss=loss, step=step, iterations=30, stop=stop, compact_every=4, **RULES[step])
    eager = advfast.Attack(model, **common)(x0, target)
    compiled = advfast.Attack(model, compile="aot_eager", **common)(x0, target)
    assert torch.equal(compiled.first_flip, eager.first_flip)
    torch.testing.assert_close(compiled.adversarial, eager.adversarial, atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled.trajectory["target_prob"],
                               eager.trajectory["target_prob"], atol=1e-5, rtol=0,
                               equal_nan=True)


def test_inductor_equals_eager():
    model = small_model(gain=5.0)
    x0, target, _ = small_batch(model, n=8)
    common = dict(loss="m-logit", step="equal-perturbation", beta=1.0, iterations=20)
    eager = advfast.Attack(model, **common)(x0, target)
    compiled = advfast.Attack(model, compile="default", **common)(x0, target)
    assert torch.equal(compiled.first_flip, eager.first_flip)
    torch.testing.assert_close(compiled.adversarial, eager.adversarial, atol=1e-4, rtol=0)


def test_a_compiled_stream_compiles_each_bucket_once():
    model = small_model(gain=5.0)
    x0, target, source = small_batch(model, n=21)
    attack = advfast.Attack(model, loss="ce", beta=1.0, iterations=40, stop="flip",
                            compact_every=3, compile="aot_eager")
    torch._dynamo.reset()
    before = graphs()
    first = {int(k): int(f) for done in attack.stream(list_feed(x0, target, source), capacity=8)
             for k, f in zip(done.key, done.first_flip)}
    compiled_now = graphs() - before
    assert 1 <= compiled_now <= len(buckets(8)) == 4
    again = {int(k): int(f) for done in attack.stream(list_feed(x0, target, source), capacity=8)
             for k, f in zip(done.key, done.first_flip)}
    assert graphs() - before == compiled_now, "recompiled after warm-up"
    assert first == again and sorted(first) == list(range(21))
    eager = advfast.Attack(model, loss="ce", beta=1.0, iterations=40, stop="flip")(x0, target,
                                                                                 source)
    assert [first[i] for i in range(21)] == eager.first_flip.tolist()


def test_compiled_cw_search_equals_eager():
    from advfast import attacks

    model = Smooth()
    x0, target, source = smooth_batch(model, n=6)
    params = dict(c=0.05, steps=30, lr=0.05, binary_search_steps=2, compact_every=5)
    eager = attacks.CarliniWagnerL2(model, **params)(x0, target, source)
    compiled = attacks.CarliniWagnerL2(model, compile="aot_eager", **params)(x0, target, source)
    torch.testing.assert_close(compiled.adversarial, eager.adversarial, atol=1e-5, rtol=0)
    assert torch.equal(compiled.steps, eager.steps)


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile"):
        advfast.Attack(small_model(), compile="fastest")
