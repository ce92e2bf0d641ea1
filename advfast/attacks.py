"""The paper's three attacks in full (Section III), on the engine: IFGS (Eq. 2), Carlini-Wagner
L2 (Eqs. 3-4) and box-constrained L-BFGS (Eq. 1).

Each is ``attack(images, target) -> AttackResult`` (images in [0, 1], targeted), batched on the
device, with continuous batching across samples and across the restarts of the searches over a
constant: a sample that finishes one constant restarts in place, so the batch stays full, and a
sample that is done leaves it.  ``result.constant`` holds each sample's final constant (CW's c,
L-BFGS's b).
"""

from __future__ import annotations

import math

from torch import nn

from .attack import Attack, EngineAttack, positive
from .control import BisectionSearch, CWSearch, SingleRun
from .engine import Control, Head, Optimizer
from .optim import AdamTanh, ProjectedLBFGS

__all__ = ["IFGS", "CarliniWagnerL2", "LBFGS", "ATTACKS"]


def _count(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class IFGS(Attack):
    """Iterative Fast Gradient Sign (Eq. 2): X_{n+1} = Clip_{X,eps}(X_n + alpha sign(grad of
    log softmax(g)_t)), clipped to [0, 1]; with ``random_start`` it starts from a uniform draw
    in the eps ball (targeted PGD).  The same images as torchattacks' targeted BIM / PGD for
    the same parameters.

    Args:
        eps: Linf radius around the clean image.
        alpha: step per iteration.
        steps: iterations.
        random_start: PGD's random start (torch's global generator).
        stop: "never" (all steps, as BIM), "flip" or "confidence" (see :class:`Attack`).
        record, amp, channels_last, compact_every, time_phases: see :class:`EngineAttack`.
    """

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int,
                 random_start: bool = False, stop: str = "never", **engine) -> None:
        positive("eps", eps)
        super().__init__(model, loss="ce-sign", step="equal-multiplier", alpha=alpha, eps=eps,
                         iterations=_count("steps", steps, 0), stop=stop,
                         random_start=random_start, **{"record": False, **engine})


class CarliniWagnerL2(EngineAttack):
    """Carlini and Wagner's L2 attack (Eqs. 3-4), the original algorithm, per sample:
    minimise ||X' - X||^2 + c max(max_{i != t} g_i - g_t, -kappa) over w with
    X' = (tanh(w) + 1) / 2 by Adam (one fused op, :class:`advfast.optim.AdamTanh`); keep the
    smallest-L2 X' whose margin exceeds kappa; search c per sample (x10 until the first success,
    then bisection; :class:`advfast.control.CWSearch`); abort a run early when its loss stops
    improving.  The margin and its kappa clamp come from ``ops.loss_head``'s M-logit head.

    Args:
        c: the initial constant (1e-3).
        kappa: the confidence margin (0).
        steps: Adam steps per constant (1000).
        lr: Adam's learning rate (1e-2).
        binary_search_steps: constants tried per sample (9).
        abort_early: end a run when its loss has not improved over steps // 10 iterations.
        record, amp, channels_last, compact_every, time_phases: see :class:`EngineAttack`.

    Samples with no success return their clean image (``first_flip``, ``failure`` and
    ``constant`` tell what happened).
    """

    searches = True

    def __init__(self, model: nn.Module, c: float = 1e-3, kappa: float = 0.0, steps: int = 1000,
                 lr: float = 1e-2, binary_search_steps: int = 9, abort_early: bool = True,
                 **engine) -> None:
        super().__init__(model, **engine)
        self.c, self.lr = positive("c", c), positive("lr", lr)
        if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa >= 0):
            raise ValueError(f"kappa must be a non-negative number, got {kappa!r}")
        self.kappa = float(kappa)
        self.steps = _count("steps", steps)
        self.binary_search_steps = _count("binary_search_steps", binary_search_steps)
        self.abort_early = bool(abort_early)
        self.horizon = self.binary_search_steps * (self.steps + self.compact_every)

    def parts(self, deferred: bool) -> tuple[Head, Optimizer, Control]:
        return (Head("m-logit", self.kappa, "clamp"), AdamTanh(self.lr),
                CWSearch(self.c, self.kappa, self.steps, self.binary_search_steps,
                         self.abort_early))


class LBFGS(EngineAttack):
    """Box-constrained L-BFGS (Szegedy et al., Eq. 1): minimise b ||X' - X||^2 + CE(g(X'), t)
    over X' in [0, 1]^d by a projected L-BFGS run per sample on the device
    (:class:`advfast.optim.ProjectedLBFGS`: two-loop recursion over each sample's own history,
    a per-sample backtracking line search, L-BFGS-B's free and fixed variables at the bounds),
    with a bisection on b per sample for the largest b whose minimiser is still predicted as the
    target (:class:`advfast.control.BisectionSearch`).

    Args:
        b: the initial constant (1e-2).
        steps: L-BFGS iterations per constant (100).
        history: (s, y) pairs kept per sample (10).
        binary_search_steps: constants tried per sample (10).
        record, amp, channels_last, compact_every, time_phases: see :class:`EngineAttack`.

    Samples with no success return their clean image.  :meth:`minimize` solves Eq. 1 for the
    given b alone and returns where each run ends, successful or not.
    """

    searches = True
    max_backtracks = 20

    def __init__(self, model: nn.Module, b: float = 1e-2, steps: int = 100, history: int = 10,
                 binary_search_steps: int = 10, **engine) -> None:
        super().__init__(model, **engine)
        self.b = positive("b", b)
        self.steps = _count("steps", steps)
        self.history = _count("history", history)
        self.binary_search_steps = _count("binary_search_steps", binary_search_steps)
        self.horizon = self.binary_search_steps * (self.steps * (self.max_backtracks + 1)
                                                   + self.compact_every)
        self._single = False

    def parts(self, deferred: bool) -> tuple[Head, Optimizer, Control]:
        control = (SingleRun(self.b) if self._single
                   else BisectionSearch(self.b, self.binary_search_steps))
        return (Head("ce"), ProjectedLBFGS(self.steps, self.history,
                                           max_backtracks=self.max_backtracks), control)

    def minimize(self, images, target, source=None):
        """One L-BFGS run per sample with b fixed: ``adversarial`` is where each run ends
        (the minimiser of Eq. 1), successful or not."""
        self._single = True
        try:
            return self(images, target, source)
        finally:
            self._single = False


ATTACKS = ("eq11", "ifgs", "cw-l2", "lbfgs")


# Each attack's parameters as the command line and generate's config.json name them, with their
# defaults (None: required, or for eq11's alpha/beta, the digits or paper default).
PARAMETERS: dict[str, dict[str, object]] = {
    "eq11": {"loss": "ce", "step": "equal-perturbation", "alpha": None, "beta": None,
             "kappa": 20.0, "kappa_mode": "clamp", "eps": None, "iterations": 250,
             "stop": "flip"},
    "ifgs": {"eps": 8 / 255, "alpha": 2 / 255, "iterations": 10, "random_start": False,
             "stop": "flip"},
    "cw-l2": {"c": 1e-3, "kappa": 0.0, "iterations": 1000, "lr": 1e-2,
              "binary_search_steps": 9, "abort_early": True},
    "lbfgs": {"b": 1e-2, "iterations": 100, "history": 10, "binary_search_steps": 10},
}


def resolve(name: str, given: dict[str, object], digits_default: bool) -> dict[str, object]:
    """The full parameters of attack ``name`` from the ones ``given`` (None = not given):
    defaults filled in; ValueError for an unknown attack or a parameter it does not take."""
    from .inputs import step_sizes

    if name not in PARAMETERS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    defaults = PARAMETERS[name]
    extra = sorted(k for k, v in given.items() if v is not None and k not in defaults)
    if extra:
        shown = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise ValueError(f"{shown} {'does' if len(extra) == 1 else 'do'} not apply to --attack "
                         f"{name} (it takes {', '.join(defaults)})")
    params = {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items()}
    if name == "eq11":
        if params["step"] == "equal-multiplier" and given.get("beta") is not None:
            raise ValueError("--beta is the equal-perturbation step; with --step "
                             "equal-multiplier give --alpha")
        if params["step"] == "equal-perturbation" and given.get("alpha") is not None:
            raise ValueError("--alpha is the equal-multiplier step; with --step "
                             "equal-perturbation give --beta")
        alpha, beta = step_sizes(digits_default, params["alpha"], params["beta"])
        params.update(alpha=alpha if params["step"] == "equal-multiplier" else None,
                      beta=beta if params["step"] == "equal-perturbation" else None)
    return params


def build(name: str, model: nn.Module, params: dict[str, object], **engine) -> EngineAttack:
    """The attack ``name`` with its resolved ``params`` (see :func:`resolve`) and the engine's
    options (amp, compact_every, time_phases, ...)."""
    p = dict(params)
    if name == "eq11":
        rule = {"alpha": p.pop("alpha")} if p["step"] == "equal-multiplier" else {
            "beta": p.pop("beta")}
        p.pop("alpha", None), p.pop("beta", None)
        return Attack(model, **rule, **p, **{"record": False, **engine})
    if name == "ifgs":
        return IFGS(model, eps=p["eps"], alpha=p["alpha"], steps=p["iterations"],
                    random_start=p["random_start"], stop=p["stop"], **engine)
    if name == "cw-l2":
        return CarliniWagnerL2(model, c=p["c"], kappa=p["kappa"], steps=p["iterations"],
                               lr=p["lr"], binary_search_steps=p["binary_search_steps"],
                               abort_early=p["abort_early"], **engine)
    return LBFGS(model, b=p["b"], steps=p["iterations"], history=p["history"],
                 binary_search_steps=p["binary_search_steps"], **engine)
