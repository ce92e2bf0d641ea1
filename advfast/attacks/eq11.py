"""The paper's scheme (Section V, Eqs. 11-16) as an attack, :class:`Eq11`.

    X_{n+1} = clip_[0,1](X_n + a_n * P_n)                                   (Eq. 11)

P_n comes from the CE gradient (Eq. 12), its sign (IFGS, Eq. 13), the target logit (Eq. 14)
or the Carlini-Wagner M-logit margin with kappa (Eqs. 15-16); a_n = alpha ("equal multiplier")
or beta / sum|P_n| per sample ("equal perturbation").

Sign convention: the attack *maximises* the target's log-probability (it descends the target's
cross-entropy, as IFGS's Eq. 2 does); Eq. 1's L-BFGS minimises the same CE plus a distance.
"""

from __future__ import annotations

import copy
import math

from torch import nn

from advfast import ops
from advfast.attacks.base import BaseAttack, choice, positive
from advfast.engine.control import STOPS, StopRule
from advfast.engine.core import Control, Head, Optimizer
from advfast.engine.optim import PaperStep
from advfast.errors import InvalidValue

STEPS = ("equal-multiplier", "equal-perturbation")
# The paper's step sizes, for ImageNet-sized inputs.
PAPER_ALPHA, PAPER_BETA = 5e-4, 5.0


def _step_size(step: str, alpha: float | None,
               beta: float | None) -> tuple[float | None, float | None]:
    """(alpha, beta) of the chosen rule, the other None; the unused one given is refused."""
    if step == "equal-multiplier":
        if beta is not None:
            raise InvalidValue("beta is the equal-perturbation step; with step="
                               "'equal-multiplier' give alpha")
        return positive("alpha", PAPER_ALPHA if alpha is None else alpha), None
    if alpha is not None:
        raise InvalidValue("alpha is the equal-multiplier step; with step="
                           "'equal-perturbation' give beta")
    return None, positive("beta", PAPER_BETA if beta is None else beta)


class Eq11(BaseAttack):
    """The paper's scheme (Eq. 11): a targeted attack on ``model`` (images in [0, 1] ->
    logits) with one of the four perturbation sources under one of the two step rules.

    Args:
        loss: "ce" (Eq. 12), "ce-sign" (IFGS, Eq. 13), "logit" (Eq. 14), "m-logit" (CW, Eq. 15).
        step: "equal-multiplier" (a_n = alpha) or "equal-perturbation" (a_n = beta / sum|P_n|).
        beta: the equal-perturbation L1 per step (default 5, the paper's on ImageNet).
        alpha: the equal-multiplier step (default 5e-4, the paper's on ImageNet).  Give only
            the one of the chosen rule: the other is refused, since it would do nothing.
        iterations: steps to run (paper: 250).
        kappa, kappa_mode: the M-logit margin (paper: 20) and what happens beyond it, see
            :func:`advfast.ops.loss_head`.
        eps: optional Linf radius around the clean image (IFGS's Clip_{X,eps}, Eq. 2).
        stop: "never" (all iterations, as the paper's trajectories), "flip" (a sample stops once
            predicted as the target) or "confidence" (once in D3).
        threshold: the D1/D2/D3 confidence threshold (Definition IV.1, 0.9).
        record: keep the per-iteration trajectory (default True here).
        random_start: start from a uniform draw in the eps ball (with eps: PGD).
        exact_l1: equal perturbation only: each step adds exactly beta in L1 wherever the box
            (and the eps ball) leave that much room, instead of the paper's rule, whose clip
            loses the part of the step that points out of the box (see
            :func:`advfast.ops.perturb_step_`); step_l1 in the trajectory is what each step added.
        ce_seed: CE's seed at the target, "exact" (the other classes' probabilities summed: no
            cancellation where p_c rounds to 1) or "eager" (1 - p_c in float32, as eager
            PyTorch); see :func:`advfast.ops.loss_head`.
        amp, channels_last, compact_every, time_phases, compile, pack_weights: see
            :class:`BaseAttack`.

    With stop="never" every sample runs all iterations and the loop never synchronises with the
    host; with a stop rule, finished samples are masked at once and leave the batch every
    ``compact_every`` iterations.
    """

    def __init__(self, model: nn.Module, loss: str = "ce", step: str = "equal-perturbation",
                 beta: float | None = None, alpha: float | None = None, iterations: int = 250,
                 kappa: float = 20.0, kappa_mode: str = "clamp", eps: float | None = None,
                 stop: str = "never", threshold: float = 0.9, record: bool = True,
                 amp: str | None = None, channels_last: bool = False,
                 compact_every: int | None = None,
                 time_phases: bool = True, random_start: bool = False,
                 compile: str | None = None, exact_l1: bool = False,
                 ce_seed: str = "exact", pack_weights: bool = False) -> None:
        super().__init__(model, record=record, amp=amp, channels_last=channels_last,
                         compact_every=compact_every, time_phases=time_phases, compile=compile,
                         pack_weights=pack_weights)
        choice("loss", loss, ops.LOSSES)
        choice("kappa_mode", kappa_mode, ops.KAPPA_MODES)
        choice("step", step, STEPS)
        choice("stop", stop, STOPS)
        choice("ce_seed", ce_seed, ops.CE_SEEDS)
        if exact_l1 and step != "equal-perturbation":
            raise InvalidValue("exact_l1 is for step='equal-perturbation' (the beta rule)")
        alpha, beta = _step_size(step, alpha, beta)
        if not (isinstance(kappa, (int, float)) and math.isfinite(kappa)):
            raise InvalidValue(f"kappa must be finite, got {kappa!r}")
        if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps)
                                    and eps >= 0):
            raise InvalidValue(f"eps must be a non-negative number, got {eps!r}")
        if not (isinstance(iterations, int) and iterations >= 0):
            raise InvalidValue(f"iterations must be a non-negative integer, got {iterations!r}")
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
            raise InvalidValue(f"threshold must lie in (0, 1], got {threshold!r}")
        self.loss, self.step, self.stop = loss, step, stop
        self.alpha, self.beta = alpha, beta
        self.iterations, self.kappa, self.kappa_mode = iterations, float(kappa), kappa_mode
        self.eps = None if eps is None else float(eps)
        self.threshold, self.random_start = float(threshold), random_start
        self.exact_l1, self.ce_seed = bool(exact_l1), ce_seed
        self.horizon, self.fixed = iterations, stop == "never" or iterations == 0
        self.parts(deferred=False)  # validates the combination (random_start needs eps)

    def shortened(self, iterations: int) -> Eq11:
        """The same attack with fewer iterations, sharing this one's compiled graphs (for a
        warm-up that also compiles)."""
        short = copy.copy(self)
        short.iterations = short.horizon = iterations
        return short

    def parts(self, deferred: bool) -> tuple[Head, Optimizer, Control]:
        return (Head(self.loss, self.kappa, self.kappa_mode, self.threshold, self.ce_seed),
                PaperStep(self.loss == "ce-sign", alpha=self.alpha, beta=self.beta,
                          eps=self.eps, random_start=self.random_start,
                          exact_l1=self.exact_l1),
                StopRule(self.iterations, self.stop, deferred))
