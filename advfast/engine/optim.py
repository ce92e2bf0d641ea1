"""Optimisers of the attack engine: per-sample update rules that own the iterate ``x``.

Each implements :class:`advfast.engine.core.Optimizer`: ``begin`` puts new rows at their
starting point and gives them the optimiser's own typed record (``rows.optim``, gathered with
the rest of the row), ``step`` updates ``x`` in place from the gradient of the head's
objective, ``converged`` reports the rows whose run the optimiser's own criteria ended (the
control decides what follows), ``restart`` puts rows back at the start for an outer search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from advfast import ops
from advfast.engine.core import COLUMN, norms_of
from advfast.engine.rows import Rows, State, per_sample
from advfast.errors import InvalidValue


class PaperStep:
    """The paper's scheme, X_{n+1} = clip_[lo,hi](X_n + a_n * P_n) (Eq. 11), with the optional
    Linf ball of IFGS (Eq. 2), in one fused ``ops.perturb_step_``.

    Args:
        sign: P_n = sign(grad) (CE-sign / IFGS, Eq. 13) instead of the gradient itself.
        alpha: equal multiplier, a_n = alpha.
        beta: equal perturbation, a_n = beta / sum|P_n| per sample (exactly one of the two).
        eps: Linf radius around the clean image, or None.
        exact_l1: (beta only) each step adds exactly beta in L1 where the box and the ball
            leave room (see ``ops.perturb_step_``), instead of the paper's clipped step.
        random_start: start from a uniform draw in the eps ball (PGD) instead of the clean
            image; it uses torch's global random generator, as torchattacks' PGD does.
        lo, hi: the image box (default [0, 1]).
    """

    def __init__(self, sign: bool, alpha: float | None = None, beta: float | None = None,
                 eps: float | None = None, random_start: bool = False, lo: float = 0.0,
                 hi: float = 1.0, exact_l1: bool = False) -> None:
        if random_start and eps is None:
            raise InvalidValue("random_start needs eps (the ball to draw the start from)")
        if exact_l1 and beta is None:
            raise InvalidValue("exact_l1 is for the equal perturbation rule (beta), not alpha")
        self.sign, self.alpha, self.beta, self.eps = sign, alpha, beta, eps
        self.random_start, self.lo, self.hi, self.exact_l1 = random_start, lo, hi, exact_l1

    @property
    def starts_at_x0(self) -> bool:
        return not self.random_start

    def _start(self, x0: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x0.clone()
        noise = torch.empty_like(x0).uniform_(-self.eps, self.eps)
        return (x0 + noise).clamp_(self.lo, self.hi)

    def begin(self, rows: Rows) -> None:
        with torch.no_grad():
            rows.x.copy_(self._start(rows.x0))

    def step(self, rows: Rows, grad: torch.Tensor, head: torch.Tensor,
             active: torch.Tensor | None) -> torch.Tensor:
        return ops.perturb_step_unchecked(rows.x, grad, rows.x0, self.sign, self.alpha,
                                          self.beta, self.lo, self.hi, self.eps, active,
                                          self.exact_l1)

    def converged(self, rows: Rows) -> None:
        return None

    def restart(self, rows: Rows, mask: torch.Tensor) -> None:
        with torch.no_grad():
            rows.x.copy_(torch.where(per_sample(mask, rows.x), self._start(rows.x0), rows.x))
            rows.norms = torch.where(mask[:, None], norms_of(rows.x - rows.x0), rows.norms)


@dataclass(slots=True, eq=False)
class AdamState(State):
    """Per-sample Adam state of :class:`AdamTanh`: w, m, v [B, C, H, W] float32 (the tanh-space
    variable and the moments) and t [B] int64 (the sample's own step count)."""

    w: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    t: torch.Tensor


class AdamTanh:
    """Carlini-Wagner L2's optimiser (Eqs. 3-4): Adam on w, with the image X' = (tanh(w) + 1)
    / 2 always inside the box, minimising ||X' - X0||^2 - c * O (O the head's clamped M-logit
    margin, c = ``rows.constant`` per sample), in one fused ``ops.adam_tanh_step_``.  Each
    sample has its own Adam moments and step count (:class:`AdamState`); a restart resets
    them.

    Args:
        lr: Adam's learning rate (CW: 1e-2); beta1, beta2, eps: torch.optim.Adam's defaults.
        warm_start: a restart keeps w where the sample's run ended (only the moments and the
            step count start again) instead of putting it back at the clean image, as Carlini
            and Wagner's original does (the default, False).  A deviation from the original,
            off by default: each run of the search goes on from the last one's end.
    """

    # X'(w0) lies within float32 rounding of x0, not on it: the prediction there may differ
    starts_at_x0 = False

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, warm_start: bool = False) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.warm_start = warm_start

    @staticmethod
    def start(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, X') at the start: w = atanh((2 X0 - 1) (1 - 1e-6)), CW's way to keep it finite,
        and X' = (tanh(w) + 1) / 2 as the fused step computes it (ops.tanh_image)."""
        w = torch.atanh((2 * x0 - 1) * (1 - 1e-6))
        return w, ops.tanh_image(w)

    def begin(self, rows: Rows) -> None:
        w, x = self.start(rows.x0)
        rows.optim = AdamState(w=w, m=torch.zeros_like(w), v=torch.zeros_like(w),
                               t=torch.zeros(len(rows), dtype=torch.int64, device=w.device))
        with torch.no_grad():
            rows.x.copy_(x)
        rows.norms = norms_of(x - rows.x0)

    def step(self, rows: Rows, grad: torch.Tensor, head: torch.Tensor,
             active: torch.Tensor | None) -> torch.Tensor:
        s = rows.optim
        s.t = s.t + (1 if active is None else active.long())
        return ops.adam_tanh_step_unchecked(s.w, s.m, s.v, rows.x, grad, rows.x0, rows.constant,
                                            s.t, self.lr, self.beta1, self.beta2, self.eps,
                                            active)

    def converged(self, rows: Rows) -> None:
        return None

    def restart(self, rows: Rows, mask: torch.Tensor) -> None:
        s, where = rows.optim, per_sample(mask, rows.optim.w)
        s.m = torch.where(where, 0.0, s.m)
        s.v = torch.where(where, 0.0, s.v)
        s.t = torch.where(mask, 0, s.t)
        if self.warm_start:  # w, x and its norms stay where the run ended
            return
        w, x = self.start(rows.x0)
        s.w = torch.where(where, w, s.w)
        with torch.no_grad():
            rows.x.copy_(torch.where(where, x, rows.x))
        rows.norms = torch.where(mask[:, None], norms_of(x - rows.x0), rows.norms)


@dataclass(slots=True, eq=False)
class LBFGSState(State):
    """Per-sample state of :class:`ProjectedLBFGS` (d = C*H*W, m = history):

    xc, gc: [B, d] the last accepted point and f's gradient there; fc: [B] f there.
    d: [B, d] the search direction from xc; alpha: [B] the trial step along it.
    S, Y: [B, m, d] the (s, y) history, a ring of which ``count`` [B] pairs were pushed.
    iters: [B] accepted iterations of this run; backtracks: [B] rejections in a row.
    first: [B] bool, the next evaluation starts a run (accepted as it is).
    hit: [B] bool, xc was predicted as the target.
    converged: [B] bool, the last step ended the run (what :meth:`ProjectedLBFGS.converged`
        reports).
    """

    xc: torch.Tensor
    gc: torch.Tensor
    fc: torch.Tensor
    d: torch.Tensor
    alpha: torch.Tensor
    S: torch.Tensor
    Y: torch.Tensor
    count: torch.Tensor
    iters: torch.Tensor
    backtracks: torch.Tensor
    first: torch.Tensor
    hit: torch.Tensor
    converged: torch.Tensor


class ProjectedLBFGS:
    """Box-constrained L-BFGS (Eq. 1), one run per sample on the device: minimises
    f(X') = b ||X' - X0||^2 + CE(g(X'), target) over X' in [lo, hi]^d, b = ``rows.constant``.

    Every engine iteration evaluates f and its gradient at one point per sample; a per-sample
    state machine (:class:`LBFGSState`) turns those evaluations into L-BFGS: the first
    evaluation of a run is accepted; then each trial point X_c + a d (projected onto the box)
    is accepted if it decreases f enough (Armijo, c1 = 1e-4) or else a is halved.  Accepted
    points add (s, y) to the sample's own history of ``history`` pairs (when s.y > 0), and the
    next direction comes from the two-loop recursion.  The box is handled as L-BFGS-B does:
    variables at a bound whose gradient points outwards are fixed (zero in the direction), the
    others free.

    A run converges (:meth:`converged`; the control then pauses it) after ``steps`` accepted
    iterations, when the projected gradient's largest element is below ``pgtol``, when f's
    relative decrease is below ``ftol``, or when the line search fails ``max_backtracks`` times
    in a row.
    """

    starts_at_x0 = True

    def __init__(self, steps: int = 100, history: int = 10, pgtol: float = 1e-5,
                 ftol: float = 1e-7, max_backtracks: int = 20, c1: float = 1e-4,
                 lo: float = 0.0, hi: float = 1.0) -> None:
        self.steps, self.history, self.pgtol, self.ftol = steps, history, pgtol, ftol
        self.max_backtracks, self.c1, self.lo, self.hi = max_backtracks, c1, lo, hi

    def begin(self, rows: Rows) -> None:
        b, n = len(rows), math.prod(rows.x0.shape[1:])
        device = rows.x0.device
        zeros = torch.zeros(b, device=device)
        counts = torch.zeros(b, dtype=torch.int64, device=device)
        false = torch.zeros(b, dtype=torch.bool, device=device)
        rows.optim = LBFGSState(
            xc=rows.x0.detach().flatten(1).clone(), gc=torch.zeros(b, n, device=device),
            fc=zeros.clone(), d=torch.zeros(b, n, device=device), alpha=zeros.clone(),
            S=torch.zeros(b, self.history, n, device=device),
            Y=torch.zeros(b, self.history, n, device=device), count=counts,
            iters=counts.clone(), backtracks=counts.clone(), first=~false, hit=false,
            converged=false.clone())
        with torch.no_grad():
            rows.x.copy_(rows.x0)
        rows.norms = torch.zeros_like(rows.norms)

    def step(self, rows: Rows, grad: torch.Tensor, head: torch.Tensor,
             active: torch.Tensor | None) -> torch.Tensor:
        s = rows.optim
        active = torch.ones_like(rows.done) if active is None else active
        x = rows.x.detach().flatten(1)
        f, g = self._objective(rows, x, grad, head)
        accept = active & (s.first | self._armijo(s, x, f))
        reject = active & ~accept
        flat = self._accept(rows, accept, x, f, g)
        small_gradient = accept & (self._projected_gradient(s).abs().amax(1) <= self.pgtol)
        self._next_trial(s, accept, reject)
        s.first = s.first & ~active
        s.converged = active & (flat | small_gradient | (s.iters >= self.steps)
                                | (s.backtracks > self.max_backtracks))
        # a converged run rests at its last accepted point; a live one moves to its trial point
        trial = (s.xc + s.alpha[:, None] * s.d).clamp(self.lo, self.hi)
        new = torch.where((active & ~s.converged)[:, None], trial,
                          torch.where(s.converged[:, None], s.xc, x))
        with torch.no_grad():
            rows.x.copy_(new.view_as(rows.x))
        stats = norms_of(new - rows.x0.flatten(1))
        step_l1 = torch.where(active, (new - x).abs().sum(1), 0.0)  # ops.STEP_STATS' last
        return torch.cat([torch.where(active, g.abs().sum(1), 0.0)[:, None], stats,
                          step_l1[:, None]], dim=1)

    def _objective(self, rows: Rows, x: torch.Tensor, grad: torch.Tensor,
                   head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f [B] and df/dX' [B, d] at x; a non-finite element of the CE gradient counts as 0."""
        delta = x - rows.x0.flatten(1)
        f = rows.constant * delta.square().sum(1) - head[:, COLUMN["target_logprob"]]
        g = grad.flatten(1).float()
        g = 2 * rows.constant[:, None] * delta - torch.where(torch.isfinite(g), g,
                                                              torch.zeros_like(g))
        return f, g

    def _armijo(self, s: LBFGSState, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Sufficient decrease of f at the trial point x from the accepted point."""
        return f <= s.fc + self.c1 * (s.gc * (x - s.xc)).sum(1)

    def _accept(self, rows: Rows, accept: torch.Tensor, x: torch.Tensor, f: torch.Tensor,
                g: torch.Tensor) -> torch.Tensor:
        """Moves the accepted rows' point to x, remembering (s, y); returns the rows whose
        relative decrease of f fell below ftol."""
        s = rows.optim
        later = accept & ~s.first
        self._remember(s, later, x - s.xc, g - s.gc)
        decrease = (s.fc - f) / torch.maximum(torch.maximum(s.fc.abs(), f.abs()),
                                              torch.ones_like(f))
        keep = accept[:, None]
        s.xc = torch.where(keep, x, s.xc)
        s.gc = torch.where(keep, g, s.gc)
        s.fc = torch.where(accept, f, s.fc)
        s.hit = torch.where(accept, rows.hit, s.hit)
        s.iters = s.iters + later.long()
        return later & (decrease <= self.ftol)

    def _projected_gradient(self, s: LBFGSState) -> torch.Tensor:
        return (s.xc - s.gc).clamp(self.lo, self.hi) - s.xc

    def _next_trial(self, s: LBFGSState, accept: torch.Tensor, reject: torch.Tensor) -> None:
        """A new direction and a first step for accepted rows; half the step for rejected
        ones."""
        direction = self._direction(s, self._free(s.xc, s.gc))
        first_step = torch.clamp(1.0 / direction.norm(dim=1).clamp_min(1e-30), max=1.0)
        s.d = torch.where(accept[:, None], direction, s.d)
        s.alpha = torch.where(accept, torch.where(s.iters == 0, first_step, 1.0),
                              torch.where(reject, s.alpha * 0.5, s.alpha))
        s.backtracks = torch.where(accept, 0, s.backtracks + reject.long())

    def converged(self, rows: Rows) -> torch.Tensor:
        return rows.optim.converged

    def _free(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Variables not held at a bound by a gradient pointing outwards (L-BFGS-B's free set)."""
        return ~(((x <= self.lo) & (g > 0)) | ((x >= self.hi) & (g < 0)))

    def _remember(self, s: LBFGSState, push: torch.Tensor, step: torch.Tensor,
                  change: torch.Tensor) -> None:
        """Adds (s, y) to each pushing row's history when the curvature s.y is positive."""
        sy = (step * change).sum(1)
        push = push & (sy > 1e-10 * (change * change).sum(1))
        index = torch.arange(len(push), device=push.device)
        slot = s.count % self.history
        keep = push[:, None]
        s.S[index, slot] = torch.where(keep, step, s.S[index, slot])
        s.Y[index, slot] = torch.where(keep, change, s.Y[index, slot])
        s.count = s.count + push.long()

    def _direction(self, s: LBFGSState, free: torch.Tensor) -> torch.Tensor:
        """-H g on the free variables by the two-loop recursion over each row's own history
        (newest pair first); steepest descent where that is not a descent direction."""
        index = torch.arange(len(free), device=free.device)
        g = s.gc * free
        q = g.clone()
        kept = torch.clamp(s.count, max=self.history)
        pairs, alphas = [], []
        for j in range(self.history):
            slot = (s.count - 1 - j) % self.history
            sj, yj = s.S[index, slot] * free, s.Y[index, slot] * free
            # the pair's curvature on the free variables; a pair without positive curvature
            # there is left out, so that H stays positive definite
            sy = (sj * yj).sum(1)
            rho = torch.where((j < kept) & (sy > 0), 1.0 / sy.where(sy > 0, 1.0), 0.0)
            a = rho * (sj * q).sum(1)
            q = q - a[:, None] * yj
            pairs.append((sj, yj, rho))
            alphas.append(a)
        s_new, y_new, rho_new = pairs[0]
        yy = (y_new * y_new).sum(1)
        gamma = torch.where((rho_new > 0) & (yy > 0), (s_new * y_new).sum(1) / yy.clamp_min(1e-30),
                            torch.ones_like(yy))
        r = gamma[:, None] * q
        for (sj, yj, rho), a in zip(reversed(pairs), reversed(alphas)):
            beta = rho * (yj * r).sum(1)
            r = r + sj * (a - beta)[:, None]
        d = -r * free
        descent = (d * g).sum(1) < 0
        return torch.where(descent[:, None], d, -g)

    def restart(self, rows: Rows, mask: torch.Tensor) -> None:
        s, keep = rows.optim, mask[:, None]
        s.xc = torch.where(keep, rows.x0.flatten(1), s.xc)
        s.count = torch.where(mask, 0, s.count)
        s.iters = torch.where(mask, 0, s.iters)
        s.backtracks = torch.where(mask, 0, s.backtracks)
        s.first = s.first | mask
        s.converged = s.converged & ~mask
        with torch.no_grad():
            rows.x.copy_(torch.where(per_sample(mask, rows.x), rows.x0, rows.x))
        rows.norms = torch.where(keep, 0.0, rows.norms)

    def candidate(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The point each run settled on (its last accepted point) and whether it was
        predicted as the target there."""
        return rows.optim.xc.view_as(rows.x0), rows.optim.hit
