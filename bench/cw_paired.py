"""CW-L2 with the search, advfast against Foolbox, alternated: per-thread CPU time, one thread.

The settings of bench/bench_attacks.py ("CW-L2 with search"); each repeat runs advfast, then
Foolbox, timed with ``time.thread_time`` so that other tenants' load counts less than in wall
time.  Prints, per setting, the median seconds, Foolbox / advfast per repeat, and each one's
success and median L2.

    python bench/cw_paired.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import bench_attacks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {"advfast": bench_attacks.ours_cw, "foolbox": bench_attacks.foolbox_cw}
    report = []
    for name, model, x0, target, params in bench_attacks.settings(torch.device("cpu"), False):
        model.requires_grad_(False)
        seconds: dict[str, list[float]] = {k: [] for k in runs}
        results = {}
        for _ in range(args.repeats):
            for key, run in runs.items():
                begin = time.thread_time()
                images = run(model, x0, target, params["cw"])
                seconds[key].append(time.thread_time() - begin)
                results[key] = bench_attacks.summary(model, x0, target, images, 0.0)
        ratios = [f / a for a, f in zip(seconds["advfast"], seconds["foolbox"])]
        row = {"setting": name, "params": params["cw"], "ratios_foolbox_over_advfast": ratios,
               **{k: {"median_s": statistics.median(v), "success": results[k]["success"],
                      "median_l2": results[k]["median_l2"]} for k, v in seconds.items()}}
        report.append(row)
        print(f"{name}: advfast {row['advfast']['median_s']:.2f} s, Foolbox "
              f"{row['foolbox']['median_s']:.2f} s; Foolbox / advfast "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; success / median L2: advfast "
              f"{row['advfast']['success']:.3f} / {row['advfast']['median_l2']:.3f}, Foolbox "
              f"{row['foolbox']['success']:.3f} / {row['foolbox']['median_l2']:.3f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
