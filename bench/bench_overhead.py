"""advfast's attack iteration against the floor in per-thread CPU time, on the digits default.

``advfast bench`` times in wall-clock time, which other tenants of a shared machine move by
+-10 % or more.  Here every configuration runs on one thread and is timed with
``time.thread_time`` (CPU time of this thread only), round-robin, and the cost of an iteration is
the difference of two run lengths over their difference in iterations, so that set-up and a
call's final check forward cancel out: "in the loop".  Ratios to the floor are paired (the
same repeat), the order shuffled in each repeat.  A whole call of the longer length is
reported too.  The floor is a bare forward + input backward; advfast is the paper's scheme (CE,
equal perturbation, every sample all iterations), recording on and off; torchattacks' BIM where
installed.

    python bench/bench_overhead.py [--batch 64] [--iterations 20 60] [--repeats 15] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

import advfast
from advfast.engine import frozen
from advfast.io import models, selection


def configurations(model, x: torch.Tensor, t: torch.Tensor) -> dict[str, Callable[[int], None]]:
    """name -> run(n): n iterations of that configuration on (x, t)."""

    def floor(n: int) -> None:
        with frozen(model):
            for _ in range(n):
                xr = x.detach().requires_grad_(True)
                logits = model(xr)
                torch.autograd.grad(logits, xr, torch.ones_like(logits))

    runs = {"floor": floor}
    for record in (True, False):
        attack = advfast.Attack(model, loss="ce", beta=0.1, record=record, stop="never",
                                iterations=2, time_phases=False)
        runs[f"advfast, record {'on' if record else 'off'}"] = (
            lambda n, attack=attack: attack.shortened(n)(x, t))
    try:
        import torchattacks
    except ImportError:
        return runs
    bim = torchattacks.BIM(model, eps=0.3, alpha=0.01, steps=2)
    bim.set_mode_targeted_by_label(quiet=True)

    def peer(n: int) -> None:
        bim.steps = n
        bim(x, t)

    runs["torchattacks BIM"] = peer
    return runs


def measure(runs: dict[str, Callable[[int], None]], lengths: tuple[int, int],
            repeats: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per configuration: median CPU ms per iteration in the loop and for a whole call, and
    the median over repeats of its ratio to the floor in the same repeat, with a 95 % interval
    (order statistics).  The order of the configurations is shuffled in every repeat, so that
    load that drifts or recurs on the machine favours none of them."""
    short, long = lengths
    loop: dict[str, list[float]] = {name: [] for name in runs}
    call: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run(short)
    order = random.Random(seed)
    names = list(runs)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            spent = []
            for n in (short, long):
                begin = time.thread_time()
                runs[name](n)
                spent.append(time.thread_time() - begin)
            loop[name].append(1e3 * (spent[1] - spent[0]) / (long - short))
            call[name].append(1e3 * spent[1] / long)
    figures = {}
    for name in runs:
        ratios = sorted(a / b for a, b in zip(loop[name], loop["floor"]))
        figures[name] = {"loop_ms": statistics.median(loop[name]),
                         "call_ms": statistics.median(call[name]),
                         "loop_vs_floor": statistics.median(ratios),
                         "loop_vs_floor_ci95": _median_interval(ratios),
                         "call_vs_floor": statistics.median(
                             a / b for a, b in zip(call[name], call["floor"]))}
    return figures


def _median_interval(ordered: list[float]) -> list[float]:
    """A distribution-free 95 % interval of the median: order statistics n/2 -+ 0.98 sqrt(n)."""
    n = len(ordered)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(int(n / 2 - half), 0), min(int(math.ceil(n / 2 + half)), n - 1)
    return [ordered[lo], ordered[hi]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iterations", type=int, nargs=2, default=(20, 60))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = models.load("digits")
    chosen, _ = selection.prepare(model, selection.DigitsSource("test"), args.batch, seed=0)
    figures = measure(configurations(model, chosen.images, chosen.targets),
                      tuple(args.iterations), args.repeats)
    print(f"digits, batch {args.batch}, one thread, CPU time, {args.repeats} repeats")
    print("| configuration | in the loop ms/it | vs floor (95 % CI) | whole call ms/it "
          "| vs floor |")
    print("|---|---|---|---|---|")
    for name, f in figures.items():
        lo, hi = f["loop_vs_floor_ci95"]
        print(f"| {name} | {f['loop_ms']:.3f} | {f['loop_vs_floor']:.3f}x ({lo:.3f}–{hi:.3f}) "
              f"| {f['call_ms']:.3f} | {f['call_vs_floor']:.3f}x |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"batch": args.batch, "iterations": args.iterations,
                       "repeats": args.repeats, "figures": figures}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
