"""What glibc's default heap policy costs an attack on the CPU, and what keep_freed_memory saves.

By default glibc maps blocks of 128 KiB or more afresh and hands freed memory at the heap's top
back to the kernel, so every iteration of an attack page-faults its activations in again.
``advfast.engine.runtime.keep_freed_memory`` (which the command line calls) keeps that memory in
the process.  The policy is process-wide, so each measurement is its own process: the two
policies alternate, process after process, and each process times the same attack (the
digits default: CE, equal perturbation, recording on, every sample all iterations, one thread)
in per-thread CPU time, with the part of it spent in the kernel (system time, where page
faults are served; it is measured within each process, so other processes' noise does not
reach it) and its minor page faults per iteration.  The ratio is paired (one
process of each policy per pair), with a 95 % interval over the pairs.

    python bench/bench_malloc.py [--pairs 6] [--batch 64] [--iterations 100] [--json F]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

POLICIES = ("glibc default", "keep_freed_memory")


def child(policy: str, batch: int, iterations: int, calls: int = 6) -> dict[str, float]:
    """One process's figures: median ms per iteration over ``calls`` calls, faults per
    iteration, and whether the policy applied."""
    from advfast.engine.runtime import keep_freed_memory
    applied = keep_freed_memory() if policy == POLICIES[1] else False

    import torch

    import advfast
    from advfast.io import models, selection
    torch.set_num_threads(1)
    model = models.load("digits")
    chosen, _ = selection.prepare(model, selection.DigitsSource("test"), batch, seed=0)
    attack = advfast.Attack(model, loss="ce", beta=0.1, record=True, stop="never",
                            iterations=iterations, time_phases=False)
    attack(chosen.images, chosen.targets)  # warm-up
    spent, in_kernel = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        begin, kernel = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_stime
        attack(chosen.images, chosen.targets)
        spent.append(time.thread_time() - begin)
        in_kernel.append(resource.getrusage(resource.RUSAGE_THREAD).ru_stime - kernel)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"ms_per_iteration": 1e3 * statistics.median(spent) / iterations,
            "kernel_ms_per_iteration": 1e3 * statistics.median(in_kernel) / iterations,
            "faults_per_iteration": faults / (calls * iterations), "applied": applied}


def _run_child(policy: str, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", policy, "--batch", str(args.batch),
                          "--iterations", str(args.iterations)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.iterations)))
        return 0
    from bench_overhead import _median_interval  # the parent only: it measures nothing
    runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    for pair in range(args.pairs):
        order = POLICIES if pair % 2 == 0 else POLICIES[::-1]
        for policy in order:
            runs[policy].append(_run_child(policy, args))
    if not all(r["applied"] for r in runs[POLICIES[1]]):
        print("keep_freed_memory did not apply here (not glibc, or glibc's malloc variables "
              "are set): nothing to compare", file=sys.stderr)
        return 1
    ratios = sorted(k["ms_per_iteration"] / d["ms_per_iteration"]
                    for d, k in zip(*runs.values()))
    figures = {policy: {key: statistics.median(r[key] for r in rs)
                        for key in ("ms_per_iteration", "kernel_ms_per_iteration",
                                    "faults_per_iteration")}
               for policy, rs in runs.items()}
    figures["time_ratio"] = {"median": statistics.median(ratios), "ci95": _median_interval(ratios),
                             "pairs": args.pairs}
    print(f"digits, batch {args.batch}, {args.iterations} iterations, one thread, CPU time, "
          f"{args.pairs} pairs of processes")
    print("| heap policy | ms per iteration | of which in the kernel | page faults per iteration "
          "|\n|---|---|---|---|")
    for policy in POLICIES:
        f = figures[policy]
        print(f"| {policy} | {f['ms_per_iteration']:.3f} | {f['kernel_ms_per_iteration']:.3f} "
              f"| {f['faults_per_iteration']:.1f} |")
    lo, hi = figures["time_ratio"]["ci95"]
    print(f"keep_freed_memory / default: {figures['time_ratio']['median']:.3f}x "
          f"(95 % interval {lo:.3f}-{hi:.3f})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
