"""Box-constrained L-BFGS (Szegedy et al.; the paper's Eq. 1) on the engine: a projected L-BFGS
run per sample on the device and a per-sample bisection on b."""

from __future__ import annotations

import torch
from torch import nn

from advfast.attacks.base import AttackResult, BaseAttack, count, positive
from advfast.engine.control import BisectionSearch, SingleRun
from advfast.engine.core import Control, Head, Optimizer
from advfast.engine.optim import ProjectedLBFGS


class LBFGS(BaseAttack):
    """Box-constrained L-BFGS (Szegedy et al., Eq. 1): minimise b ||X' - X||^2 + CE(g(X'), t)
    over X' in [0, 1]^d by a projected L-BFGS run per sample on the device
    (:class:`advfast.engine.optim.ProjectedLBFGS`: two-loop recursion over each sample's own history,
    a per-sample backtracking line search, L-BFGS-B's free and fixed variables at the bounds),
    with a bisection on b per sample for the largest b whose minimiser is still predicted as the
    target (:class:`advfast.engine.control.BisectionSearch`).

    Args:
        b: the initial constant (1e-2).
        steps: L-BFGS iterations per constant (100).
        history: (s, y) pairs kept per sample (10).
        binary_search_steps: constants tried per sample (10).
        record, amp, channels_last, compact_every, time_phases, pack_weights: see
            :class:`BaseAttack`.

    Samples with no success return their clean image.  :meth:`minimize` solves Eq. 1 for the
    given b alone and returns where each run ends, successful or not.
    """

    searches = True
    max_backtracks = 20

    def __init__(self, model: nn.Module, b: float = 1e-2, steps: int = 100, history: int = 10,
                 binary_search_steps: int = 10, **engine) -> None:
        super().__init__(model, **engine)
        self.b = positive("b", b)
        self.steps = count("steps", steps)
        self.history = count("history", history)
        self.binary_search_steps = count("binary_search_steps", binary_search_steps)
        self.horizon = self.binary_search_steps * (self.steps * (self.max_backtracks + 1)
                                                   + self.compact_every)

    def _optimizer(self) -> ProjectedLBFGS:
        return ProjectedLBFGS(self.steps, self.history, max_backtracks=self.max_backtracks)

    def parts(self, deferred: bool) -> tuple[Head, Optimizer, Control]:
        return Head("ce"), self._optimizer(), BisectionSearch(self.b, self.binary_search_steps)

    def minimize(self, images: torch.Tensor, target: torch.Tensor,
                 source: torch.Tensor | None = None) -> AttackResult:
        """One L-BFGS run per sample with b fixed: ``adversarial`` is where each run ends
        (the minimiser of Eq. 1), successful or not."""
        return self._run(images, target, source, (Head("ce"), self._optimizer(),
                                                  SingleRun(self.b)))
