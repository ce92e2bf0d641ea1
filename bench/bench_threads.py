"""Is the default thread count fast on a shared machine?  Times one ``advfast attack`` with the
default threads and with every ``--threads`` choice, on an idle machine and under a load this
script makes itself (busy processes, one per ``--load``), round-robin, medians.

The default must stay within 1.2x of the best choice in both (issue "A newcomer's first hour").
The load is started ``--settle`` seconds before the timed runs, so that the 1-minute load
average the default reads has risen (it follows the load with a one-minute time constant).

    python bench/bench_threads.py [--load 4] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ATTACK = ["attack", "--n", "128", "--iterations", "100", "--quiet", "--overwrite"]


def busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def timed(threads: int | None, out: str) -> float:
    argv = [sys.executable, "-m", "advfast", *ATTACK, "--out", out]
    if threads is not None:
        argv += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                            "OMP_WAIT_POLICY")}
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(choices: list[int | None], repeats: int, out: str) -> dict[str, float]:
    times: dict[str, list[float]] = {str(c or "default"): [] for c in choices}
    for _ in range(repeats):  # round-robin: drift in the machine's state hits every choice
        for c in choices:
            times[str(c or "default")].append(timed(c, out))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=int, default=4, help="busy processes for the loaded run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds between starting the load and the timed runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    choices = [None, *range(1, cores + 1)]
    report = {"cores": cores, "attack": ATTACK, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        timed(1, out)  # trains the digits model once, outside the timed runs
        report["idle"] = measure(choices, args.repeats, out)
        load = busy(args.load)
        try:
            time.sleep(args.settle)
            report["loaded"] = measure(choices, args.repeats, out)
            report["load_average"] = os.getloadavg()[0]
        finally:
            for p in load:
                p.kill()
    for state in ("idle", "loaded"):
        cells = report[state]
        best = min(v for k, v in cells.items() if k != "default")
        report[f"{state}_default_over_best"] = cells["default"] / best
        print(f"{state:>6}: " + ", ".join(f"{k} {v:.2f} s" for k, v in cells.items())
              + f"; default / best = {cells['default'] / best:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
