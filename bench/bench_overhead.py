"""advfast's attack iteration against the floor in per-thread CPU time, on the digits default.

``advfast bench`` times in wall-clock time, which other tenants of a shared machine move by
+-10 % or more.  Here every configuration runs on one thread and is timed with
``time.thread_time`` (CPU time of this thread only), round-robin, and the cost of an iteration is
the difference of two run lengths over their difference in iterations, so that set-up and a
call's final check forward cancel out: "in the loop".  A whole call of the longer length is
reported too.  The floor is a bare forward + input backward; advfast is the paper's scheme (CE,
equal perturbation, every sample all iterations), recording on and off; torchattacks' BIM where
installed.

    python bench/bench_overhead.py [--batch 64] [--iterations 20 60] [--repeats 15] [--json F]
"""

from __future__ import annotations

import argparse
import json
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
            repeats: int) -> dict[str, dict[str, float]]:
    """Per configuration: median CPU ms per iteration in the loop and for a whole call."""
    short, long = lengths
    loop: dict[str, list[float]] = {name: [] for name in runs}
    call: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run(short)
    for _ in range(repeats):
        for name, run in runs.items():
            spent = []
            for n in (short, long):
                begin = time.thread_time()
                run(n)
                spent.append(time.thread_time() - begin)
            loop[name].append(1e3 * (spent[1] - spent[0]) / (long - short))
            call[name].append(1e3 * spent[1] / long)
    return {name: {"loop_ms": statistics.median(loop[name]),
                   "loop_ms_iqr": _iqr(loop[name]), "call_ms": statistics.median(call[name])}
            for name in runs}


def _iqr(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


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
    floor = figures["floor"]
    print(f"digits, batch {args.batch}, one thread, CPU time, {args.repeats} repeats")
    print("| configuration | in the loop ms/it (IQR) | vs floor | whole call ms/it | vs floor |")
    print("|---|---|---|---|---|")
    for name, f in figures.items():
        f["loop_vs_floor"] = f["loop_ms"] / floor["loop_ms"]
        f["call_vs_floor"] = f["call_ms"] / floor["call_ms"]
        lo, hi = f["loop_ms_iqr"]
        print(f"| {name} | {f['loop_ms']:.3f} ({lo:.3f}–{hi:.3f}) | {f['loop_vs_floor']:.3f}x "
              f"| {f['call_ms']:.3f} | {f['call_vs_floor']:.3f}x |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"batch": args.batch, "iterations": args.iterations,
                       "repeats": args.repeats, "figures": figures}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
