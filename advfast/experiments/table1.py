"""The paper's Table I experiment (Section V-B): the four losses under both step rules.

For every (step rule, loss) it runs the attack for all iterations on the same inputs and
targets and reports the iterations to the first flip (mean +- std), the time to compute the
perturbation for all iterations per image (mean +- std over batches), per-iteration ms and
images/s, and the L2/Linf perturbation at the first flip.  Trajectories feed Figs. 1-4 (Fig. 5 is drawn from its own short runs).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from advfast import ops
from advfast.attacks.eq11 import STEPS, Eq11
from advfast.engine.core import TRAJECTORY
from advfast.io.files import OutputFolder, write_durably, write_json
from advfast.io.selection import AttackInputs

FILES = ("table1.json", "table1.csv", "samples.csv")
# Above this spread of the time per image between equal batches of one cell, differences
# between the cells' times are within the machine's noise, and the table says so.
TIME_SPREAD_WARNING = 0.15
# Iterations of the untimed warm-up run (first-call costs: allocator, kernels, caches).
WARMUP_ITERATIONS = 3
# The equal-perturbation cells report the L1 their steps actually added over these first
# iterations, as a share of beta (step_l1_over_beta).
STEP_L1_ITERATIONS = 60


@dataclass
class Cell:
    """Results of one (step rule, loss) pair, on the CPU."""

    step: str
    loss: str
    first_flip: torch.Tensor
    at_flip: dict[str, torch.Tensor]
    trajectory: dict[str, torch.Tensor]
    batch_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    per_iteration_ms: list[float] = field(default_factory=list)
    beta: float | None = None  # the equal-perturbation L1 per step (None: equal multiplier)

    def step_l1_over_beta(self) -> float:
        """Mean over the first STEP_L1_ITERATIONS iterations and the samples of step_l1 / beta:
        the share of beta the steps really added (1 for the exact rule where room allows);
        NaN for the equal-multiplier cells."""
        if self.beta is None or "step_l1" not in self.trajectory:
            return math.nan
        added = self.trajectory["step_l1"][:STEP_L1_ITERATIONS].double()
        added = added[~torch.isnan(added)]
        return float(added.mean() / self.beta) if added.numel() else math.nan

    def summary(self) -> dict:
        """The cell's row of table1.json.  Time per image: mean and std over batches;
        ``time_spread``: that std over the mean, on the full batches only (the same work each,
        so their spread is the machine's noise); img/s: all images over all the time, so it
        agrees with the time column."""
        flipped = self.first_flip >= 0
        iters = self.first_flip[flipped].double()
        per_image = torch.tensor(self.batch_seconds) / torch.tensor(self.batch_sizes)
        full = per_image[torch.tensor(self.batch_sizes) == max(self.batch_sizes)]
        return {
            "step": self.step, "loss": self.loss, "n": len(self.first_flip),
            "flipped": float(flipped.double().mean()),
            "iterations_mean": _mean(iters), "iterations_std": _std(iters),
            "time_per_image_s_mean": _mean(per_image), "time_per_image_s_std": _std(per_image),
            "time_spread": _std(full) / _mean(full) if len(full) > 1 else math.nan,
            "per_iteration_ms": _mean(torch.tensor(self.per_iteration_ms)),
            "images_per_s": sum(self.batch_sizes) / sum(self.batch_seconds),
            **{f"{k}_at_flip_mean": _mean(v[flipped].double()) for k, v in self.at_flip.items()},
            "step_l1_over_beta": self.step_l1_over_beta(),
        }


def _mean(t: torch.Tensor) -> float:
    return float(t.mean()) if t.numel() else math.nan


def _std(t: torch.Tensor) -> float:
    return float(t.std()) if t.numel() > 1 else math.nan


def _plus_minus(mean: float, std: float, spec: str, std_spec: str) -> str:
    """"mean ± std", "mean" when there is no spread to report, "n/a" when no value."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{spec}}" if math.isnan(std) else f"{mean:{spec}} ± {std:{std_spec}}"


def warm_up(attacks: list[Eq11], inputs: AttackInputs, batch_size: int,
            device: torch.device) -> None:
    """One short untimed run of every attack on the first and the last batch, so that no
    cell's time includes start-up (first calls, memory allocation, lazy initialisation, and
    with ``compile`` the compilation of both batch sizes)."""
    n = len(inputs.labels)
    for start in sorted({0, (n - 1) // batch_size * batch_size}):
        x = inputs.images[start:start + batch_size].to(device)
        t = inputs.targets[start:start + batch_size].to(device)
        y = inputs.labels[start:start + batch_size].to(device)
        for attack in attacks:
            attack.shortened(WARMUP_ITERATIONS)(x, t, y)


def run(model: torch.nn.Module, inputs: AttackInputs, *, iterations: int, alpha: float,
        beta: float, batch_size: int, device: torch.device, amp: str | None = None,
        channels_last: bool = False, pack_weights: bool = False, kappa: float = 20.0,
        quiet: bool = False, compile: str | None = None, exact_l1: bool = False,
        ce_seed: str = "exact") -> list[Cell]:
    """Runs the 8 configurations after a warm-up; returns one Cell per (step rule, loss).
    ``amp``, ``channels_last``, ``pack_weights``, ``compile``: see
    :class:`advfast.attacks.BaseAttack`;
    ``exact_l1``: the equal-perturbation cells add exactly beta per step where the box leaves
    room (the box-aware table); ``ce_seed``: the CE seed (see :class:`Eq11`)."""
    n = len(inputs.labels)
    starts = list(range(0, n, batch_size))
    cells = []
    rule = {"equal-multiplier": {"alpha": alpha},
            "equal-perturbation": {"beta": beta, "exact_l1": exact_l1}}
    attacks = {(step, loss): Eq11(model, loss=loss, step=step, **rule[step],
                                  iterations=iterations, kappa=kappa, amp=amp,
                                  channels_last=channels_last, pack_weights=pack_weights,
                                  record=True, compile=compile,
                                  ce_seed=ce_seed)
               for step in STEPS for loss in ops.LOSSES}
    warm_up(list(attacks.values()), inputs, batch_size, device)
    bar = tqdm(total=len(STEPS) * len(ops.LOSSES) * len(starts), desc="Table I", unit="batch",
               disable=quiet)
    for step in STEPS:
        for loss in ops.LOSSES:
            attack = attacks[(step, loss)]
            parts = []
            cell = Cell(step, loss, torch.empty(0), {}, {},
                        beta=beta if step == "equal-perturbation" else None)
            for s in starts:
                x = inputs.images[s:s + batch_size].to(device, non_blocking=True)
                t = inputs.targets[s:s + batch_size].to(device)
                y = inputs.labels[s:s + batch_size].to(device)
                result = attack(x, t, source=y)
                parts.append((result.first_flip.cpu(),
                              {k: v.cpu() for k, v in result.at_flip.items()},
                              {k: v.cpu() for k, v in result.trajectory.items()}))
                timing = result.timing
                cell.batch_seconds.append(timing.total_s)
                cell.batch_sizes.append(timing.batch_size)
                cell.per_iteration_ms.append(timing.per_iteration_ms)
                bar.set_postfix(step=step, loss=loss)
                bar.update()
            cell.first_flip = torch.cat([p[0] for p in parts])
            cell.at_flip = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
            cell.trajectory = {k: torch.cat([p[2][k] for p in parts], dim=1) for k in TRAJECTORY}
            cells.append(cell)
    bar.close()
    return cells


def format_table(cells: list[Cell], alpha: float, beta: float) -> str:
    """Table I as text: iterations to the first flip and time per image, mean +- std."""
    by = {(c.step, c.loss): c.summary() for c in cells}
    head = (f"{'':10}| {'Equal Multiplier (alpha=' + format(alpha, 'g') + ')':^44}"
            f"| {'Equal Perturbation (beta=' + format(beta, 'g') + ')':^44}")
    cols = f"{'Iterations':>13} {'Time (s)':>15} {'ms/it':>7} {'img/s':>7}"
    lines = [head, f"{'Loss':10}| {cols} | {cols}", "-" * len(head)]
    for loss in ops.LOSSES:
        row = f"{loss:10}"
        for step in STEPS:
            s = by[(step, loss)]
            flips = _plus_minus(s["iterations_mean"], s["iterations_std"], ".0f", ".0f")
            if s["flipped"] < 1:
                flips += f" ({100 * s['flipped']:.0f}%)"
            time = _plus_minus(s["time_per_image_s_mean"], s["time_per_image_s_std"], ".3g", ".1g")
            row += (f"| {flips:>13} {time:>15} {s['per_iteration_ms']:7.2f} "
                    f"{s['images_per_s']:7.1f} ")
        lines.append(row)
    lines.append("Iterations: to the first flip, over flipped samples (the share that flipped in "
                 "brackets when not all did). Time: for all iterations, per image (batch time / "
                 "batch size), mean ± std over batches; img/s: all images / all the time.")
    spread = max((by[k]["time_spread"] for k in by if not math.isnan(by[k]["time_spread"])),
                 default=math.nan)
    if spread > TIME_SPREAD_WARNING:
        lines.append(f"warning: the time per image varies by up to {spread:.0%} between equal "
                     "batches of one cell, so the time columns cannot be compared with each "
                     "other; rerun on an idle machine (or with --threads 1)")
    lines.append("L1 added per step / beta (equal perturbation, first "
                 f"{STEP_L1_ITERATIONS} iterations): " + ", ".join(
                     f"{loss} "
                     + _plus_minus(by[("equal-perturbation", loss)]["step_l1_over_beta"],
                                   math.nan, ".3f", "")
                     for loss in ops.LOSSES))
    lines += [format_paired(row) for row in paired_differences(cells)]
    return "\n".join(lines)


# The paper's ranking under equal perturbation (its Table I: CE 55 < logit 80 < M-logit 95 <
# CE-sign 116 iterations to the first flip); adjacent pairs are compared sample by sample.
PAPER_ORDER = ("ce", "logit", "m-logit", "ce-sign")


def paired_differences(cells: list[Cell]) -> list[dict]:
    """For each step rule and each adjacent pair (a, b) of PAPER_ORDER: the mean over the
    samples that flipped under both of first_flip(b) - first_flip(a), its standard error, n, and
    the verdict: "as the paper" (mean above 2 SE), "reversed" (below -2 SE) or "tie"."""
    by = {(c.step, c.loss): c.first_flip for c in cells}
    rows = []
    for step in STEPS:
        for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]):
            fa, fb = by[(step, a)], by[(step, b)]
            both = (fa >= 0) & (fb >= 0)
            d = (fb[both] - fa[both]).double()
            mean = float(d.mean()) if len(d) else math.nan
            se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.nan
            verdict = ("tie" if not mean > 2 * se and not mean < -2 * se
                       else "as the paper" if mean > 0 else "reversed")
            rows.append({"step": step, "a": a, "b": b, "n": len(d), "mean": mean, "se": se,
                         "verdict": verdict})
    return rows


def format_paired(row: dict) -> str:
    pair = f"{row['step']}: {row['b']} - {row['a']}"
    if math.isnan(row["se"]):
        return f"{pair}: n/a (n = {row['n']} samples flipped under both)"
    return (f"{pair} = {row['mean']:+.1f} ± {row['se']:.1f} iterations (paired SE, "
            f"n = {row['n']}): {row['verdict']}")


def write(cells: list[Cell], out: OutputFolder, config: dict,
          theorem_iv2: dict | None = None) -> None:
    """Writes table1.json (strict JSON: null where a value is missing; with ``theorem_iv2``,
    Theorem IV.2 measured along the inputs' trajectories, see
    :func:`advfast.experiments.theorem.for_table1`), table1.csv and samples.csv into ``out``."""
    summaries = [c.summary() for c in cells]
    extra = {} if theorem_iv2 is None else {"theorem_iv2": theorem_iv2}
    write_json(out.file("table1.json"), {"config": config, "results": summaries,
                                         "paired_differences": paired_differences(cells),
                                         **extra})
    write_durably(out.file("table1.csv"), lambda tmp: _write_summaries(tmp, summaries))
    write_durably(out.file("samples.csv"), lambda tmp: _write_samples(tmp, cells))


def _write_summaries(path: str, summaries: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)


def _write_samples(path: str, cells: list[Cell]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "sample", "first_flip", "l1_at_flip", "l2_at_flip",
                         "linf_at_flip"])
        for c in cells:
            for i in range(len(c.first_flip)):
                norms = (float(c.at_flip[k][i]) for k in ("l1", "l2", "linf"))
                writer.writerow([c.step, c.loss, i, int(c.first_flip[i]),
                                 *("" if math.isnan(v) else f"{v:.6g}" for v in norms)])
