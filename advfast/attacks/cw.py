"""Carlini and Wagner's L2 attack (the paper's Eqs. 3-4) on the engine: Adam in tanh space and
a per-sample search over c, each sample restarting in place while the others go on."""

from __future__ import annotations

import math

from torch import nn

from advfast.attacks.base import BaseAttack, count, positive
from advfast.engine.control import CWSearch
from advfast.engine.core import Control, Head, Optimizer
from advfast.engine.optim import AdamTanh
from advfast.errors import InvalidValue


class CarliniWagnerL2(BaseAttack):
    """Carlini and Wagner's L2 attack (Eqs. 3-4), the original algorithm, per sample:
    minimise ||X' - X||^2 + c max(max_{i != t} g_i - g_t, -kappa) over w with
    X' = (tanh(w) + 1) / 2 by Adam (one fused op, :class:`advfast.engine.optim.AdamTanh`); keep the
    smallest-L2 X' whose margin exceeds kappa; search c per sample (x10 until the first success,
    then bisection; :class:`advfast.engine.control.CWSearch`); abort a run early when its loss stops
    improving.  The margin and its kappa clamp come from ``ops.loss_head``'s M-logit head.

    Args:
        c: the initial constant (1e-3).
        kappa: the confidence margin (0).
        steps: Adam steps per constant (1000).
        lr: Adam's learning rate (1e-2).
        binary_search_steps: constants tried per sample (9).
        abort_early: end a run when its loss has not improved over steps // 10 iterations.
        warm_start: each run of the search starts where the sample's last run ended (Adam's
            moments reset) instead of at the clean image; a deviation from the original, off
            by default (False), measured in docs/benchmarks.md ("CW-L2 with warm start").
        record, amp, channels_last, compact_every, time_phases, pack_weights: see
            :class:`BaseAttack`.

    Samples with no success return their clean image (``first_flip``, ``failure`` and
    ``constant`` tell what happened).
    """

    searches = True

    def __init__(self, model: nn.Module, c: float = 1e-3, kappa: float = 0.0, steps: int = 1000,
                 lr: float = 1e-2, binary_search_steps: int = 9, abort_early: bool = True,
                 warm_start: bool = False, **engine) -> None:
        super().__init__(model, **engine)
        self.c, self.lr = positive("c", c), positive("lr", lr)
        if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa >= 0):
            raise InvalidValue(f"kappa must be a non-negative number, got {kappa!r}")
        self.kappa = float(kappa)
        self.steps = count("steps", steps)
        self.binary_search_steps = count("binary_search_steps", binary_search_steps)
        self.abort_early, self.warm_start = bool(abort_early), bool(warm_start)
        self.horizon = self.binary_search_steps * (self.steps + self.compact_every)

    def parts(self, deferred: bool) -> tuple[Head, Optimizer, Control]:
        return (Head("m-logit", self.kappa, "clamp"),
                AdamTanh(self.lr, warm_start=self.warm_start),
                CWSearch(self.c, self.kappa, self.steps, self.binary_search_steps,
                         self.abort_early))
