"""perturb_step_ of this build against another build of advfast, processes alternated.

Each process times, on one thread in per-thread CPU time, every step variant of
bench/bench_ops.py at its shapes and one ``x.copy_(grad)`` (the memory floor) in turn, several
rounds, and reports each variant's time over the copy's of the same round; the parent runs a
process of the baseline build (a source tree built in place: ``python setup.py build_ext
--inplace``, imported through PYTHONPATH) and one of the installed build, alternately, so that
the machine's drift falls on both.  Printed: per shape and variant, the median ratio to the copy
for each build and the installed one's over the baseline's.

    python bench/ab_kernels.py --baseline /path/to/other/advfast [--pairs 6] [--json F]

``--this TREE`` times a second in-place tree instead of the installed build: two trees built
the same way (``ADVFAST_CUDA=0 python setup.py build_ext --inplace``) differ only in the code,
where the installed editable build with CUDA and an in-place CPU build differed by up to 14 % at
one shape with no change in the code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_ops import SHAPES, VARIANTS

EPS_VARIANTS = {"alpha-sign, eps (IFGS)": dict(sign=True, alpha=5e-4, eps=0.03)}


def child(rounds: int) -> None:
    """One process's figures: {"file": advfast's path, "ratios": {shape: {variant: [...]}}}."""
    import torch

    import advfast
    from advfast import ops

    torch.set_num_threads(1)
    variants = {**VARIANTS, **EPS_VARIANTS}
    out = {}
    for shape in SHAPES:
        x0, g = torch.rand(shape), torch.randn(shape)
        x, y = x0.clone(), torch.empty_like(x0)
        reps = max(5, int(1e7 / x0.numel()))
        calls = {"copy": lambda: y.copy_(g)}
        for name, p in variants.items():
            calls[name] = (lambda p=p: ops.perturb_step_(x, g, x0, **p))
        ratios: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            seconds = {}
            for name, call in calls.items():
                begin = time.thread_time()
                for _ in range(reps):
                    call()
                seconds[name] = time.thread_time() - begin
            x.copy_(x0)
            for name in variants:
                ratios[name].append(seconds[name] / seconds["copy"])
        out["x".join(map(str, shape))] = ratios
    print(json.dumps({"file": advfast.__file__, "ratios": out}))


def run_child(tree: str | None, rounds: int) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = tree
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(rounds)],
                          env=env, cwd=tree or here, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="source tree of the other build")
    parser.add_argument("--this", help="source tree of this build (default: the installed one)")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per process")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"baseline": [], "this": []}
    for _ in range(args.pairs):
        runs["baseline"].append(run_child(os.path.abspath(args.baseline), args.rounds))
        runs["this"].append(run_child(args.this and os.path.abspath(args.this), args.rounds))
    files = {key: {r["file"] for r in v} for key, v in runs.items()}
    if files["baseline"] & files["this"]:
        raise SystemExit(f"both builds imported the same advfast: {files}")
    report = {}
    for shape, variants in runs["this"][0]["ratios"].items():
        for name in variants:
            medians = {key: statistics.median(x for r in v for x in r["ratios"][shape][name])
                       for key, v in runs.items()}
            report[f"{shape} {name}"] = {**medians, "this_over_baseline":
                                         medians["this"] / medians["baseline"]}
            print(f"{shape} {name}: copy x {medians['baseline']:.2f} -> {medians['this']:.2f} "
                  f"({medians['this'] / medians['baseline']:.2f}x)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"pairs": args.pairs, "rounds": args.rounds, "files": {
                k: sorted(v) for k, v in files.items()}, "figures": report}, out, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        sys.exit(main())
