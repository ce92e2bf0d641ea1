"""The attack engine against an independent plain-PyTorch loop, and its contracts."""

import math

import pytest
import torch
from torch import nn

import advfast
from advfast import ops
from advfast.engine import TRAJECTORY
from advfast.engine.timing import PHASES
from conftest import CUDA
from fixtures import (RULES, BNModel, NaNAbove, RGBModel, rgb_batch, small_batch, small_model,
                      two_pixel_model)


def plain_objective(logits, target, loss, kappa):
    """The objective each loss maximises, written directly (no advfast code)."""
    rows = torch.arange(len(target))
    if loss in ("ce", "ce-sign"):
        return torch.log_softmax(logits, 1)[rows, target].sum()
    if loss == "logit":
        return logits[rows, target].sum()
    others = logits.masked_fill(nn.functional.one_hot(target, logits.shape[1]).bool(),
                                float("-inf"))
    margin = logits[rows, target] - others.max(1).values
    return margin.clamp(max=kappa).sum()  # CW: minimise max(-margin, -kappa)


def plain_attack(model, x0, target, loss, step, iterations, alpha=None, beta=None, kappa=20.0):
    x = x0.clone()
    iterates, target_logits = [x.clone()], []
    for _ in range(iterations):
        x.requires_grad_(True)
        logits = model(x)
        target_logits.append(logits[torch.arange(len(x)), target].detach())
        (p,) = torch.autograd.grad(plain_objective(logits, target, loss, kappa), x)
        if loss == "ce-sign":
            p = p.sign()
        with torch.no_grad():
            if step == "equal-multiplier":
                a = alpha
            else:
                l1 = p.abs().sum((1, 2, 3), keepdim=True)
                a = torch.where(l1 > 0, beta / l1, torch.zeros_like(l1))
            x = (x + a * p).clamp(0, 1)
        iterates.append(x.clone())
    target_logits.append(model(x)[torch.arange(len(x)), target].detach())
    return iterates, torch.stack(target_logits)


@pytest.mark.parametrize("loss", ops.LOSSES)
@pytest.mark.parametrize("step", RULES)
def test_engine_equals_plain_loop(loss, step):
    model = small_model()
    x0, target, source = small_batch(model)
    iterations = 30
    result = advfast.Attack(model, loss=loss, step=step, iterations=iterations,
                            **RULES[step])(x0, target)
    iterates, target_logits = plain_attack(model, x0, target, loss, step, iterations,
                                           **RULES[step])
    torch.testing.assert_close(result.adversarial, iterates[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(result.trajectory["target_logit"], target_logits, atol=1e-4,
                               rtol=1e-4)
    assert torch.equal(result.source, source)
    assert (result.adversarial - x0).abs().sum() > 0
    for name in TRAJECTORY:
        assert result.trajectory[name].shape == (iterations + 1, len(x0))
    # first_flip agrees with the plain iterates' predictions
    preds = torch.stack([model(it).argmax(1) for it in iterates])
    hits = preds == target
    expected = torch.where(hits.any(0), hits.float().argmax(0), torch.full_like(target, -1))
    assert torch.equal(result.first_flip, expected)


@pytest.mark.parametrize("sign", [False, True])
def test_one_equal_perturbation_step_adds_beta(sign):
    model = small_model()
    x0 = torch.full((4, 1, 8, 8), 0.5)
    target = torch.tensor([1, 2, 3, 4])
    result = advfast.Attack(model, loss="ce-sign" if sign else "ce", step="equal-perturbation",
                            beta=0.7, iterations=1)(x0, target)
    l1 = (result.adversarial - x0).abs().sum((1, 2, 3))
    torch.testing.assert_close(l1, torch.full((4,), 0.7), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.final["l1"], l1, rtol=1e-5, atol=0)


def test_first_flip_and_norms_are_exact():
    model = two_pixel_model()
    x0 = torch.tensor([[[[0.6, 0.2]]]])
    # logit loss: P = d g_1 / dx = (0, 1); b = 0.2 + 0.15 n passes a = 0.6 at n = 3.
    attack = advfast.Attack(model, loss="logit", step="equal-multiplier", alpha=0.15,
                            iterations=10)
    result = attack(x0, torch.tensor([1]))
    assert result.first_flip.tolist() == [3]
    for name in ("l1", "l2", "linf"):
        assert result.at_flip[name].item() == pytest.approx(0.45, abs=1e-6)
    assert result.adversarial[0, 0, 0].tolist() == pytest.approx([0.6, 1.0])  # clipped at 1
    never = advfast.Attack(model, loss="logit", step="equal-multiplier", alpha=0.15,
                           iterations=2)(x0, torch.tensor([1]))
    assert never.first_flip.tolist() == [-1]
    assert all(math.isnan(never.at_flip[k].item()) for k in ("l1", "l2", "linf"))
    already = attack(x0, torch.tensor([0]))
    assert already.first_flip.tolist() == [0] and already.at_flip["l2"].item() == 0.0


def test_model_left_untouched():
    torch.manual_seed(0)
    model = BNModel().train()
    model.fc.weight.requires_grad_(False)
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))  # non-trivial running statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x0 = torch.rand(5, 1, 8, 8)
    advfast.Attack(model, loss="m-logit", iterations=5)(x0, torch.arange(5))
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class SyncCounter:
    """Counts tensor -> host conversions, the CPU-visible form of a device synchronisation."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapper(self_, *a, _original=original, **k):
                self.count += 1
                return _original(self_, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("record", [True, False])
def test_no_host_sync_inside_the_loop(monkeypatch, record):
    model = small_model()
    x0, target, _ = small_batch(model)
    counts = []
    for iterations in (2, 25):
        counter = SyncCounter(monkeypatch)
        advfast.Attack(model, loss="ce", iterations=iterations, record=record)(x0, target)
        counts.append(counter.count)
        monkeypatch.undo()
    assert counts[0] == counts[1], f"host syncs grew with iterations: {counts}"


def test_stop_rules_sync_only_every_k_steps(monkeypatch):
    model = small_model()
    x0, target, _ = small_batch(model)
    counts = []
    for iterations in (8, 64):
        counter = SyncCounter(monkeypatch)
        advfast.Attack(model, loss="logit", step="equal-multiplier", alpha=1e-6,
                       iterations=iterations, stop="flip", compact_every=8)(x0, target)
        counts.append(counter.count)
        monkeypatch.undo()
    assert counts[1] - counts[0] <= (64 - 8) // 8


@pytest.mark.parametrize("stop,loss,beta", [("flip", "ce", 1.0), ("confidence", "logit", 2.0)])
def test_stopped_samples_equal_never_stopped_at_their_stop(stop, loss, beta):
    model = small_model(gain=10.0)
    x0, target, _ = small_batch(model, n=10)
    rule = dict(loss=loss, step="equal-perturbation", beta=beta)
    stopped = advfast.Attack(model, iterations=40, stop=stop, compact_every=3, **rule)(x0, target)
    never = advfast.Attack(model, iterations=40, **rule)(x0, target)
    if stop == "flip":
        assert torch.equal(stopped.first_flip, never.first_flip)
        assert torch.equal(stopped.steps[never.first_flip >= 0],
                           never.first_flip[never.first_flip >= 0])
    assert (stopped.steps < 40).any(), "no sample stopped: the test would prove nothing"
    for k in stopped.steps.unique().tolist():
        rows = stopped.steps == k
        ref = advfast.Attack(model, iterations=k, **rule)(x0[rows], target[rows])
        torch.testing.assert_close(stopped.adversarial[rows], ref.adversarial, atol=1e-5, rtol=0)
    if stop == "confidence":
        subspace = never.trajectory["subspace"]
        reached = stopped.steps < 40
        at_stop = subspace[stopped.steps[reached], reached.nonzero()[:, 0]]
        assert (at_stop == 3).all()


@pytest.mark.parametrize("arrives", ["contiguous", "channels_last"])
def test_channels_last_takes_effect_and_memory_format_is_restored(arrives):
    model = RGBModel()
    layout = torch.channels_last if arrives == "channels_last" else torch.contiguous_format
    model.to(memory_format=layout)
    x0, target = rgb_batch(model)
    base = advfast.Attack(model, loss="ce", iterations=5)(x0, target)
    model.seen.clear()
    cl = advfast.Attack(model, loss="ce", iterations=5, channels_last=True)(x0, target)
    assert model.seen and all(t.is_contiguous(memory_format=torch.channels_last)
                              and not t.is_contiguous() for t in model.seen)
    torch.testing.assert_close(cl.adversarial, base.adversarial, atol=1e-5, rtol=0)
    assert cl.adversarial.is_contiguous()
    # the model leaves in the layout it arrived in
    assert model.conv.weight.is_contiguous(memory_format=layout)
    assert model.conv.weight.is_contiguous() == (arrives == "contiguous")


def test_amp_takes_effect():
    model = RGBModel()
    x0, target = rgb_batch(model)
    base = advfast.Attack(model, loss="ce", iterations=5)(x0, target)
    activations = []
    hook = model.fc.register_forward_hook(lambda m, args, out: activations.append(out.dtype))
    bf16 = advfast.Attack(model, loss="ce", iterations=5, amp="bf16")(x0, target)
    hook.remove()
    assert activations and set(activations) == {torch.bfloat16}
    assert bf16.adversarial.dtype == torch.float32
    # bf16 logits round, so the path drifts a little, but only a little of the perturbation.
    drift = (bf16.adversarial - base.adversarial).abs().mean()
    assert 0 < drift < 0.1 * (base.adversarial - x0).abs().mean()


@pytest.mark.parametrize("stop", ["never", "flip"])
def test_timing_reports_every_phase_and_each_took_time(stop):
    """Every phase of the loop is timed: each reports a positive mean time, and together they
    fit in the time of a step (they are disjoint spans inside it)."""
    assert set(PHASES) == {"forward", "head", "backward", "update"}  # the documented phases
    model = small_model()
    x0, target, _ = small_batch(model)
    result = advfast.Attack(model, iterations=4, stop=stop)(x0, target)
    t = result.timing
    assert t.batch_size == len(x0) and t.total_s > 0
    # a stream counts its passes, the last observing the final images (it steps no sample)
    assert t.steps == 4 if stop == "never" else t.steps >= int(result.steps.max())
    assert t.phases_ms is not None and set(t.phases_ms) == set(PHASES)
    untimed = [name for name in PHASES if not t.phases_ms[name] > 0]
    assert not untimed, f"phases never timed: {untimed} in {t.phases_ms}"
    assert sum(t.phases_ms.values()) <= t.per_iteration_ms * (1 + 1e-9)
    assert advfast.Attack(model, iterations=4, time_phases=False)(x0, target).timing.phases_ms is None


@pytest.mark.parametrize(
    "kwargs,call,error",
    [
        (dict(loss="hinge"), None, ValueError),
        (dict(step="adam"), None, ValueError),
        (dict(stop="sometimes"), None, ValueError),
        (dict(amp="fp8"), None, ValueError),
        (dict(beta=-1.0), None, ValueError),
        (dict(iterations=-3), None, ValueError),
        (dict(), dict(images=torch.rand(2, 1, 8, 8) * 2), ValueError),
        (dict(), dict(images=torch.rand(2, 8, 8)), ValueError),
        (dict(), dict(images=torch.zeros(2, 1, 8, 8, dtype=torch.uint8)), TypeError),
        (dict(), dict(target=torch.tensor([0, 10])), IndexError),
        (dict(), dict(target=torch.tensor([0, 1, 2])), ValueError),
        (dict(), dict(source=torch.tensor([-1, 0])), IndexError),
    ],
)
def test_bad_arguments_and_inputs_raise_their_error_type(kwargs, call, error):
    model = small_model()
    args = dict(images=torch.rand(2, 1, 8, 8), target=torch.tensor([0, 1]))
    args.update(call or {})
    with pytest.raises(error):
        advfast.Attack(model, **kwargs)(**args)


@CUDA
@pytest.mark.cuda
def test_cuda_loop_never_syncs():
    """CUDA's sync debug mode warns at every synchronisation: their number must not grow with
    the iterations (the set-up before the loop validates inputs, which syncs a fixed number)."""
    import warnings

    model = small_model().cuda()
    x0, target = torch.rand(6, 1, 8, 8, device="cuda"), torch.arange(6, device="cuda")
    advfast.Attack(model, loss="m-logit", iterations=2)(x0, target)  # warm-up
    counts = []
    for iterations in (2, 30):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                advfast.Attack(model, loss="m-logit", iterations=iterations,
                               time_phases=False)(x0, target)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("stop", ["never", "flip"])
def test_empty_batch_and_zero_iterations_return_the_inputs(stop):
    model = small_model()
    empty = advfast.Attack(model, iterations=3, stop=stop)(torch.rand(0, 1, 8, 8),
                                                         torch.zeros(0, dtype=torch.long))
    assert empty.adversarial.shape == (0, 1, 8, 8) and empty.first_flip.shape == (0,)
    x0, target, _ = small_batch(model, n=3)
    none = advfast.Attack(model, iterations=0, stop=stop)(x0, target)
    assert torch.equal(none.adversarial, x0) and none.timing.steps == 0
    assert (none.steps == 0).all()


@pytest.mark.parametrize("stop", ["never", "flip"])
def test_non_finite_logits_stop_the_sample_and_spare_the_others(stop):
    model = NaNAbove()
    x0 = torch.tensor([[[[0.6, 0.2]]], [[[0.3, 0.1]]]])
    target = torch.tensor([1, 0])
    attack = advfast.Attack(model, loss="logit", step="equal-multiplier", alpha=0.15,
                            iterations=6, stop=stop, compact_every=2)
    result = attack(x0, target, source=torch.tensor([0, 0]))
    # sample 0: b = 0.2, 0.35, 0.5, 0.65 -> NaN logits at step 3: it stops there, finite
    assert result.failure.tolist() == [1, 0]
    assert result.steps[0].item() == 3 and result.first_flip[0].item() == -1
    assert result.adversarial[0].flatten().tolist() == pytest.approx([0.6, 0.65])
    assert torch.isfinite(result.adversarial).all()
    records = result.records()
    assert records[0]["failure"] == "non-finite logits" and records[1]["failure"] is None
    assert records[0]["l2_at_flip"] is None  # strict JSON: no NaN
    # sample 1 is what it is alone
    alone = attack(x0[1:], target[1:], source=torch.tensor([0]))
    torch.testing.assert_close(result.adversarial[1:], alone.adversarial)
    assert result.steps[1].item() == alone.steps[0].item()
