"""Optimisers of the attack engine: per-sample update rules that own the iterate ``x``.

Each implements :class:`advfast.engine.Optimizer`: ``begin`` puts new rows at their starting
point (and adds any per-sample state as row fields, which the engine gathers and scatters with
the rest of the row), ``step`` updates ``x`` in place from the gradient of the head's objective,
``restart`` puts rows back at the start for an outer search.
"""

from __future__ import annotations

import math

import torch

from . import ops
from .engine import COLUMN, Rows, norms_of


class PaperStep:
    """The paper's scheme, X_{n+1} = clip_[lo,hi](X_n + a_n * P_n) (Eq. 11), with the optional
    Linf ball of IFGS (Eq. 2), in one fused ``ops.perturb_step_``.

    Args:
        sign: P_n = sign(grad) (CE-sign / IFGS, Eq. 13) instead of the gradient itself.
        alpha: equal multiplier, a_n = alpha.
        beta: equal perturbation, a_n = beta / sum|P_n| per sample (exactly one of the two).
        eps: Linf radius around the clean image, or None.
        random_start: start from a uniform draw in the eps ball (PGD) instead of the clean
            image; it uses torch's global random generator, as torchattacks' PGD does.
        lo, hi: the image box (default [0, 1]).
    """

    def __init__(self, sign: bool, alpha: float | None = None, beta: float | None = None,
                 eps: float | None = None, random_start: bool = False, lo: float = 0.0,
                 hi: float = 1.0) -> None:
        if random_start and eps is None:
            raise ValueError("random_start needs eps (the ball to draw the start from)")
        self.sign, self.alpha, self.beta, self.eps = sign, alpha, beta, eps
        self.random_start, self.lo, self.hi = random_start, lo, hi

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
                                          self.beta, self.lo, self.hi, self.eps, active)

    def restart(self, rows: Rows, mask: torch.Tensor) -> None:
        with torch.no_grad():
            rows.x.copy_(torch.where(per_sample(mask, rows.x), self._start(rows.x0), rows.x))
            rows.norms = torch.where(mask[:, None], norms_of(rows.x - rows.x0), rows.norms)

    def candidate(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        return rows.x.detach(), rows.hit


def per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] mask shaped to broadcast over ``like`` [B, ...]."""
    return mask.view(-1, *[1] * (like.dim() - 1))



class AdamTanh:
    """Carlini-Wagner L2's optimiser (Eqs. 3-4): Adam on w, with the image X' = (tanh(w) + 1)
    / 2 always inside the box, minimising ||X' - X0||^2 - c * O (O the head's clamped M-logit
    margin, c = ``rows.constant`` per sample), in one fused ``ops.adam_tanh_step_``.  Each
    sample has its own Adam moments and step count; a restart resets them.

    Args:
        lr: Adam's learning rate (CW: 1e-2); beta1, beta2, eps: torch.optim.Adam's defaults.
    """

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps

    @staticmethod
    def start(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, X') at the start: w = atanh((2 X0 - 1) (1 - 1e-6)), CW's way to keep it finite."""
        w = torch.atanh((2 * x0 - 1) * (1 - 1e-6))
        return w, (torch.tanh(w) + 1) * 0.5

    def begin(self, rows: Rows) -> None:
        w, x = self.start(rows.x0)
        rows.cw_w, rows.cw_m, rows.cw_v = w, torch.zeros_like(w), torch.zeros_like(w)
        rows.cw_t = torch.zeros(len(rows), dtype=torch.int64, device=w.device)
        with torch.no_grad():
            rows.x.copy_(x)
        rows.norms = norms_of(x - rows.x0)

    def step(self, rows: Rows, grad: torch.Tensor, head: torch.Tensor,
             active: torch.Tensor | None) -> torch.Tensor:
        rows.cw_t = rows.cw_t + (1 if active is None else active.long())
        return ops.adam_tanh_step_unchecked(rows.cw_w, rows.cw_m, rows.cw_v, rows.x, grad,
                                            rows.x0, rows.constant, rows.cw_t, self.lr,
                                            self.beta1, self.beta2, self.eps, active)

    def restart(self, rows: Rows, mask: torch.Tensor) -> None:
        w, x = self.start(rows.x0)
        where = per_sample(mask, w)
        rows.cw_w = torch.where(where, w, rows.cw_w)
        rows.cw_m = torch.where(where, 0.0, rows.cw_m)
        rows.cw_v = torch.where(where, 0.0, rows.cw_v)
        rows.cw_t = torch.where(mask, 0, rows.cw_t)
        with torch.no_grad():
            rows.x.copy_(torch.where(where, x, rows.x))
        rows.norms = torch.where(mask[:, None], norms_of(x - rows.x0), rows.norms)

    def candidate(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        return rows.x.detach(), rows.hit


class ProjectedLBFGS:
    """Box-constrained L-BFGS (Eq. 1), one run per sample on the device: minimises
    f(X') = b ||X' - X0||^2 + CE(g(X'), target) over X' in [lo, hi]^d, b = ``rows.constant``.

    Every engine iteration evaluates f and its gradient at one point per sample; a per-sample
    state machine turns those evaluations into L-BFGS: the first evaluation of a run is
    accepted; then each trial point X_c + a d (projected onto the box) is accepted if it
    decreases f enough (Armijo, c1 = 1e-4) or else a is halved.  Accepted points add (s, y) to
    the sample's own history of ``history`` pairs (when s.y > 0), and the next direction comes
    from the two-loop recursion.  The box is handled as L-BFGS-B does: variables at a bound
    whose gradient points outwards are fixed (zero in the direction), the others free.

    A run ends (``rows.paused``) after ``steps`` accepted iterations, when the projected
    gradient's largest element is below ``pgtol``, when f's relative decrease is below
    ``ftol``, or when the line search fails ``max_backtracks`` times in a row.
    """

    def __init__(self, steps: int = 100, history: int = 10, pgtol: float = 1e-5,
                 ftol: float = 1e-7, max_backtracks: int = 20, c1: float = 1e-4,
                 lo: float = 0.0, hi: float = 1.0) -> None:
        self.steps, self.history, self.pgtol, self.ftol = steps, history, pgtol, ftol
        self.max_backtracks, self.c1, self.lo, self.hi = max_backtracks, c1, lo, hi

    def begin(self, rows: Rows) -> None:
        b, n = len(rows), math.prod(rows.x0.shape[1:])
        device = rows.x0.device
        zeros = torch.zeros(b, device=device)
        rows.lb_xc = rows.x0.detach().flatten(1).clone()
        rows.lb_gc = torch.zeros(b, n, device=device)
        rows.lb_d = torch.zeros(b, n, device=device)
        rows.lb_S = torch.zeros(b, self.history, n, device=device)
        rows.lb_Y = torch.zeros(b, self.history, n, device=device)
        rows.lb_fc, rows.lb_alpha = zeros.clone(), zeros.clone()
        counts = torch.zeros(b, dtype=torch.int64, device=device)
        rows.lb_count, rows.lb_iters, rows.lb_backtracks = counts, counts.clone(), counts.clone()
        rows.lb_first = torch.ones(b, dtype=torch.bool, device=device)
        rows.lb_hit = torch.zeros(b, dtype=torch.bool, device=device)
        with torch.no_grad():
            rows.x.copy_(rows.x0)
        rows.norms = torch.zeros_like(rows.norms)

    def step(self, rows: Rows, grad: torch.Tensor, head: torch.Tensor,
             active: torch.Tensor | None) -> torch.Tensor:
        active = torch.ones_like(rows.done) if active is None else active
        x = rows.x.detach().flatten(1)
        delta = x - rows.x0.flatten(1)
        b = rows.constant[:, None]
        f = rows.constant * delta.square().sum(1) - head[:, COLUMN["target_logprob"]]
        g = grad.flatten(1).float()
        g = 2 * b * delta - torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        first = rows.lb_first
        armijo = f <= rows.lb_fc + self.c1 * (rows.lb_gc * (x - rows.lb_xc)).sum(1)
        accept = active & (first | armijo)
        reject = active & ~accept
        self._remember(rows, accept & ~first, x - rows.lb_xc, g - rows.lb_gc)
        decrease = (rows.lb_fc - f) / torch.maximum(torch.maximum(rows.lb_fc.abs(), f.abs()),
                                                    torch.ones_like(f))
        flat_done = accept & ~first & (decrease <= self.ftol)
        keep = accept[:, None]
        rows.lb_xc = torch.where(keep, x, rows.lb_xc)
        rows.lb_gc = torch.where(keep, g, rows.lb_gc)
        rows.lb_fc = torch.where(accept, f, rows.lb_fc)
        rows.lb_hit = torch.where(accept, rows.hit, rows.lb_hit)
        rows.lb_iters = rows.lb_iters + (accept & ~first).long()
        free = self._free(rows.lb_xc, rows.lb_gc)
        projected = (rows.lb_xc - rows.lb_gc).clamp(self.lo, self.hi) - rows.lb_xc
        small_gradient = accept & (projected.abs().amax(1) <= self.pgtol)
        direction = self._direction(rows, free)
        first_step = torch.clamp(1.0 / direction.norm(dim=1).clamp_min(1e-30), max=1.0)
        rows.lb_d = torch.where(keep, direction, rows.lb_d)
        rows.lb_alpha = torch.where(accept, torch.where(rows.lb_iters == 0, first_step, 1.0),
                                    torch.where(reject, rows.lb_alpha * 0.5, rows.lb_alpha))
        rows.lb_backtracks = torch.where(accept, 0, rows.lb_backtracks + reject.long())
        rows.lb_first = first & ~active
        ended = active & (flat_done | small_gradient | (rows.lb_iters >= self.steps)
                          | (rows.lb_backtracks > self.max_backtracks))
        rows.paused = rows.paused | ended
        trial = (rows.lb_xc + rows.lb_alpha[:, None] * rows.lb_d).clamp(self.lo, self.hi)
        new = torch.where((active & ~ended)[:, None], trial,
                          torch.where(ended[:, None], rows.lb_xc, x))
        with torch.no_grad():
            rows.x.copy_(new.view_as(rows.x))
        stats = norms_of(new - rows.x0.flatten(1))
        return torch.cat([torch.where(active, g.abs().sum(1), 0.0)[:, None], stats], dim=1)

    def _free(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Variables not held at a bound by a gradient pointing outwards (L-BFGS-B's free set)."""
        return ~(((x <= self.lo) & (g > 0)) | ((x >= self.hi) & (g < 0)))

    def _remember(self, rows: Rows, push: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        """Adds (s, y) to each pushing row's history when the curvature s.y is positive."""
        sy = (s * y).sum(1)
        push = push & (sy > 1e-10 * (y * y).sum(1))
        index = torch.arange(len(push), device=push.device)
        slot = rows.lb_count % self.history
        keep = push[:, None]
        rows.lb_S[index, slot] = torch.where(keep, s, rows.lb_S[index, slot])
        rows.lb_Y[index, slot] = torch.where(keep, y, rows.lb_Y[index, slot])
        rows.lb_count = rows.lb_count + push.long()

    def _direction(self, rows: Rows, free: torch.Tensor) -> torch.Tensor:
        """-H g on the free variables by the two-loop recursion over each row's own history
        (newest pair first); steepest descent where that is not a descent direction."""
        index = torch.arange(len(free), device=free.device)
        g = rows.lb_gc * free
        q = g.clone()
        kept = torch.clamp(rows.lb_count, max=self.history)
        pairs, alphas = [], []
        for j in range(self.history):
            slot = (rows.lb_count - 1 - j) % self.history
            s, y = rows.lb_S[index, slot] * free, rows.lb_Y[index, slot] * free
            # the pair's curvature on the free variables; a pair without positive curvature
            # there is left out, so that H stays positive definite
            sy = (s * y).sum(1)
            rho = torch.where((j < kept) & (sy > 0), 1.0 / sy.where(sy > 0, 1.0), 0.0)
            a = rho * (s * q).sum(1)
            q = q - a[:, None] * y
            pairs.append((s, y, rho))
            alphas.append(a)
        s_new, y_new, rho_new = pairs[0]
        yy = (y_new * y_new).sum(1)
        gamma = torch.where((rho_new > 0) & (yy > 0), (s_new * y_new).sum(1) / yy.clamp_min(1e-30),
                            torch.ones_like(yy))
        r = gamma[:, None] * q
        for (s, y, rho), a in zip(reversed(pairs), reversed(alphas)):
            beta = rho * (y * r).sum(1)
            r = r + s * (a - beta)[:, None]
        d = -r * free
        descent = (d * g).sum(1) < 0
        return torch.where(descent[:, None], d, -g)

    def restart(self, rows: Rows, mask: torch.Tensor) -> None:
        keep = mask[:, None]
        rows.lb_xc = torch.where(keep, rows.x0.flatten(1), rows.lb_xc)
        rows.lb_count = torch.where(mask, 0, rows.lb_count)
        rows.lb_iters = torch.where(mask, 0, rows.lb_iters)
        rows.lb_backtracks = torch.where(mask, 0, rows.lb_backtracks)
        rows.lb_first = rows.lb_first | mask
        with torch.no_grad():
            rows.x.copy_(torch.where(per_sample(mask, rows.x), rows.x0, rows.x))
        rows.norms = torch.where(keep, 0.0, rows.norms)

    def candidate(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The point each run settled on (its last accepted point) and whether it was
        predicted as the target there."""
        return rows.lb_xc.view_as(rows.x0), rows.lb_hit
