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

Finer, for advfast against the floor only: "interleaved" alternates a few iterations of the
floor with a few of the engine's own iteration (``Engine.iterate``, the loop of a fixed-batch
call) on the same rows, round after round, so that drifting load cancels within each round's
ratio; beside them the floor with loss_head, and with loss_head and the step, so that what each
of advfast's ops adds shows (observe_ and advance_ are the rest).  Like the command line, the
script first keeps freed memory in the process (``keep_freed_memory``): with glibc's default
every configuration page-faults its activations in again, by an amount that depends on the
heap's state, not on the configuration.

    python bench/bench_overhead.py [--batch 64] [--iterations 20 60] [--repeats 15]
                                   [--rounds 200] [--per-round 10] [--pack-weights] [--json F]
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
from advfast.engine import frozen, start_rows
from advfast.engine.runtime import keep_freed_memory
from advfast.io import models, selection


def configurations(model, x: torch.Tensor, t: torch.Tensor,
                   pack: bool = False) -> dict[str, Callable[[int], None]]:
    """name -> run(n): n iterations of that configuration on (x, t); with ``pack`` also
    advfast with recording and ``pack_weights`` (its conv weights laid out once per call)."""

    iteration = _floor_iteration(model, x)

    def floor(n: int) -> None:
        with frozen(model):
            for _ in range(n):
                iteration()

    runs = {"floor": floor}
    for record in (True, False):
        attack = advfast.Attack(model, loss="ce", beta=0.1, record=record, stop="never",
                                iterations=2, time_phases=False)
        runs[f"advfast, record {'on' if record else 'off'}"] = (
            lambda n, attack=attack: attack.shortened(n)(x, t))
    if pack:
        packed = advfast.Attack(model, loss="ce", beta=0.1, record=True, stop="never",
                                iterations=2, time_phases=False, pack_weights=True)
        runs["advfast, record on, packed"] = lambda n: packed.shortened(n)(x, t)
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
    return {name: {"loop_ms": statistics.median(loop[name]),
                   "call_ms": statistics.median(call[name]),
                   **_vs_floor(loop[name], loop["floor"]),
                   "call_vs_floor": statistics.median(
                       a / b for a, b in zip(call[name], call["floor"]))}
            for name in runs}


def interleaved(model, x: torch.Tensor, t: torch.Tensor, rounds: int,
                per_round: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    """advfast's engine iteration (recording on and off) against the floor: in every round
    ``per_round`` iterations of each, in shuffled order; per configuration the median over
    rounds of its time over the floor's in the same round, with a 95 % interval."""
    steps = {"floor": _floor_iteration(model, x)}
    with frozen(model):
        source = model(x).argmax(dim=1)
        for record in (True, False):  # the partial iterations below share the last rows
            attack = advfast.Attack(model, loss="ce", beta=0.1, record=record, stop="never",
                                    iterations=(rounds + 2) * per_round, time_phases=False)
            engine = attack._engine(x.device, attack.parts(deferred=False), batch=len(x))
            rows = engine.begin(start_rows(torch.arange(len(x)), x, t, source))
            steps[f"advfast, record {'on' if record else 'off'}"] = (
                lambda engine=engine, rows=rows: engine.iterate(rows, 0, controlled=False))
        steps.update(_partial_iterations(model, engine, rows))
        spent: dict[str, list[float]] = {name: [] for name in steps}
        names, order = list(steps), random.Random(seed)
        for r in range(rounds + 1):  # round 0 warms up
            order.shuffle(names)
            for name in names:
                begin = time.thread_time()
                for _ in range(per_round):
                    steps[name]()
                if r:
                    spent[name].append(time.thread_time() - begin)
    return {name: {"loop_ms": 1e3 * statistics.median(spent[name]) / per_round,
                   **_vs_floor(spent[name], spent["floor"])}
            for name in steps}


def _vs_floor(times: list[float], floor: list[float]) -> dict[str, object]:
    """The median of the paired ratios times / floor and its 95 % interval."""
    ratios = sorted(a / b for a, b in zip(times, floor))
    return {"loop_vs_floor": statistics.median(ratios),
            "loop_vs_floor_ci95": _median_interval(ratios)}


def _partial_iterations(model, engine, rows) -> dict[str, Callable[[], None]]:
    """The floor with advfast's ops added one at a time, to show what each costs in the loop:
    the loss head's seed instead of ones, then the step (the bookkeeping ops are the rest of
    the engine's iteration)."""
    h = engine.head

    def head_only() -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(rows.x)
        seed, head = advfast.ops.loss_head_unchecked(
            logits.detach(), rows.target, rows.source, h.loss, h.kappa, h.kappa_mode,
            h.threshold, h.ce_seed)
        return torch.autograd.grad(logits, rows.x, seed)[0], head

    def with_step() -> None:
        grad, head = head_only()
        with torch.no_grad():
            engine.optimizer.step(rows, grad, head, None)

    return {"floor + loss_head": head_only, "floor + loss_head + perturb_step_": with_step}


def _floor_iteration(model, x: torch.Tensor) -> Callable[[], None]:
    def floor() -> None:
        xr = x.detach().requires_grad_(True)
        logits = model(xr)
        torch.autograd.grad(logits, xr, torch.ones_like(logits))
    return floor


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
    parser.add_argument("--rounds", type=int, default=200,
                        help="rounds of the interleaved measurement (0: none)")
    parser.add_argument("--per-round", type=int, default=10,
                        help="iterations of each configuration per round")
    parser.add_argument("--pack-weights", action="store_true",
                        help="also advfast with pack_weights (differenced measure only)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    kept = keep_freed_memory()
    torch.set_num_threads(1)
    model = models.load("digits")
    chosen, _ = selection.prepare(model, selection.DigitsSource("test"), args.batch, seed=0)
    figures = measure(configurations(model, chosen.images, chosen.targets, args.pack_weights),
                      tuple(args.iterations), args.repeats)
    print(f"digits, batch {args.batch}, one thread, CPU time, {args.repeats} repeats")
    print("| configuration | in the loop ms/it | vs floor (95 % CI) | whole call ms/it "
          "| vs floor |")
    print("|---|---|---|---|---|")
    for name, f in figures.items():
        lo, hi = f["loop_vs_floor_ci95"]
        print(f"| {name} | {f['loop_ms']:.3f} | {f['loop_vs_floor']:.3f}x ({lo:.3f}–{hi:.3f}) "
              f"| {f['call_ms']:.3f} | {f['call_vs_floor']:.3f}x |")
    fine = (interleaved(model, chosen.images, chosen.targets, args.rounds, args.per_round)
            if args.rounds else {})
    if fine:
        print(f"\ninterleaved, {args.rounds} rounds of {args.per_round} iterations each")
        print("| configuration | in the loop ms/it | vs floor (95 % CI) |\n|---|---|---|")
        for name, f in fine.items():
            lo, hi = f["loop_vs_floor_ci95"]
            print(f"| {name} | {f['loop_ms']:.3f} | {f['loop_vs_floor']:.4f}x "
                  f"({lo:.4f}–{hi:.4f}) |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"batch": args.batch, "iterations": args.iterations,
                       "repeats": args.repeats, "rounds": args.rounds,
                       "per_round": args.per_round,
                       "freed_memory_kept": kept, "figures": figures, "interleaved": fine},
                      out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
