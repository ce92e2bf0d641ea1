"""Theorem IV.2 measured on real models at M = 10 classes (``theorem_iv2`` in table1.json).

Along equal-perturbation CE trajectories (Eq. 11 with Eq. 12's CE gradient) every visited
image is put in one of the subspaces of Definition IV.1 (threshold 0.9) and the statement of
Theorem IV.2 that belongs to it is measured:

* D1 (argmax r != c, max softmax >= 0.9), Eq. 8: grad J ~ grad g_r - grad g_c.  Measured: the
  relative error ||grad J - (grad g_r - grad g_c)|| / ||grad g_r - grad g_c||, and its bound
  (1 - p_r) + sum_{m != r, c} p_m ||grad g_m - grad g_c|| / ||grad g_r - grad g_c||.
* D2 (max softmax < 0.9), Eq. 9: grad J = sum_{m != c} beta_m (grad g_m - grad g_c) with
  sum |beta_m| < 1.  Measured: beta fitted by least squares on the M - 1 difference vectors,
  the fit's relative residual, sum |beta_m| and max |beta_m - p_m| (the proof's Eq. 32 gives
  beta_m = p_m exactly).
* D3 (argmax c, max softmax >= 0.9), Eq. 10: grad J -> 0.  Measured: ||grad J|| / ||grad g_c||.

J is the target's cross-entropy -log softmax(g)_c, whose input gradient is exactly
sum_{m != c} p_m (grad g_m - grad g_c) (supplement, Eq. 32).  With M = 2 Eq. 8 is that identity
and its error is exactly 1 - p_r; with M = 10 the other classes' terms are what is measured.

Precision: the trajectories are the attack's own (float32, as an attacker runs it); every
gradient is then taken on a float64 copy of the model and the image.  In float32 the quantities
measured here sit at or below rounding: deep in D1 the Eq. 8 error is ~1 - p_r, deep in D3
1 - p_c is ~1e-8 and below, and float32's eps (1.2e-7) would decide them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from advfast.attacks.eq11 import Eq11

THRESHOLD = 0.9  # Definition IV.1
QUANTITIES = {  # key in theorem_iv2 -> (subspace, what it is)
    "eq8_relative_error": (1, "||grad J - (grad g_r - grad g_c)|| / ||grad g_r - grad g_c||"),
    "eq8_error_bound": (1, ("(1 - p_r) + sum_{m!=r,c} p_m ||grad g_m - grad g_c|| / "
                            "||grad g_r - grad g_c||")),
    "eq8_one_minus_pr": (1, "1 - p_r (the error at M = 2)"),
    "eq9_fit_relative_residual": (2, "||A beta - grad J|| / ||grad J||, least squares"),
    "eq9_sum_abs_beta": (2, "sum_{m!=c} |beta_m| (theorem: < 1)"),
    "eq9_max_abs_beta_minus_p": (2, "max_{m!=c} |beta_m - p_m| (Eq. 32: beta = p)"),
    "eq10_ratio": (3, "||grad J|| / ||grad g_c||"),
    "eq10_one_minus_pc": (3, "1 - p_c"),
}


def walk(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, iterations: int,
         beta: float) -> Iterator[tuple[int, torch.Tensor]]:
    """(n, X_n) for n = 0..iterations along the equal-perturbation CE trajectory (Eq. 11,
    a_n = beta / sum|P_n|, P_n from Eq. 12), one step at a time so that a caller that only
    looks at every k-th image never holds the whole path."""
    attack = Eq11(model, loss="ce", step="equal-perturbation", beta=beta, iterations=1,
                  record=False)
    x = images.detach().clone()
    yield 0, x
    for n in range(1, iterations + 1):
        # one Eq. 11 step per call, as toy.trajectories() builds its paths
        x = attack(x, targets).adversarial.detach()
        yield n, x


def paths(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, iterations: int,
          beta: float) -> torch.Tensor:
    """The images along the trajectories of :func:`walk`, [iterations + 1, N, C, H, W]."""
    return torch.stack([x for _, x in walk(model, images, targets, iterations, beta)])


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode (the original is left as it is)."""
    return copy.deepcopy(model).double().eval()


def input_jacobian(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, M], Jacobian [N, M, d]): grad_x g_m of every logit m, per sample.

    Runs in the model's own dtype (pass :func:`float64_copy` and a float64 x for the
    measurement).  One backward pass per class on logits[:, m].sum(): in eval mode the samples
    do not interact, so the gradient of the sum w.r.t. x_i is sample i's own gradient.
    """
    dtype = next(model.parameters()).dtype
    x = x.detach().to(dtype).requires_grad_(True)
    logits = model(x)
    rows = []
    for m in range(logits.shape[1]):
        (g,) = torch.autograd.grad(logits[:, m].sum(), x, retain_graph=m + 1 < logits.shape[1])
        rows.append(g.flatten(1))
    return logits.detach(), torch.stack(rows, 1)


def ce_gradient(jac: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """grad_x J for J = -log softmax(g)_c, [N, d], as sum_{m != c} p_m (grad g_m - grad g_c)
    (Eq. 32).  Exact, and it avoids the cancellation of p_c - 1 that autograd's
    (softmax - onehot) form suffers deep in D3, where 1 - p_c falls below float64's eps."""
    diff = jac - jac[torch.arange(len(jac)), targets][:, None]
    weights = probs.scatter(1, targets[:, None], 0.0)  # the m = c term is zero anyway
    return (weights[:, :, None] * diff).sum(1)


def subspace(probs: torch.Tensor, targets: torch.Tensor,
             threshold: float = THRESHOLD) -> torch.Tensor:
    """1, 2 or 3 per sample: D1, D2, D3 of Definition IV.1."""
    top, pred = probs.max(1)
    return torch.where(top < threshold, 2, torch.where(pred == targets, 3, 1))


def _without(t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """t [N, M, ...] without entry drop[i] of row i: [N, M - 1, ...]."""
    keep = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    keep[torch.arange(len(t)), drop] = False
    return t[keep].view(t.shape[0], t.shape[1] - 1, *t.shape[2:])


def others(probs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """1 - p_k, summed from the other classes' probabilities: 1 - p_k itself would lose all
    digits once p_k rounds to 1."""
    return _without(probs, k).sum(1)


def eq8_terms(jac: torch.Tensor, probs: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 8 at D1 points: the relative error of grad J ~ grad g_r - grad g_c (r = argmax),
    its triangle-inequality bound and 1 - p_r.

    grad J - (grad g_r - grad g_c) = -(1 - p_r)(grad g_r - grad g_c)
    + sum_{m != r, c} p_m (grad g_m - grad g_c), so the error is at most the bound, with
    equality at M = 2 where the sum is empty."""
    idx, r = torch.arange(len(jac)), probs.argmax(1)
    diff = jac - jac[idx, targets][:, None]          # grad g_m - grad g_c, [N, M, d]
    scale = diff[idx, r].norm(dim=1)
    error = (ce_gradient(jac, probs, targets) - diff[idx, r]).norm(dim=1) / scale
    rest = probs.scatter(1, r[:, None], 0.0).scatter(1, targets[:, None], 0.0)
    one_minus_pr = others(probs, r)
    bound = one_minus_pr + (rest * diff.norm(dim=2)).sum(1) / scale
    return {"eq8_relative_error": error, "eq8_error_bound": bound,
            "eq8_one_minus_pr": one_minus_pr}


def eq9_terms(jac: torch.Tensor, probs: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 9 at D2 points: beta fitted by least squares, grad J ~ A beta with A's columns the
    M - 1 vectors grad g_m - grad g_c (m != c; d >= M - 1, so the fit is overdetermined).

    The fit does not assume Eq. 32: it asks whether grad J lies in the span and with which
    weights; beta = p_m is the exact answer when A has full column rank."""
    idx = torch.arange(len(jac))
    a = _without(jac - jac[idx, targets][:, None], targets).transpose(1, 2)  # [N, d, M - 1]
    b = ce_gradient(jac, probs, targets)[:, :, None]
    # gelsd: SVD based, so a (near) rank-deficient A still gets the minimum-norm beta
    fit = torch.linalg.lstsq(a, b, driver="gelsd")
    beta = fit.solution[:, :, 0]
    residual = (a @ fit.solution - b).norm(dim=(1, 2)) / b.norm(dim=(1, 2))
    return {"eq9_fit_relative_residual": residual, "eq9_sum_abs_beta": beta.abs().sum(1),
            "eq9_max_abs_beta_minus_p": (beta - _without(probs, targets)).abs().max(1).values,
            # A beta = grad J has many solutions then, so beta need not equal p
            "eq9_rank_deficient": (fit.rank < a.shape[2]).to(torch.float64)}


def eq10_terms(jac: torch.Tensor, probs: torch.Tensor,
               targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 10 at D3 points: ||grad J|| / ||grad g_c|| (the CE step's size relative to the
    target-logit step's) and 1 - p_c, which scales it."""
    g_c = jac[torch.arange(len(jac)), targets]
    ratio = ce_gradient(jac, probs, targets).norm(dim=1) / g_c.norm(dim=1)
    return {"eq10_ratio": ratio, "eq10_one_minus_pc": others(probs, targets)}


TERMS = {1: eq8_terms, 2: eq9_terms, 3: eq10_terms}


@dataclass
class Samples:
    """Every measured value, per quantity (flat arrays over points x samples), the points per
    subspace, and the run's settings."""

    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    points: dict[str, int] = field(default_factory=lambda: {"D1": 0, "D2": 0, "D3": 0})
    settings: dict = field(default_factory=dict)

    def array(self, name: str) -> np.ndarray:
        parts = self.values.get(name, [])
        return np.concatenate(parts) if parts else np.zeros(0)


def collect(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
            iterations: int = 250, beta: float = 0.1, threshold: float = THRESHOLD,
            stride: int = 5) -> Samples:
    """Walks the trajectories and measures Theorem IV.2 at every ``stride``-th image
    (n = 0, stride, 2 stride, ...), each point in its own subspace."""
    model64 = float64_copy(model)
    out = Samples(settings={"samples": len(images), "iterations": iterations, "beta": beta,
                            "threshold": threshold, "stride": stride, "dtype": "float64"})
    for n, x in walk(model, images, targets, iterations, beta):
        if n % stride:
            continue
        logits, jac = input_jacobian(model64, x.double())
        probs = torch.softmax(logits, 1)
        space = subspace(probs, targets, threshold)
        for k, terms in TERMS.items():
            mask = space == k
            out.points[f"D{k}"] += int(mask.sum())
            if mask.any():
                for name, v in terms(jac[mask], probs[mask], targets[mask]).items():
                    out.values.setdefault(name, []).append(v.numpy())
    return out


def distribution(values: np.ndarray) -> dict:
    """count, median, IQR (q25, q75), min, max of the finite values, plus how many were not
    finite; None for a statistic of no values, so json.dumps(allow_nan=False) accepts it."""
    finite = values[np.isfinite(values)]
    out: dict = {"count": int(finite.size), "nonfinite": int(values.size - finite.size)}
    for key, q in (("median", 50), ("q25", 25), ("q75", 75), ("min", 0), ("max", 100)):
        out[key] = float(np.percentile(finite, q)) if finite.size else None
    return out


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if flags.size else None


def summarise(samples: Samples) -> dict:
    """The ``theorem_iv2`` entry of table1.json: a distribution per quantity of
    :data:`QUANTITIES`, the checks in one number each, the points per subspace, the settings."""
    out: dict = {name: distribution(samples.array(name)) for name in QUANTITIES}
    error, bound = samples.array("eq8_relative_error"), samples.array("eq8_error_bound")
    # the bound is exact algebra; the slack covers float64 rounding of the error itself
    out["eq8_share_within_bound"] = _share(error <= bound * (1 + 1e-9) + 1e-12)
    out["eq9_share_sum_abs_beta_below_1"] = _share(samples.array("eq9_sum_abs_beta") < 1)
    out["eq9_rank_deficient_points"] = int(samples.array("eq9_rank_deficient").sum())
    out["points"] = dict(samples.points)
    out["settings"] = dict(samples.settings)
    out["definitions"] = {name: f"D{k}: {text}" for name, (k, text) in QUANTITIES.items()}
    return out


def measure(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
            iterations: int = 250, beta: float = 0.1, threshold: float = THRESHOLD,
            stride: int = 5) -> dict:
    """Theorem IV.2 (Eqs. 8-10) measured along equal-perturbation CE trajectories from
    ``images`` towards ``targets``: the strict-JSON dict for table1.json's ``theorem_iv2``."""
    return summarise(collect(model, images, targets, iterations, beta, threshold, stride))


PANELS = (  # quantity, subspace, title, log x
    ("eq8_relative_error", "D1", ("Eq. 8 in D1: ||grad J - (grad g_r - grad g_c)||\n"
                                  "/ ||grad g_r - grad g_c||"), True),
    ("eq9_sum_abs_beta", "D2", ("Eq. 9 in D2: sum |beta_m| of the least-squares fit\n"
                                "(theorem: < 1, dashed)"), False),
    ("eq10_ratio", "D3", "Eq. 10 in D3: ||grad J|| / ||grad g_c||\n(theorem: -> 0)", True),
)


def _bins(arrays: list[np.ndarray], log: bool) -> np.ndarray:
    """40 shared bins over all datasets' values: log-spaced where the values span decades."""
    values = np.concatenate([a[np.isfinite(a)] for a in arrays] + [np.zeros(0)])
    if log:
        values = values[values > 0]
        if not values.size:
            return np.logspace(-16, 0, 41)
        low, high = np.log10(values.min()), np.log10(values.max())
        return np.logspace(low, max(high, low + 1e-3), 41)
    # 1 is a bin edge, so values just under the theorem's bound never share a bin above it
    high = max(1.0, float(values.max())) if values.size else 1.0
    return np.arange(0.0, high + 0.05, 0.025)


def figure(results: Samples | Mapping[str, Samples], path: str) -> None:
    """One PNG, three panels: the distributions of Eq. 8's relative error in D1, of Eq. 9's
    sum |beta| in D2 and of Eq. 10's ratio in D3, one step histogram per dataset; the legend
    sits under the panels, never over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"run": results} if isinstance(results, Samples) else dict(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, space, title, log) in zip(axes, PANELS):
        arrays = [samples.array(name) for samples in runs.values()]
        bins = _bins(arrays, log)
        for k, (label, values) in enumerate(zip(runs, arrays)):
            values = values[np.isfinite(values)]
            median = f"{np.median(values):.3g}" if values.size else "-"
            ax.hist(values, bins=bins, histtype="step", lw=1.8, color=colours[k % len(colours)],
                    label=f"{label}: {space} n={values.size}, median {median}")
        if log:
            ax.set_xscale("log")
        else:
            ax.axvline(1.0, color="k", ls="--", lw=1)
        ax.set(title=title, ylabel="points", xlabel=name)
        ax.title.set_fontsize(10)
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    labels = [t for ax in axes for t in ax.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Theorem IV.2 at M = 10 along equal-perturbation CE trajectories "
                 "(float64 gradients; subspaces of Definition IV.1, threshold 0.9)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1 + 0.03 * len(runs), 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


FILES = ("theorem_iv2.png",)
# Inputs measured for Table I's theorem_iv2 (the first ones of the table's): the Jacobian costs
# M backward passes per point, so a subset keeps it to seconds.
TABLE1_SAMPLES = 64


def for_table1(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, iterations: int,
               beta: float, out=None) -> dict:
    """Theorem IV.2 on the first TABLE1_SAMPLES of Table I's inputs, along the table's own
    equal-perturbation CE trajectories (its beta and iterations): the ``theorem_iv2`` dict of
    table1.json; with ``out`` (an :class:`advfast.io.files.OutputFolder`) its figure goes there
    as theorem_iv2.png."""
    from advfast.io.files import write_durably

    k = min(TABLE1_SAMPLES, len(images))
    samples = collect(model, images[:k], targets[:k], iterations, beta)
    if out is not None:
        write_durably(out.file("theorem_iv2.png"), lambda tmp: figure(samples, tmp))
    return summarise(samples)
