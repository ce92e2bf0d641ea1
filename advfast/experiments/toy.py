"""``advfast toy``: the paper's 2-D experiment (supplement, Fig. 6) and a numeric check of
Theorem IV.2.

Two concentric circles (scikit-learn's ``make_circles``, scaled into [-1, 1]^2) and an MLP with
one hidden layer of 50 ReLU units, trained deterministically; the target class is the inner
circle.  Over a grid of [-1, 1]^2 it computes, per point X:

* the CE gradient's magnitude sum|grad_X CE(g(X), c)| and the logit gradient's sum|grad_X g_c|
  (log10 maps), and the CE-sign map sum|sign grad_X CE| (0 where the float32 gradient has
  vanished: the "limited optimisation space" of Section IV-B);
* the decision boundary and the subspaces D1/D2/D3 of Definition IV.1;

and it draws a few adversarial trajectories from the outer class per loss (equal perturbation).

Theorem IV.2, checked numerically on the grid: in D3 the CE gradient is orders of magnitude
smaller than the logit gradient (Eq. 10), and in D1 grad CE = grad g_r - grad g_c up to the
approximation's error, which is bounded by 1 - max softmax (Eq. 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from advfast import ops
from advfast.attacks.eq11 import Eq11

TARGET = 1  # make_circles labels the inner circle 1
LOSSES = ops.LOSSES


class ToyMLP(nn.Module):
    """2 -> 50 ReLU -> 2, the supplement's network."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.ReLU(), nn.Linear(50, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def circles(n: int = 1000, noise: float = 0.05, factor: float = 0.5,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points [n, 2] in [-1, 1]^2 and labels [n] (1: inner circle)."""
    from sklearn.datasets import make_circles

    x, y = make_circles(n_samples=n, noise=noise, factor=factor, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    return x / x.abs().max(), torch.tensor(y, dtype=torch.int64)


def train(points: torch.Tensor, labels: torch.Tensor, epochs: int = 300,
          seed: int = 0) -> ToyMLP:
    """Full-batch Adam on cross-entropy, seeded: the same network every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyMLP()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(points), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@dataclass
class Grids:
    """Everything on the grid, [steps, steps] each (row i: y, column j: x)."""

    axis: np.ndarray
    ce: np.ndarray        # sum |grad CE|
    logit: np.ndarray     # sum |grad g_c|
    ce_sign: np.ndarray   # sum |sign grad CE| in float32
    pred: np.ndarray
    max_prob: np.ndarray
    subspace: np.ndarray  # 1, 2, 3 (Definition IV.1, target = inner circle)
    d1_error: np.ndarray  # |grad CE - (grad g_r - grad g_c)| / |grad g_r - grad g_c|


def gradients(model: nn.Module, x: torch.Tensor, target: int = TARGET) -> dict[str, torch.Tensor]:
    """Per point of x [n, 2]: grad_x of CE(g(x), target) (the loss the attacker descends),
    of g_target, and of g_r for the predicted class r; float64 for the check, float32 for the
    sign map."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    c = torch.full((len(x),), target, dtype=torch.int64)
    ce = nn.functional.cross_entropy(logits, c, reduction="sum")
    (g_ce,) = torch.autograd.grad(ce, x, retain_graph=True)
    (g_c,) = torch.autograd.grad(logits[:, target].sum(), x, retain_graph=True)
    pred = logits.argmax(1)
    (g_r,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), x)
    return {"ce": g_ce, "logit": g_c, "pred_logit": g_r, "logits": logits.detach()}


def grids(model: nn.Module, steps: int = 201, threshold: float = 0.9) -> Grids:
    axis = np.linspace(-1, 1, steps)
    xx, yy = np.meshgrid(axis, axis)
    points = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1))
    model64 = ToyMLP().double()
    model64.load_state_dict(model.state_dict())
    g = gradients(model64, points)
    g32 = gradients(model, points.float())
    prob = torch.softmax(g["logits"], 1)
    pred = prob.argmax(1)
    max_prob = prob.max(1).values
    subspace = torch.where(max_prob < threshold, 2, torch.where(pred == TARGET, 3, 1))
    approx = g["pred_logit"] - g["logit"]  # Eq. 8: grad g_r - grad g_c
    error = (g["ce"] - approx).norm(dim=1) / approx.norm(dim=1).clamp_min(1e-300)
    shape = (steps, steps)
    as_grid = lambda t: t.reshape(shape).numpy()  # noqa: E731
    return Grids(axis, as_grid(g["ce"].abs().sum(1)), as_grid(g["logit"].abs().sum(1)),
                 as_grid(g32["ce"].sign().abs().sum(1).double()), as_grid(pred),
                 as_grid(max_prob), as_grid(subspace), as_grid(error))


def theorem_check(grid: Grids) -> dict:
    """Theorem IV.2 on the grid: the medians the tests and toy.json report."""
    d3, d1 = grid.subspace == 3, grid.subspace == 1
    ratio = grid.ce[d3] / grid.logit[d3]
    bound = 1 - grid.max_prob[d1]
    return {
        "points": {"D1": int(d1.sum()), "D2": int((grid.subspace == 2).sum()),
                   "D3": int(d3.sum())},
        "D3_median_ce_over_logit_gradient": float(np.median(ratio)),
        "D3_max_ce_over_logit_gradient": float(ratio.max()),
        "D3_share_sign_vanished": float((grid.ce_sign[d3] == 0).mean()),
        "D1_median_relative_error_of_eq8": float(np.median(grid.d1_error[d1])),
        "D1_max_relative_error_of_eq8": float(grid.d1_error[d1].max()),
        "D1_max_error_bound_1_minus_max_prob": float(bound.max()),
        # with two classes the error is exactly (1 - p_r) |grad g_r - grad g_c|
        "D1_error_within_bound": bool(np.all(grid.d1_error[d1] <= bound * (1 + 1e-6) + 1e-12)),
        "D3_orders_of_magnitude": float(-math.log10(np.median(ratio))),
    }


def trajectories(model: nn.Module, points: torch.Tensor, labels: torch.Tensor, count: int = 4,
                 iterations: int = 40, beta: float = 0.02) -> dict[str, np.ndarray]:
    """Equal-perturbation trajectories (Eq. 11) of ``count`` outer points towards the inner
    class, per loss: {loss: [count, iterations + 1, 2]}."""
    outer = points[labels == 0][:: max(1, int((labels == 0).sum()) // count)][:count]
    # the attacks work on images in [0, 1]: map [-1, 1]^2 there and back
    wrapped = nn.Sequential(Affine(2.0, -1.0), model)
    x0 = ((outer + 1) / 2).view(-1, 1, 1, 2)
    target = torch.full((len(outer),), TARGET, dtype=torch.int64)
    out = {}
    for loss in LOSSES:
        x, path = x0.clone(), [x0.clone()]
        attack = Eq11(wrapped, loss=loss, step="equal-perturbation", beta=beta, iterations=1,
                      record=False)
        for _ in range(iterations):
            x = attack(x, target).adversarial
            path.append(x)
        out[loss] = (torch.stack(path, 1).view(len(outer), iterations + 1, 2) * 2 - 1).numpy()
    return out


class Affine(nn.Module):
    """x -> scale * x + shift."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def figure(grid: Grids, paths: dict[str, np.ndarray], points: torch.Tensor,
           labels: torch.Tensor, path: str) -> None:
    """Fig. 6: the three maps with the boundary, the subspaces and the trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from advfast.experiments.figures import COLORS

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    extent = (-1, 1, -1, 1)
    maps = [(np.log10(grid.ce + 1e-30), "log10 sum|grad CE|"),
            (np.log10(grid.logit + 1e-30), "log10 sum|grad logit_c|"),
            (grid.ce_sign, "sum|sign grad CE| (float32)")]
    for ax, (values, title) in zip(axes, maps):
        shown = ax.imshow(values, origin="lower", extent=extent, cmap="viridis", aspect="equal")
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.contour(grid.axis, grid.axis, grid.pred, levels=[0.5], colors="white",
                   linewidths=1.5)
        ax.contour(grid.axis, grid.axis, grid.subspace, levels=[1.5, 2.5], colors="red",
                   linewidths=0.8, linestyles="dashed")
        ax.scatter(*points[labels == 0][::8].T, s=3, c="k", alpha=0.3)
        ax.scatter(*points[labels == 1][::8].T, s=3, c="w", alpha=0.3)
        _draw_paths(ax, paths, COLORS)
        ax.set(title=title, xlim=(-1, 1), ylim=(-1, 1))
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9)
    fig.suptitle("Fig. 6: 2-D toy, target = inner circle; white: decision boundary, red dashed: "
                 "D1 | D2 | D3 (Definition IV.1); lines: equal-perturbation trajectories (with "
                 "M = 2 classes CE and M-logit point the same way, so their paths coincide)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# Widest first, so that paths that coincide (CE and M-logit at M = 2) all stay visible.
PATH_STYLE = {"ce": dict(lw=5.0, ls="-", alpha=0.45), "m-logit": dict(lw=2.5, ls="--"),
              "logit": dict(lw=1.0, ls="-"), "ce-sign": dict(lw=1.2, ls=":")}


def _draw_paths(ax, paths: dict[str, np.ndarray], colors: dict[str, str]) -> None:
    for z, loss in enumerate(sorted(paths, key=lambda name: -PATH_STYLE[name]["lw"])):
        for k, trace in enumerate(paths[loss]):
            ax.plot(trace[:, 0], trace[:, 1], color=colors[loss], zorder=3 + z,
                    label=loss if k == 0 else None, **PATH_STYLE[loss])
            ax.plot(*trace[-1], "o", color=colors[loss], ms=4, zorder=3 + z)


FILES = ("fig6.png", "toy.npz", "toy.json")


def run(out, steps: int = 201, seed: int = 0) -> dict:
    """Trains the toy network, computes the grids, the check and the trajectories, and writes
    fig6.png, toy.npz and toy.json into ``out`` (an :class:`advfast.io.files.OutputFolder`);
    returns the check."""
    from advfast.io.files import write_durably, write_json

    points, labels = circles(seed=seed)
    model = train(points, labels, seed=seed)
    with torch.no_grad():
        accuracy = float((model(points).argmax(1) == labels).float().mean())
    grid = grids(model, steps)
    check = {**theorem_check(grid), "train_accuracy": accuracy, "grid_steps": steps,
             "seed": seed, "target": "inner circle (label 1)"}
    paths = trajectories(model, points, labels)
    write_durably(out.file("fig6.png"), lambda tmp: figure(grid, paths, points, labels, tmp))

    def save_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, axis=grid.axis, ce=grid.ce, logit=grid.logit,
                                ce_sign=grid.ce_sign, pred=grid.pred, max_prob=grid.max_prob,
                                subspace=grid.subspace, d1_error=grid.d1_error,
                                **{f"trajectory_{k}": v for k, v in paths.items()})

    write_durably(out.file("toy.npz"), save_npz)
    write_json(out.file("toy.json"), check)
    return check
