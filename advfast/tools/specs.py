"""The attacks as the applications name them (``--attack eq11|ifgs|cw-l2|lbfgs``): each
attack's parameters with their defaults, checked and resolved once for the command line,
generate's config.json and the benchmarks, and the attack built from them.  (An application
module: its messages speak in command-line flags.)"""

from __future__ import annotations

from torch import nn

from advfast.attacks import IFGS, LBFGS, BaseAttack, CarliniWagnerL2, Eq11
from advfast.attacks.eq11 import PAPER_ALPHA, PAPER_BETA
from advfast.errors import InvalidValue

# Step sizes: the paper's values for ImageNet-sized inputs, and ones chosen for the 1x8x8
# digits default so that (nearly) every first flip falls inside 250 iterations.
# Step sizes of the paper's scheme for the built-in models, chosen so that (nearly) every
# first flip falls inside 250 iterations: {model: (alpha, beta)}.  MNIST has 12x the digits'
# pixels: beta 0.5 and alpha 0.01 flip the first 32 test inputs.
BUILTIN_STEPS = {"digits": (2e-3, 0.1), "mnist": (1e-2, 0.5)}
# IFGS: the usual 8/255 ball for ImageNet-sized inputs is far too small for the built-in models
# (no digit flips); eps 0.3 with 10 steps of 0.03 flips 59 of the first 64 digits and 13 of
# the first 16 MNIST test inputs: {model: (eps, alpha)}.
IFGS_EPS, IFGS_ALPHA = 8 / 255, 2 / 255
BUILTIN_IFGS = {"digits": (0.3, 0.03), "mnist": (0.3, 0.03)}


def step_sizes(builtin: str | None, alpha: float | None,
               beta: float | None) -> tuple[float, float]:
    """(alpha, beta): the given ones, else those of the built-in model ``builtin`` (None: a
    torchvision model: the paper's)."""
    default_alpha, default_beta = BUILTIN_STEPS.get(builtin, (PAPER_ALPHA, PAPER_BETA))
    return (default_alpha if alpha is None else alpha, default_beta if beta is None else beta)


ATTACKS = ("eq11", "ifgs", "cw-l2", "lbfgs")


# Each attack's parameters as the command line and generate's config.json name them, with their
# defaults (None: required, or for eq11's alpha/beta, the digits or paper default).
PARAMETERS: dict[str, dict[str, object]] = {
    "eq11": {"loss": "ce", "step": "equal-perturbation", "alpha": None, "beta": None,
             "kappa": 20.0, "kappa_mode": "clamp", "eps": None, "iterations": 250,
             "stop": "flip", "exact_l1": False, "ce_seed": "exact"},
    "ifgs": {"eps": None, "alpha": None, "iterations": 10, "random_start": False,
             "stop": "flip"},
    "cw-l2": {"c": 1e-3, "kappa": 0.0, "iterations": 1000, "lr": 1e-2,
              "binary_search_steps": 9, "abort_early": True, "warm_start": False},
    "lbfgs": {"b": 1e-2, "iterations": 100, "history": 10, "binary_search_steps": 10},
}


def resolve(name: str, given: dict[str, object], builtin: str | None) -> dict[str, object]:
    """The full parameters of attack ``name`` from the ones ``given`` (None = not given):
    defaults filled in; ValueError for an unknown attack or a parameter it does not take."""
    if name not in PARAMETERS:
        raise InvalidValue(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    defaults = PARAMETERS[name]
    extra = sorted(k for k, v in given.items() if v is not None and k not in defaults)
    if extra:
        shown = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise InvalidValue(f"{shown} {'does' if len(extra) == 1 else 'do'} not apply to --attack "
                         f"{name} (it takes {', '.join(defaults)})")
    params = {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items()}
    if name in ("cw-l2", "lbfgs") and params["iterations"] < 1:
        raise InvalidValue(f"--iterations must be at least 1 for --attack {name} (the steps "
                           "per constant)")
    if name == "eq11":
        if params["step"] == "equal-multiplier" and given.get("beta") is not None:
            raise InvalidValue("--beta is the equal-perturbation step; with --step "
                             "equal-multiplier give --alpha")
        if params["step"] == "equal-perturbation" and given.get("alpha") is not None:
            raise InvalidValue("--alpha is the equal-multiplier step; with --step "
                             "equal-perturbation give --beta")
        alpha, beta = step_sizes(builtin, params["alpha"], params["beta"])
        params.update(alpha=alpha if params["step"] == "equal-multiplier" else None,
                      beta=beta if params["step"] == "equal-perturbation" else None)
    if name == "ifgs":
        eps, alpha = BUILTIN_IFGS.get(builtin, (IFGS_EPS, IFGS_ALPHA))
        params.update(eps=eps if params["eps"] is None else params["eps"],
                      alpha=alpha if params["alpha"] is None else params["alpha"])
    return params


def build(name: str, model: nn.Module, params: dict[str, object], **engine) -> BaseAttack:
    """The attack ``name`` with its resolved ``params`` (see :func:`resolve`) and the engine's
    options (amp, compact_every, time_phases, ...)."""
    p = dict(params)
    if name == "eq11":
        rule = {"alpha": p.pop("alpha")} if p["step"] == "equal-multiplier" else {
            "beta": p.pop("beta")}
        p.pop("alpha", None), p.pop("beta", None)
        return Eq11(model, **rule, **p, **{"record": False, **engine})
    if name == "ifgs":
        return IFGS(model, eps=p["eps"], alpha=p["alpha"], steps=p["iterations"],
                    random_start=p["random_start"], stop=p["stop"], **engine)
    if name == "cw-l2":
        return CarliniWagnerL2(model, c=p["c"], kappa=p["kappa"], steps=p["iterations"],
                               lr=p["lr"], binary_search_steps=p["binary_search_steps"],
                               abort_early=p["abort_early"], warm_start=p["warm_start"],
                               **engine)
    return LBFGS(model, b=p["b"], steps=p["iterations"], history=p["history"],
                 binary_search_steps=p["binary_search_steps"], **engine)
