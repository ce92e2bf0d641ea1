"""advfast._C's direct calls (csrc/python_calls.cpp), which the hot loop's wrappers use outside
tracing: the same results, written arguments, version counters and errors as torch.ops'
schema path; the engine's loop takes them; torch.compile still traces the schema."""

import pytest
import torch

import advfast
from advfast import ops
from fixtures import small_batch, small_model

compiled = pytest.mark.skipif(ops.backend() == "reference", reason="needs the compiled ops")


def _cases() -> dict:
    """name -> (arguments builder, indices of written arguments), the engine's six ops."""
    gen = torch.Generator().manual_seed(0)
    b, m, t = 6, 5, 4

    def images():
        x0 = torch.rand(b, 2, 3, 3, generator=gen)
        return x0, torch.randn(b, 2, 3, 3, generator=gen)

    def loss_head():
        return (torch.randn(b, m, generator=gen), torch.randint(0, m, (b,), generator=gen),
                torch.randint(0, m, (b,), generator=gen), "m-logit", 20.0, "clamp", 0.5, "exact")

    def perturb_step():
        x0, g = images()
        # eps 0.01 is below the step (1.5 over 18 elements), so the ball clips
        return (x0.clone(), g, x0, torch.arange(b) % 2 == 0, True, None, 1.5, 0.0, 1.0, 0.01, False)

    def adam_tanh_step():
        x0, g = images()
        w = torch.atanh((2 * x0 - 1) * 0.999)
        return (w, torch.zeros_like(w), torch.zeros_like(w), x0.clone(), g, x0,
                torch.rand(b, generator=gen), torch.ones(b, dtype=torch.int64), None,
                0.01, 0.9, 0.999, 1e-8)

    def bookkeeping(width: int):
        return dict(head=torch.rand(b, len(ops.HEAD_STATS), generator=gen),
                    stats=torch.rand(b, width, generator=gen),
                    norms=torch.rand(b, 3, generator=gen), age=torch.arange(b) % t,
                    active=torch.arange(b) % 3 != 0, trajectory=torch.full((t, b, 4), 0.5),
                    key=torch.randperm(b, generator=gen))

    def observe():
        r = bookkeeping(len(ops.STEP_STATS))
        return (r["head"], r["norms"], r["age"], torch.zeros(b, dtype=torch.bool),
                torch.full((b,), -1), torch.zeros(b, 3), torch.zeros(b, dtype=torch.int64),
                torch.zeros(b, dtype=torch.bool), r["trajectory"], r["key"], [0, 1], 3, "flip",
                True)

    def advance():
        r = bookkeeping(len(ops.STEP_STATS))
        return (r["stats"], r["active"], r["age"], r["norms"], r["trajectory"], r["key"],
                [1, 2])

    def cw_observe():
        r = bookkeeping(len(ops.STEP_STATS))
        return (r["head"], r["norms"], torch.rand(b, generator=gen), r["active"],
                torch.arange(b) % 5, torch.rand(b, generator=gen), torch.rand(b, generator=gen),
                torch.rand(b, generator=gen), torch.zeros(b, dtype=torch.bool),
                torch.zeros(b, dtype=torch.bool), 20.0, 8, 2, True)

    return {"loss_head": (loss_head, ()), "perturb_step_": (perturb_step, (0,)),
            "adam_tanh_step_": (adam_tanh_step, (0, 1, 2, 3)),
            "observe_": (observe, (4, 5, 6, 7, 8)), "advance_": (advance, (2, 3, 4)),
            "cw_observe_": (cw_observe, (4, 5, 6, 7, 8, 9))}


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_same(a, b) -> None:
    """Bit for bit, NaN where NaN: tensors, tuples of them, or None."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@compiled
@pytest.mark.parametrize("name", list(_cases()))
def test_direct_call_matches_the_schema_path(name):
    build, written = _cases()[name]
    args = build()
    direct, schema = _clone(args), _clone(args)
    versions = [direct[i]._version for i in written]
    out_direct = getattr(advfast._C, name)(*direct)
    out_schema = getattr(torch.ops.advfast, name).default(*schema)
    _assert_same(out_direct, out_schema)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    _assert_same([direct[i] for i in tensors], [schema[i] for i in tensors])  # written or not
    assert all(direct[i]._version > v for i, v in zip(written, versions))


@compiled
def test_direct_calls_raise_what_the_schema_path_raises():
    build, _ = _cases()["perturb_step_"]
    args = list(build())
    args[1] = args[1][:2]  # grad of another shape
    with pytest.raises(ValueError, match="must have one shape"):
        advfast._C.perturb_step_(*args)
    build, _ = _cases()["advance_"]
    args = list(build())
    args[2] = args[2] + 100  # ages outside the trajectory
    with pytest.raises(IndexError):
        advfast._C.advance_(*args)


@compiled
def test_the_engine_loop_takes_the_direct_calls(monkeypatch):
    called = []

    class Recorder:
        def __getattr__(self, name):
            called.append(name)
            return getattr(advfast._C, name)

    monkeypatch.setattr(ops, "_C", Recorder())
    model = small_model()
    x, t, _ = small_batch(model)
    advfast.Attack(model, loss="ce", beta=0.1, record=True, iterations=3)(x, t)
    advfast.attacks.CarliniWagnerL2(model, steps=4, binary_search_steps=1)(x, t)
    assert set(called) == {"loss_head", "observe_", "perturb_step_", "advance_",
                           "adam_tanh_step_", "cw_observe_"}


@compiled
def test_tracing_uses_the_schema():
    logits = torch.randn(4, 5)
    target, source = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4])

    def head(z):
        return ops.loss_head_unchecked(z, target, source, "ce", 0.0, "clamp", 0.5)

    traced = torch.compile(head, backend="eager", fullgraph=True)  # a direct call would break
    assert all(torch.equal(a, b) for a, b in zip(traced(logits), head(logits)))
