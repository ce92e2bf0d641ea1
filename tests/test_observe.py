"""advfast.ops.observe_ and advance_ (the engine's fused bookkeeping) against a per-row oracle
written from their documented contract, against the reference, and the engine's op count."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import advfast
from advfast import ops
from advfast.ops import reference
from conftest import DEVICES
from fixtures import small_batch, small_model

compiled = pytest.mark.skipif(ops.backend() == "reference", reason="compiled library missing")
H = {name: i for i, name in enumerate(ops.HEAD_STATS)}
S = {name: i for i, name in enumerate(ops.STEP_STATS)}
HEAD_COLUMNS = [H["source_prob"], H["target_prob"], H["margin"]]
STEP_COLUMNS = [S["p_l1"], S["step_l1"]]
T, WIDTH = 6, 5


def _rows(b: int, device: str, seed: int = 0) -> dict:
    """Random rows: every combination of hit / finite / already flipped / failed / done /
    paused occurs for b of a few dozen; non-finite values in the stats too."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randn(b, len(H), generator=gen)
    head[:, H["hit"]] = (torch.rand(b, generator=gen) < 0.5).float()
    head[:, H["finite"]] = (torch.rand(b, generator=gen) < 0.8).float()
    head[:, H["subspace"]] = torch.randint(1, 4, (b,), generator=gen).float()
    head[::7, H["margin"]] = float("nan")
    head[3::7, H["source_prob"]] = float("inf")
    state = dict(
        head=head, norms=torch.rand(b, 3, generator=gen),
        age=torch.randint(0, T - 1, (b,), generator=gen),
        paused=torch.rand(b, generator=gen) < 0.2,
        first_flip=torch.where(torch.rand(b, generator=gen) < 0.3, 1, -1),
        flip_norms=torch.rand(b, 3, generator=gen),
        failure=torch.where(torch.rand(b, generator=gen) < 0.1, 1, 0),
        done=torch.rand(b, generator=gen) < 0.2,
        trajectory=torch.full((T, b + 1, WIDTH), float("nan")),
        key=torch.randperm(b, generator=gen),
        stats=torch.rand(b, len(S), generator=gen),
        active=torch.rand(b, generator=gen) < 0.7)
    state["stats"][1::5, S["p_l1"]] = float("nan")
    return {k: v.to(device) for k, v in state.items()}


def _oracle_observe(r: dict, iterations: int, stop: str, controlled: bool) -> dict:
    """observe_'s contract, row by row in plain Python (floats and ints, no tensors)."""
    out = {k: v.cpu().tolist() for k, v in r.items()}
    traj = r["trajectory"].cpu().clone()
    active = []
    for i, row in enumerate(out["head"]):
        finite, hit = row[H["finite"]] >= 0.5, row[H["hit"]] > 0.5
        if not finite and out["failure"][i] == 0:
            out["failure"][i] = 1
        if hit and finite and out["first_flip"][i] < 0:
            out["first_flip"][i] = out["age"][i]
            out["flip_norms"][i] = list(out["norms"][i])
        if controlled:
            meets = {"flip": hit, "confidence": row[H["subspace"]] == 3}.get(stop, False)
            out["done"][i] = bool(out["done"][i] or out["failure"][i] > 0
                                  or out["age"][i] >= iterations or meets)
            active.append(not (out["done"][i] or out["paused"][i]))
        else:
            active.append(out["failure"][i] == 0)
        for j, c in enumerate(HEAD_COLUMNS):
            traj[out["age"][i], out["key"][i], j] = row[c]
    return {"active": active, "first_flip": out["first_flip"], "failure": out["failure"],
            "done": out["done"], "flip_norms": out["flip_norms"], "trajectory": traj}


def _call_observe(r: dict, iterations: int, stop: str, controlled: bool, fn=None) -> dict:
    r = {k: v.clone() for k, v in r.items()}
    fn = fn or (lambda *a, **kw: ops.observe_(*a, **kw))
    active = fn(r["head"], r["norms"], r["age"], r["paused"], r["first_flip"], r["flip_norms"],
                r["failure"], r["done"], trajectory=r["trajectory"], key=r["key"],
                columns=HEAD_COLUMNS, iterations=iterations, stop=stop, controlled=controlled)
    return {"active": active.tolist(), "first_flip": r["first_flip"].tolist(),
            "failure": r["failure"].tolist(), "done": r["done"].tolist(),
            "flip_norms": r["flip_norms"].tolist(), "trajectory": r["trajectory"].cpu()}


def _reference_observe(head, norms, age, paused, first_flip, flip_norms, failure, done, *,
                       trajectory, key, columns, iterations, stop, controlled):
    return reference.observe_(head, norms, age, paused, first_flip, flip_norms, failure, done,
                              trajectory, key, list(columns), iterations, stop, controlled)


def _same(got: dict, want: dict) -> None:
    for name in ("active", "first_flip", "failure", "done", "flip_norms"):
        assert got[name] == want[name], name
    torch.testing.assert_close(got["trajectory"], want["trajectory"], equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stop", ops.STOP_RULES)
@pytest.mark.parametrize("controlled", [True, False])
def test_observe_matches_the_contract(device, stop, controlled):
    rows = _rows(40, device)
    want = _oracle_observe(rows, 3, stop, controlled)
    _same(_call_observe(rows, 3, stop, controlled), want)
    _same(_call_observe(rows, 3, stop, controlled, _reference_observe), want)


def _oracle_advance(r: dict) -> dict:
    out = {k: v.cpu().tolist() for k, v in r.items()}
    traj = r["trajectory"].cpu().clone()
    for i, stats in enumerate(out["stats"]):
        out["norms"][i] = stats[S["delta_l1"]:S["delta_linf"] + 1]
        for j, c in enumerate(STEP_COLUMNS):
            value = stats[c] if out["active"][i] else math.nan
            traj[out["age"][i], out["key"][i], WIDTH - len(STEP_COLUMNS) + j] = value
        out["age"][i] += int(out["active"][i])
    return {"age": out["age"], "norms": out["norms"], "trajectory": traj}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_advance_matches_the_contract(device, impl):
    rows = _rows(40, device, seed=1)
    want = _oracle_advance(rows)
    r = {k: v.clone() for k, v in rows.items()}
    if impl == "op":
        ops.advance_(r["stats"], r["active"], r["age"], r["norms"], trajectory=r["trajectory"],
                     key=r["key"], columns=STEP_COLUMNS)
    else:
        reference.advance_(r["stats"], r["active"], r["age"], r["norms"], r["trajectory"],
                           r["key"], STEP_COLUMNS)
    assert r["age"].tolist() == want["age"]
    torch.testing.assert_close(r["norms"].cpu(), torch.tensor(want["norms"]))
    torch.testing.assert_close(r["trajectory"].cpu(), want["trajectory"], equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_written_tensors_and_no_trajectory(device):
    rows = _rows(9, device, seed=2)
    want = _oracle_observe(rows, 2, "flip", True)
    first_flip = torch.zeros(9, 2, dtype=torch.int64, device=device)[:, 1]
    first_flip.copy_(rows["first_flip"])
    flip_norms = rows["flip_norms"].t().contiguous().t()  # column-major [B, 3]
    active = ops.observe_(rows["head"], rows["norms"], rows["age"], rows["paused"], first_flip,
                          flip_norms, rows["failure"].clone(), rows["done"].clone(),
                          iterations=2, stop="flip")
    assert active.tolist() == want["active"]
    assert first_flip.tolist() == want["first_flip"]
    assert flip_norms.tolist() == want["flip_norms"]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    rows = {k: (v[:0] if k not in ("trajectory",) else v) for k, v in _rows(3, device).items()}
    active = ops.observe_(rows["head"], rows["norms"], rows["age"], rows["paused"],
                          rows["first_flip"], rows["flip_norms"], rows["failure"], rows["done"],
                          trajectory=rows["trajectory"], key=rows["key"], columns=HEAD_COLUMNS)
    assert active.shape == (0,)
    ops.advance_(rows["stats"], rows["active"], rows["age"], rows["norms"])


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_cells_outside_the_trajectory_are_refused(impl):
    rows = _rows(4, "cpu")
    rows["age"][2] = T  # one past the last trajectory row
    before = rows["trajectory"].clone()
    with pytest.raises((IndexError, advfast.errors.ClassOutOfRange), match="outside"):
        if impl == "op":
            ops.advance_(rows["stats"], rows["active"], rows["age"], rows["norms"],
                         trajectory=rows["trajectory"], key=rows["key"], columns=STEP_COLUMNS)
        else:
            reference.advance_(rows["stats"], rows["active"], rows["age"], rows["norms"],
                               rows["trajectory"], rows["key"], STEP_COLUMNS)
    torch.testing.assert_close(rows["trajectory"], before, equal_nan=True)


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_an_empty_trajectory_holds_no_cell(impl):
    rows = _rows(3, "cpu")
    empty = torch.empty(0, 4, WIDTH)  # no storage at all: still a trajectory, every cell outside
    call = ops.observe_ if impl == "op" else _reference_observe
    with pytest.raises((IndexError, advfast.errors.ClassOutOfRange), match="outside"):
        call(rows["head"], rows["norms"], rows["age"], rows["paused"], rows["first_flip"],
             rows["flip_norms"], rows["failure"], rows["done"], trajectory=empty,
             key=rows["key"], columns=HEAD_COLUMNS, iterations=3, stop="never",
             controlled=True)


@pytest.mark.parametrize("bad, message", [
    (dict(stop="first"), "unknown stop"),
    (dict(columns=[12]), "outside"),
    (dict(key=None), "together"),
    (dict(flip_norms="norms"), "must not share memory"),
    (dict(done=torch.zeros(4, dtype=torch.int64)), "done must be"),
])
def test_bad_arguments_are_one_line_user_errors(bad, message):
    r = _rows(4, "cpu")
    args = dict(trajectory=r["trajectory"], key=r["key"], columns=HEAD_COLUMNS, stop="flip")
    tensors = {k: r[k] for k in ("head", "norms", "age", "paused", "first_flip", "flip_norms",
                                 "failure", "done")}
    for name, value in bad.items():
        if name in tensors:
            tensors[name] = r[value] if isinstance(value, str) else value
        else:
            args[name] = value
    with pytest.raises(advfast.errors.UserError, match=message) as err:
        ops.observe_(*tensors.values(), **args)
    assert "\n" not in str(err.value)


@compiled
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    r = _rows(5, device)
    observe = (r["head"], r["norms"], r["age"], r["paused"], r["first_flip"], r["flip_norms"],
               r["failure"], r["done"], r["trajectory"], r["key"], HEAD_COLUMNS, 3, "flip",
               True)
    advance = (r["stats"], r["active"], r["age"], r["norms"], r["trajectory"], r["key"],
               STEP_COLUMNS)
    for op, args in ((torch.ops.advfast.observe_.default, observe),
                     (torch.ops.advfast.advance_.default, advance)):
        torch.library.opcheck(op, args)


@compiled
def test_written_arguments_move_their_version_counters():
    r = _rows(5, "cpu")
    written = [r[k] for k in ("first_flip", "flip_norms", "failure", "done", "trajectory")]
    before = [t._version for t in written]
    ops.observe_(r["head"], r["norms"], r["age"], r["paused"], *written[:4],
                 trajectory=r["trajectory"], key=r["key"], columns=HEAD_COLUMNS)
    assert all(t._version > v for t, v in zip(written, before))


def _ops_per_iteration(record: bool, stop: str, cw: bool = False) -> float:
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from count_ops import per_iteration

    model = small_model()
    x, t, _ = small_batch(model)
    attack = advfast.Attack(model, loss="ce", beta=0.1, record=record, stop=stop, iterations=2,
                            compact_every=1000)

    def run(n: int) -> None:
        if cw:  # one run per sample, no abort, runs of a multiple of compact_every steps
            advfast.attacks.CarliniWagnerL2(model, steps=n, binary_search_steps=1,
                                            abort_early=False, record=record,
                                            compact_every=8)(x, t)
        else:
            attack.shortened(n)(x, t)

    def floor(n: int) -> None:
        with advfast.engine.frozen(model):
            for _ in range(n):
                xr = x.clone().requires_grad_(True)
                logits = model(xr)
                torch.autograd.grad(logits, xr, torch.ones_like(logits))

    lengths = (8, 24) if cw else (2, 6)
    return per_iteration(run, lengths) - per_iteration(floor, lengths)


@compiled
def test_an_iteration_dispatches_a_fixed_number_of_own_ops():
    """Beside the model's forward and backward, an iteration dispatches loss_head, observe_,
    perturb_step_ and advance_, less the floor's ones_like seed: 3, whatever is recorded and
    whichever driver runs (fixed for stop="never", the stream for "flip")."""
    counts = {(record, stop): _ops_per_iteration(record, stop)
              for record in (False, True) for stop in ("never", "flip")}
    assert set(counts.values()) == {3.0}, counts


# ---- cw_observe_ -----------------------------------------------------------------------------

def _cw_rows(b: int, device: str, seed: int = 3) -> dict:
    """Rows around every decision of CW's rules: abort checks (inner_age a multiple of 4) and
    not, losses on both sides of 0.9999 x the previous one, margins around kappa, squared L2s
    below and above the best, a NaN margin, runs at their last step."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randn(b, len(H), generator=gen)
    head[:, H["margin"]] = 5.0 + 2 * torch.randn(b, generator=gen)  # kappa = 5
    head[::9, H["margin"]] = float("nan")
    norms = torch.rand(b, 3, generator=gen)
    constant = torch.rand(b, generator=gen) * 10
    loss = norms[:, 1].square() + constant * torch.clamp(5.0 - head[:, H["margin"]], min=0)
    wobble = 1 + 1e-3 * torch.randn(b, generator=gen)
    state = dict(
        head=head, norms=norms, constant=constant, active=torch.rand(b, generator=gen) < 0.8,
        inner_age=torch.randint(0, 12, (b,), generator=gen),
        previous_loss=torch.nan_to_num(loss * wobble, nan=1.0),
        best_l2=torch.where(torch.rand(b, generator=gen) < 0.3, float("inf"),
                            torch.rand(b, generator=gen)),
        best_constant=torch.rand(b, generator=gen),
        succeeded=torch.rand(b, generator=gen) < 0.3, paused=torch.zeros(b, dtype=torch.bool))
    return {k: v.to(device) for k, v in state.items()}


def _oracle_cw(r: dict, kappa: float, steps: int, check_every: int, abort_early: bool) -> dict:
    """cw_observe_'s contract row by row, in numpy float32 scalars (the original's float32)."""
    f32 = np.float32
    out = {k: v.cpu().tolist() for k, v in r.items()}
    stepping, better = [], []
    for i in range(len(out["active"])):
        live, margin = out["active"][i], f32(out["head"][i][H["margin"]])
        gap = f32(kappa) - margin
        l2sq = f32(out["norms"][i][1]) ** 2
        loss = l2sq + f32(out["constant"][i]) * (gap if gap >= 0 or gap != gap else f32(0))
        check = live and abort_early and out["inner_age"][i] % check_every == 0
        stalled = check and loss > f32(out["previous_loss"][i]) * f32(0.9999)
        if check:
            out["previous_loss"][i] = float(loss)
        success = live and not stalled and margin > f32(kappa)
        good = success and l2sq < f32(out["best_l2"][i])
        if good:
            out["best_l2"][i], out["best_constant"][i] = float(l2sq), out["constant"][i]
        out["succeeded"][i] = out["succeeded"][i] or success
        ended = live and (stalled or out["inner_age"][i] + 1 >= steps)
        out["paused"][i] = out["paused"][i] or ended
        stepping.append(live and not ended)
        better.append(good)
        out["inner_age"][i] += int(stepping[-1])
    return {"stepping": stepping, "better": better,
            **{k: out[k] for k in ("inner_age", "previous_loss", "best_l2", "best_constant",
                                   "succeeded", "paused")}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("abort_early", [True, False])
def test_cw_observe_matches_the_contract(device, impl, abort_early):
    rows = _cw_rows(60, device)
    want = _oracle_cw(rows, 5.0, 10, 4, abort_early)
    r = {k: v.clone() for k, v in rows.items()}
    fn = ops.cw_observe_ if impl == "op" else (
        lambda *a, **kw: reference.cw_observe_(*a, kw["kappa"], kw["steps"], kw["check_every"],
                                               kw["abort_early"]))
    stepping, better = fn(*r.values(), kappa=5.0, steps=10, check_every=4,
                          abort_early=abort_early)
    assert stepping.tolist() == want["stepping"]
    assert better.tolist() == want["better"]
    assert any(want["better"]) and not all(want["stepping"])  # the inputs reach every branch
    for name in ("inner_age", "succeeded", "paused"):
        assert r[name].tolist() == want[name], name
    for name in ("previous_loss", "best_l2", "best_constant"):
        torch.testing.assert_close(r[name].cpu(), torch.tensor(want[name]), rtol=0, atol=0,
                                   equal_nan=True, msg=name)


def test_cw_observe_refuses_bad_arguments():
    r = _cw_rows(4, "cpu")
    with pytest.raises(advfast.errors.UserError, match="check_every must be positive"):
        ops.cw_observe_(*r.values(), kappa=0.0, steps=10, check_every=0)
    r["paused"] = r["active"]
    with pytest.raises(advfast.errors.UserError, match="must not share memory"):
        ops.cw_observe_(*r.values(), kappa=0.0, steps=10, check_every=1)


@compiled
@pytest.mark.parametrize("device", DEVICES)
def test_cw_observe_opcheck(device):
    r = _cw_rows(6, device)
    torch.library.opcheck(torch.ops.advfast.cw_observe_.default,
                          (*r.values(), 5.0, 10, 4, True))


@compiled
def test_a_cw_iteration_keeps_its_rules_in_one_op():
    """CW's abort, success, best and end-of-run rules are one op (cw_observe_).  Beside the
    model, an iteration dispatches 5 ops (loss_head, observe_, cw_observe_, adam_tanh_step_,
    advance_), 5 tensor ops (the copy of the new best images, Adam's step count) and, every 8
    iterations, the search's boundary: 17 per iteration here, whatever is recorded (53 while the
    rules were tensor ops)."""
    counts = {record: _ops_per_iteration(record, "never", cw=True) for record in (False, True)}
    assert counts[False] == counts[True], counts
    assert counts[False] <= 17, counts
