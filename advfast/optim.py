"""Optimisers of the attack engine: per-sample update rules that own the iterate ``x``.

Each implements :class:`advfast.engine.Optimizer`: ``begin`` puts new rows at their starting
point (and adds any per-sample state as row fields, which the engine gathers and scatters with
the rest of the row), ``step`` updates ``x`` in place from the gradient of the head's objective,
``restart`` puts rows back at the start for an outer search.
"""

from __future__ import annotations

import torch

from . import ops
from .engine import Rows


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
        return ops.perturb_step_(rows.x, grad, rows.x0, sign=self.sign, alpha=self.alpha,
                                 beta=self.beta, lo=self.lo, hi=self.hi, eps=self.eps,
                                 active=active)

    def restart(self, rows: Rows, mask: torch.Tensor) -> None:
        with torch.no_grad():
            rows.x.copy_(torch.where(mask.view(-1, *[1] * (rows.x.dim() - 1)),
                                     self._start(rows.x0), rows.x))
