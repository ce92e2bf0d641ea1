"""Pure-PyTorch reference of advfast's fused ops.

This is the oracle the compiled kernels are tested against and the fallback used when the
compiled library is missing.  It follows the same formulas (``csrc/advfast_math.h``) with
eager tensor operations, computing in float32 whatever the input precision, and the same
rules for non-finite input:

* a non-finite gradient element (NaN, +-inf) contributes no step and nothing to sum|P|;
* ``-inf`` logits are masked classes (probability 0, as ``torch.softmax``); a row with a NaN or
  ``+inf`` logit, or only ``-inf`` ones, has NaN probabilities and ``finite = 0``;
* NaN ranks above every number in argmax and max (``torch.argmax``, ``torch.amax``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The stats columns, owned by csrc/stats.h (tests/test_op_stats_names.py checks these against
# torch.ops.advfast.head_stat_names() / step_stat_names()).
HEAD_STATS: tuple[str, ...] = ("pred", "max_prob", "target_prob", "target_logit", "source_prob",
                               "source_logit", "runner_up", "margin", "subspace", "hit",
                               "target_logprob", "finite")
STEP_STATS: tuple[str, ...] = ("p_l1", "delta_l1", "delta_l2", "delta_linf", "step_l1")
# How loss_head computes CE's target element 1 - p_c (csrc/advfast_math.h CeSeed).
CE_SEEDS: tuple[str, ...] = ("exact", "eager")
# The exact equal perturbation's caps on Newton evaluations and rounds, the share of beta Newton
# may leave, the gap below which its step is taken as final and the shortfall that starts
# another round (csrc/advfast_math.h kExactPasses, kExactRounds, kExactTolerance,
# kExactPredict, kExactCheck).
EXACT_PASSES = 32
EXACT_ROUNDS = 4
EXACT_TOLERANCE = torch.tensor(1e-6, dtype=torch.float32)
EXACT_PREDICT = torch.tensor(1e-2, dtype=torch.float32)
EXACT_CHECK = torch.tensor(2e-6, dtype=torch.float32)
FLOAT_MAX = torch.finfo(torch.float32).max


def kappa_weight(margin: torch.Tensor, kappa: float, kappa_mode: str) -> torch.Tensor:
    """Multiplier w of the M-logit seed (paper Eqs. 4, 15-16).

    ``clamp``: w = 1 while margin < kappa, else 0 (CW's max(., -kappa)).
    ``balance``: w = 1 below kappa, 0 at kappa, -1 above (the margin is held at kappa).
    """
    above = torch.zeros_like(margin) if kappa_mode == "clamp" else -(margin > kappa).float()
    return torch.where(margin < kappa, torch.ones_like(margin), above)


def loss_head(logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor, loss: str,
              kappa: float = 20.0, kappa_mode: str = "clamp", threshold: float = 0.9,
              ce_seed: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Seed dO/dlogits [B, M] and HEAD_STATS [B, 12] of the objective O the attack maximises.

    ce, ce-sign: O = log softmax(g)_c, seed = onehot(c) - softmax(g); its target element
                 1 - p_c is the sum of the other classes' probabilities with ce_seed="exact"
                 (no cancellation where p_c rounds to 1), 1 - p_c in float32 with "eager"
    logit:       O = g_c,              seed = onehot(c)
    m-logit:     O = w * (g_c - g_c*), seed = w * (onehot(c) - onehot(c*)), c* = argmax_{i != c} g_i
    """
    g = logits.float()
    batch, classes = g.shape
    rows = torch.arange(batch, device=g.device)
    lse = torch.logsumexp(g, dim=1)
    finite = torch.isfinite(lse)
    prob = torch.softmax(g, dim=1)  # NaN rows exactly where lse is not finite
    pred = g.argmax(dim=1)
    max_prob = prob.gather(1, pred[:, None])[:, 0]
    masked = g.scatter(1, target[:, None], float("-inf"))
    runner_up = masked.argmax(dim=1)
    # c* is never c, even when every other logit is -inf (argmax would then pick index 0).
    runner_up = torch.where(runner_up == target, (target == 0).long(), runner_up)
    target_logit = g[rows, target]
    margin = target_logit - g[rows, runner_up]
    hit = pred == target
    subspace = torch.where(max_prob < threshold, torch.full_like(max_prob, 2.0),
                           torch.where(hit, torch.full_like(max_prob, 3.0),
                                       torch.ones_like(max_prob)))
    onehot = F.one_hot(target, classes).float()
    if loss in ("ce", "ce-sign"):
        seed = onehot - prob
        if ce_seed == "exact":
            others = prob.masked_fill(onehot.bool(), 0.0).sum(dim=1)
            seed = torch.where(onehot.bool(), others[:, None], seed)
    elif loss == "logit":
        seed = onehot
    else:
        w = kappa_weight(margin, kappa, kappa_mode)
        seed = w[:, None] * (onehot - F.one_hot(runner_up, classes).float())
    stats = torch.stack([pred.float(), max_prob, prob[rows, target], target_logit,
                         prob[rows, source], g[rows, source], runner_up.float(), margin, subspace,
                         hit.float(), torch.where(finite, target_logit - lse, float("nan")),
                         finite.float()], dim=1)
    return seed, stats


def perturb_step_(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, *, sign: bool,
                  alpha: float | None = None, beta: float | None = None, lo: float = 0.0,
                  hi: float = 1.0, eps: float | None = None, active: torch.Tensor | None = None,
                  exact_l1: bool = False) -> torch.Tensor:
    """One step X <- clip(X + a * P) in place (paper Eq. 11); returns STEP_STATS [B, 5].

    P = sign(grad) or grad; a = alpha (equal multiplier) or beta / sum|P| per sample (equal
    perturbation; no step where sum|P| = 0).  Then clip to [lo, hi] and, with eps, to the
    Linf ball around x0 (Eq. 2).  exact_l1 (beta only): the scale with sum min(a|P|, room) =
    beta, by Newton's method (csrc/advfast_math.h).  Inactive samples are not stepped and report
    p_l1 = step_l1 = 0.
    """
    batch = x.shape[0]
    if x.numel() == 0:
        return x.new_zeros((batch, len(STEP_STATS)))
    p = grad.float().reshape(batch, -1)
    p = torch.where(torch.isfinite(p), p, torch.zeros_like(p))
    if sign:
        p = torch.sign(p)
    p_l1 = p.abs().sum(dim=1)
    xf = x.reshape(batch, -1)
    x0f = x0.reshape(batch, -1)
    act = torch.ones(batch, dtype=torch.bool, device=x.device) if active is None else active
    if exact_l1:
        new, step_l1 = _exact_step(xf, p, x0f, beta, lo, hi, eps, act)
    else:
        step = alpha * p if beta is None else _scaled(p, torch.full_like(p_l1, beta), p_l1)
        new = torch.where(act[:, None], _updated(xf, step, x0f, lo, hi, eps), xf)
        step_l1 = (new - xf).abs().sum(dim=1)
    p_l1 = torch.where(act, p_l1, torch.zeros_like(p_l1))
    x.copy_(new.view_as(x))
    delta = new - x0f
    return torch.stack([p_l1, delta.abs().sum(dim=1), delta.square().sum(dim=1).sqrt(),
                        delta.abs().amax(dim=1), step_l1], dim=1)


def _scaled(p: torch.Tensor, beta: torch.Tensor, p_l1: torch.Tensor) -> torch.Tensor:
    """beta / sum|P| * P per sample (beta [B]), 0 where the sum is 0; beta / sum overflows only
    for a denormal sum, which divides element-wise instead (advfast_math.h step_scale)."""
    scale = beta / p_l1
    step = torch.where(torch.isinf(scale)[:, None], beta[:, None] * (p / p_l1[:, None]),
                       scale[:, None] * p)
    return torch.where((p_l1 == 0)[:, None], torch.zeros_like(step), step)


def _bounds(x0f: torch.Tensor, lo: float, hi: float,
            eps: float | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """The bounds updated_value clips to, as advfast_math.h room_of compares them."""
    if eps is None:
        return lo, hi
    below, above = x0f - eps, x0f + eps
    return torch.where(below > lo, below, lo), torch.where(above < hi, above, hi)


def _updated(xf, step, x0f, lo: float, hi: float, eps: float | None) -> torch.Tensor:
    """advfast_math.h updated_value: the box clip, then the ball's (a NaN x0 leaves the box's
    bounds, as the kernels' comparisons do)."""
    new = torch.clamp(xf + step, lo, hi)
    if eps is not None:
        lo_b, hi_b = _bounds(x0f, lo, hi, eps)
        new = torch.clamp(new, lo_b, hi_b)
    return new


def _room(xf, p, bounds) -> torch.Tensor:
    """advfast_math.h room_of: the distance to the bound P moves towards, 0 where there is
    none (p = 0, at or beyond the bound, NaN)."""
    lo_b, hi_b = bounds
    r = torch.where(p > 0, hi_b - xf, torch.where(p < 0, xf - lo_b, torch.zeros_like(xf)))
    return torch.where(r > 0, r, torch.zeros_like(r))


def _exact_step(xf, p, x0f, beta: float, lo: float, hi: float, eps: float | None,
                act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact equal perturbation's rounds (csrc/advfast_math.h): (new x [B, N], step_l1)."""
    bounds = _bounds(x0f, lo, hi, eps)
    remaining = torch.full((len(xf),), beta, dtype=torch.float32, device=xf.device)
    added = torch.zeros_like(remaining)
    todo, x = act.clone(), xf
    for _ in range(EXACT_ROUNDS):
        if not bool(todo.any()):
            break
        room = _room(x, p, bounds)
        step, f_at_a, predicted = _exact_scaled_step(p, room, remaining, todo)
        new = torch.where(todo[:, None], _updated(x, step, x0f, lo, hi, eps), x)
        moved = (new - x).abs().sum(dim=1)
        added = added + moved
        again = predicted & (remaining - f_at_a > EXACT_CHECK * beta) & (moved > 0)
        remaining = remaining - moved
        todo, x = todo & again, new
    return x, added


def _exact_scaled_step(p, room, beta: torch.Tensor, todo: torch.Tensor):
    """One round's step a P by Newton's method on f(a) = sum min(a u, room) = beta [B] (its
    last step taken unevaluated after a gap below EXACT_PREDICT of beta); (step, f(a) [B],
    predicted [B]: whether a is such a step)."""
    q = p.abs()
    s = torch.where(room > 0, q, 0.0).sum(dim=1)
    all_room = ~(room.sum(dim=1) > beta)
    a = beta / s
    divide = ~(a.abs() <= FLOAT_MAX) & ~all_room
    a = torch.where(divide, beta, a)
    u = torch.where(divide[:, None], q / s[:, None], q)
    newton = todo & ~all_room
    predicted = torch.zeros_like(todo)
    for _ in range(EXACT_PASSES):
        if not bool(newton.any()):
            break
        gap = beta - _f(a, u, room)
        slope = torch.where(a[:, None] * u < room, u, 0.0).sum(dim=1)
        step = a + gap / slope
        move = newton & (gap > EXACT_TOLERANCE * beta) & (slope > 0) & (step > a) & (step <= FLOAT_MAX)
        a = torch.where(move, step, a)
        predicted = predicted | (move & ~(gap > EXACT_PREDICT * beta))
        newton = move & (gap > EXACT_PREDICT * beta)
    step = torch.where(divide[:, None], a[:, None] * (p / s[:, None]), a[:, None] * p)
    step = torch.where(all_room[:, None], torch.sign(p) * FLOAT_MAX, step)
    return step, _f(a, u, room), predicted


def _f(a: torch.Tensor, u: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """The exact rule's f(a) = sum min(a u, room) per sample."""
    return torch.minimum(a[:, None] * u, room).sum(dim=1)


def tanh_image(w: torch.Tensor) -> torch.Tensor:
    """CW's image of a tanh-space variable, X' = (tanh(w) + 1) / 2, computed as
    sigmoid(2 w) = 1 / (1 + exp(-2 w)), which does not cancel where tanh(w) is near -1."""
    return torch.sigmoid(2 * w)


def adam_tanh_step_(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                    grad: torch.Tensor, x0: torch.Tensor, c: torch.Tensor, step: torch.Tensor, *,
                    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                    active: torch.Tensor | None = None) -> torch.Tensor:
    """Carlini-Wagner's Adam step in tanh space, in place (see advfast.ops.adam_tanh_step_):
    dL/dw = (2 (x - x0) - c * grad) (1 - tanh(w)^2) / 2, torch.optim.Adam's update with each
    sample's step count, x = (tanh(w) + 1) / 2.  Returns STEP_STATS [B, 5].

    The slope is 2 / (e + 2 + 1 / e) with e = exp(-2 w) and X' is sigmoid(2 w) = 1 / (1 + e),
    the kernels' forms (csrc/advfast_math.h): tanh's cancel in float32 for |w| > 8.7."""
    batch = w.shape[0]
    if w.numel() == 0:
        return w.new_zeros((batch, len(STEP_STATS)))
    shape = (batch,) + (1,) * (w.dim() - 1)
    g = grad.float()
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    e = torch.exp(-2 * w)
    gw = (2 * (x - x0) - c.view(shape) * g) * (2 / (e + 2 + 1 / e))
    steps = step.double()
    step_size = (lr / (1 - beta1 ** steps)).float().view(shape)
    bc2_sqrt = (1 - beta2 ** steps).sqrt().float().view(shape)
    new_m = m + (1 - beta1) * (gw - m)
    new_v = v * beta2 + (1 - beta2) * gw * gw
    new_w = w - step_size * (new_m / (new_v.sqrt() / bc2_sqrt + eps))
    new_x = tanh_image(new_w)
    old_x = x.clone()
    keep = (torch.ones(batch, dtype=torch.bool, device=w.device) if active is None
            else active).view(shape)
    for old, new in ((w, new_w), (m, new_m), (v, new_v), (x, new_x)):
        old.copy_(torch.where(keep, new, old))
    delta = (x - x0).reshape(batch, -1)
    p_l1 = torch.where(keep.view(-1), gw.abs().reshape(batch, -1).sum(1), torch.zeros(batch, device=w.device))
    step_l1 = torch.where(keep.view(-1), (new_x - old_x).abs().reshape(batch, -1).sum(1),
                          torch.zeros(batch, device=w.device))
    return torch.stack([p_l1, delta.abs().sum(1), delta.square().sum(1).sqrt(),
                        delta.abs().amax(1), step_l1], dim=1)


# The engine's bookkeeping (csrc/observe.h): its stop rules and the failure code of a row whose
# logits are not finite.
STOP_RULES: tuple[str, ...] = ("never", "flip", "confidence")
NONFINITE_LOGITS = 1


def _check_cells(trajectory: torch.Tensor, age: torch.Tensor, key: torch.Tensor) -> None:
    # indexing would wrap a negative age or key around, where the kernels refuse it
    outside = (age < 0) | (age >= trajectory.shape[0]) | (key < 0) | (key >= trajectory.shape[1])
    if bool(outside.any()):
        row = int(outside.nonzero()[0, 0])
        raise IndexError(f"row {row} writes trajectory[{int(age[row])}, {int(key[row])}], "
                         f"outside [{trajectory.shape[0]}, {trajectory.shape[1]}]")


def observe_(head: torch.Tensor, norms: torch.Tensor, age: torch.Tensor, paused: torch.Tensor,
             first_flip: torch.Tensor, flip_norms: torch.Tensor, failure: torch.Tensor,
             done: torch.Tensor, trajectory: torch.Tensor | None, key: torch.Tensor | None,
             columns: list[int], iterations: int, stop: str, controlled: bool) -> torch.Tensor:
    """Reference of ``torch.ops.advfast.observe_`` (see :func:`advfast.ops.observe_`)."""
    col = {name: i for i, name in enumerate(HEAD_STATS)}
    hit = head[:, col["hit"]] > 0.5
    finite = ~(head[:, col["finite"]] < 0.5)
    if trajectory is not None:
        _check_cells(trajectory, age, key)
    failure.copy_(torch.where(~finite & (failure == 0), NONFINITE_LOGITS, failure))
    newly = hit & finite & (first_flip < 0)
    first_flip.copy_(torch.where(newly, age, first_flip))
    flip_norms.copy_(torch.where(newly[:, None], norms, flip_norms))
    if controlled:
        meets = {"flip": hit, "confidence": head[:, col["subspace"]] == 3}.get(
            stop, torch.zeros_like(hit))
        done |= (failure > 0) | (age >= iterations) | meets
        active = ~(done | paused)
    else:
        active = failure == 0
    if trajectory is not None and columns:
        trajectory[age, key, :len(columns)] = head[:, list(columns)]
    return active


def advance_(stats: torch.Tensor, active: torch.Tensor, age: torch.Tensor, norms: torch.Tensor,
             trajectory: torch.Tensor | None, key: torch.Tensor | None,
             columns: list[int]) -> None:
    """Reference of ``torch.ops.advfast.advance_`` (see :func:`advfast.ops.advance_`)."""
    if trajectory is not None:
        _check_cells(trajectory, age, key)
    norms.copy_(stats[:, STEP_STATS.index("delta_l1"):STEP_STATS.index("delta_linf") + 1])
    if trajectory is not None and columns:
        width = trajectory.shape[2]
        trajectory[age, key, width - len(columns):] = torch.where(
            active[:, None], stats[:, list(columns)], float("nan"))
    age += active.long()


def cw_observe_(head: torch.Tensor, norms: torch.Tensor, constant: torch.Tensor,
                active: torch.Tensor, inner_age: torch.Tensor,
                previous_loss: torch.Tensor, best_l2: torch.Tensor, best_constant: torch.Tensor,
                succeeded: torch.Tensor, paused: torch.Tensor, kappa: float, steps: int,
                check_every: int, abort_early: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``torch.ops.advfast.cw_observe_`` (see :func:`advfast.ops.cw_observe_`)."""
    live = active
    margin = head[:, HEAD_STATS.index("margin")]
    l2sq = norms[:, 1].square()
    loss = l2sq + constant * torch.clamp(kappa - margin, min=0)
    check = live & (inner_age % check_every == 0) & abort_early
    stalled = check & (loss > previous_loss * 0.9999)
    previous_loss.copy_(torch.where(check, loss, previous_loss))
    success = live & ~stalled & (margin > kappa)
    better = success & (l2sq < best_l2)
    best_l2.copy_(torch.where(better, l2sq, best_l2))
    best_constant.copy_(torch.where(better, constant, best_constant))
    succeeded |= success
    ended = live & (stalled | (inner_age + 1 >= steps))
    paused |= ended
    stepping = live & ~ended
    inner_age += stepping.long()
    return stepping, better
