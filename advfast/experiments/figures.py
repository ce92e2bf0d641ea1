"""The paper's figures from Table I's trajectories, as PNG files.

Fig. 1: source/target probability (mean, 95% CI) with the D1/D2/D3 subspaces as bands.
Figs. 2 and 3: (a) softmax and (b) logits of the source and target class per loss, (c) box
plots of L2 and Linf at the first flip; Fig. 2 for the equal multiplier, Fig. 3 for equal
perturbation.  Fig. 4: the gradient magnitude sum|P_n| under the equal multiplier.  Fig. 5: the
perturbation of each loss at the first flip, as saliency maps beside the genuine image.
"""

from __future__ import annotations

import torch

from advfast.experiments.table1 import Cell
from advfast.io.files import OutputFolder, write_durably

FILES = ("fig1.png", "fig2.png", "fig3.png", "fig4.png", "fig5.png")
LOSSES = ("ce", "ce-sign", "logit", "m-logit")

COLORS = {"ce": "tab:blue", "ce-sign": "tab:orange", "logit": "tab:green", "m-logit": "tab:red"}
BANDS = {1: ("tab:blue", "D1"), 2: ("tab:green", "D2"), 3: ("tab:red", "D3")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_ci(values: torch.Tensor):
    """Mean over samples (dim 1) and the 95% normal confidence half-width, ignoring NaN, as
    numpy arrays (what matplotlib takes)."""
    finite = ~torch.isnan(values)
    count = finite.sum(1).clamp_min(1)
    mean = torch.where(finite, values, 0).sum(1) / count
    var = torch.where(finite, (values - mean[:, None]) ** 2, 0).sum(1) / (count - 1).clamp_min(1)
    return mean.numpy(), (1.96 * var.sqrt() / count.sqrt()).numpy()


def _subspace_bands(ax, subspace: torch.Tensor) -> None:
    """Shades each iteration with the subspace most samples are in."""
    majority = torch.mode(torch.nan_to_num(subspace, nan=0).long(), dim=1).values
    start = 0
    seen = set()
    for n in range(1, len(majority) + 1):
        if n == len(majority) or majority[n] != majority[start]:
            color, label = BANDS.get(int(majority[start]), ("white", None))
            ax.axvspan(start - 0.5, n - 0.5, color=color, alpha=0.12,
                       label=None if label in seen else label, lw=0)
            seen.add(label)
            start = n


def figure1(cell: Cell, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _subspace_bands(ax, cell.trajectory["subspace"])
    steps = torch.arange(len(cell.trajectory["source_prob"])).numpy()
    for name, color, label in (("source_prob", "tab:gray", "initial class"),
                               ("target_prob", "tab:red", "target class")):
        mean, ci = _mean_ci(cell.trajectory[name])
        ax.plot(steps, mean, color=color, label=label)
        ax.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.3, lw=0)
    ax.set(xlabel="iteration", ylabel="softmax probability", ylim=(0, 1),
           title=f"Fig. 1: {cell.loss}, {cell.step} (mean, 95% CI; n={len(cell.first_flip)})")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def figure_rule(cells: list[Cell], number: int, path: str) -> None:
    """Fig. 2 (equal multiplier) or Fig. 3 (equal perturbation)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for cell in cells:
        steps = torch.arange(len(cell.trajectory["source_prob"])).numpy()
        for ax, kind in ((axes[0], "prob"), (axes[1], "logit")):
            for which, style in (("source", "--"), ("target", "-")):
                mean, _ = _mean_ci(cell.trajectory[f"{which}_{kind}"])
                ax.plot(steps, mean, style, color=COLORS[cell.loss],
                        label=f"{cell.loss} {which}")
    axes[0].set(xlabel="iteration", ylabel="softmax", title="(a) softmax, source -- / target —")
    axes[1].set(xlabel="iteration", ylabel="logit", title="(b) logits, source -- / target —")
    for ax, norm, panel in ((axes[2], "l2", "c"), (axes[3], "linf", "d")):
        data = [c.at_flip[norm][c.first_flip >= 0].numpy() for c in cells]
        ax.boxplot(data, tick_labels=[c.loss for c in cells], showfliers=False)
        ax.set(title=f"({panel}) {'L2' if norm == 'l2' else 'Linf'} at the first flip")
    # one legend for (a) and (b), below the panels, where it covers no curve
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"Fig. {number}: {cells[0].step}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def figure4(cells: list[Cell], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for cell in cells:
        mean, _ = _mean_ci(cell.trajectory["p_l1"][:-1])
        ax.plot(range(len(mean)), mean, color=COLORS[cell.loss], label=cell.loss)
    ax.set(yscale="log", xlabel="iteration", ylabel="sum |P_n| (mean)",
           title=f"Fig. 4: gradient magnitude, {cells[0].step}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def draw_all(cells: list[Cell], out: OutputFolder) -> None:
    """Writes fig1.png .. fig4.png into ``out``."""
    by_step = {}
    for cell in cells:
        by_step.setdefault(cell.step, []).append(cell)
    multiplier, perturbation = by_step["equal-multiplier"], by_step["equal-perturbation"]
    ifgs = next(c for c in multiplier if c.loss == "ce-sign")  # Fig. 1 is IFGS, as the paper's
    write_durably(out.file("fig1.png"), lambda tmp: figure1(ifgs, tmp))
    write_durably(out.file("fig2.png"), lambda tmp: figure_rule(multiplier, 2, tmp))
    write_durably(out.file("fig3.png"), lambda tmp: figure_rule(perturbation, 3, tmp))
    write_durably(out.file("fig4.png"), lambda tmp: figure4(multiplier, tmp))


def saliency_panel(images: torch.Tensor, perturbations: dict[str, torch.Tensor],
                   path: str) -> None:
    """Fig. 5's layout: one row per input, its genuine image, then the per-pixel magnitude of
    each perturbation (sum over channels of |delta|), on one colour scale per row.

    images: [k, C, H, W] in [0, 1]; perturbations: {name: [k, C, H, W]}.
    """
    plt = _pyplot()
    names = list(perturbations)
    rows = len(images)
    fig, axes = plt.subplots(rows, 1 + len(names), figsize=(2.2 * (1 + len(names)), 2.2 * rows),
                             squeeze=False)
    for i in range(rows):
        image = images[i].float()
        if image.shape[0] == 1:
            axes[i, 0].imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            axes[i, 0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        magnitude = {n: perturbations[n][i].float().abs().sum(0) for n in names}
        top = max(float(m.max()) for m in magnitude.values()) or 1.0
        for j, n in enumerate(names, start=1):
            axes[i, j].imshow(magnitude[n].numpy(), cmap="inferno", vmin=0, vmax=top)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("genuine")
    for j, n in enumerate(names, start=1):
        axes[0, j].set_title(n)
    fig.suptitle("Perturbation at the first flip\n(sum over channels of |delta|; one colour "
                 "scale per row)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))  # 0.6 in for the title
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def figure5(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor,
            source: torch.Tensor, beta: float, iterations: int, out: OutputFolder) -> None:
    """Fig. 5: for the given inputs, the genuine image and each loss's perturbation at its
    first flip under equal perturbation (the paper's fair comparison); fig5.png."""
    from advfast.attacks.eq11 import Eq11

    perturbations = {}
    for loss in LOSSES:
        attack = Eq11(model, loss=loss, step="equal-perturbation", beta=beta,
                        iterations=iterations, stop="flip", record=False)
        perturbations[loss] = (attack(images, target, source).adversarial - images).cpu()
    write_durably(out.file("fig5.png"),
                  lambda tmp: saliency_panel(images.cpu(), perturbations, tmp))
