"""How many tensor operations does one attack iteration dispatch, beside the model's forward and
backward?  Counts every ATen op under a TorchDispatchMode for an iteration of the engine (the
paper's scheme, recording off and on, and CW-L2) and for the bare forward + input backward (the
floor), on the digits default; the difference is advfast's own work (loss head, step,
bookkeeping; for CW also its search's rules and boundary, every 8 iterations).  On a GPU each
op is at least one kernel launch, which is why the count matters for small models.

    python bench/count_ops.py [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import advfast
from advfast import attacks
from advfast.engine import frozen
from advfast.io import models, selection


class Count(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def per_iteration(fn, iterations: tuple[int, int]) -> float:
    """Ops per iteration: the count of ``fn(b)`` minus that of ``fn(a)``, over b - a, so that the
    set-up and the final check forward of a call cancel out."""
    (a, b), counts = iterations, []
    for n in (a, b):
        with Count() as mode:
            fn(n)
        counts.append(sum(mode.ops.values()))
    return (counts[1] - counts[0]) / (b - a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", help="also write the counts here")
    args = parser.parse_args()
    model = models.load("digits")
    chosen, _ = selection.prepare(model, selection.DigitsSource("test"), args.batch, seed=0)
    x, t = chosen.images, chosen.targets

    def floor(n: int) -> None:
        with frozen(model):
            for _ in range(n):
                xr = x.detach().requires_grad_(True)
                logits = model(xr)
                torch.autograd.grad(logits, xr, torch.ones_like(logits))

    report = {"batch": args.batch, "floor": per_iteration(floor, (2, 6))}
    for record in (False, True):
        attack = advfast.Attack(model, loss="ce", beta=0.1, record=record, stop="never",
                                iterations=2)

        def run(n: int, attack=attack) -> None:
            attack.shortened(n)(x, t)

        total = per_iteration(run, (2, 6))
        report[f"record_{'on' if record else 'off'}"] = {
            "ops_per_iteration": total, "own_ops_per_iteration": total - report["floor"]}
    def cw(n: int) -> None:  # one run of n steps per sample, every sample stepping throughout
        # the GPU's default cadence (the CPU's is 1), where each op is a launch
        attacks.CarliniWagnerL2(model, steps=n, binary_search_steps=1, abort_early=False,
                                compact_every=8)(x, t)

    total = per_iteration(cw, (8, 24))  # multiples of the search's boundary (every 8)
    report["cw_l2"] = {"ops_per_iteration": total,
                       "own_ops_per_iteration": total - per_iteration(floor, (8, 24))}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
