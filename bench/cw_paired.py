"""CW-L2 with the search, advfast against Foolbox, alternated: per-thread CPU time, one thread.

The settings of bench/bench_attacks.py ("CW-L2 with search").  Configurations: advfast as the
original algorithm; advfast with ``warm_start=True`` (each run of the search goes on from the
last one's end, a deviation from the original) at each fraction of the steps in --warm-steps;
with --bf16 each of these again under ``amp="bf16", channels_last=True``, and with
--compact-every at each cadence given (a search restarts a sample whose run ended, and the
finished leave, every ``compact_every`` iterations); Foolbox (fp32).  Each repeat runs every
configuration once, in turn, timed with ``time.thread_time`` so that other tenants' load counts
less than in wall time.  Per configuration: the median seconds, Foolbox / it per repeat, the
success, the median L2 of the successes, and the median L2 on the samples both it and Foolbox
succeed on over Foolbox's there.  Its result is "at least Foolbox's"
when its success is at most 1 point below Foolbox's and that L2 ratio at most 1.02.

    python bench/cw_paired.py [--repeats 5] [--warm-steps 1.0 0.4] [--bf16]
                               [--compact-every 8 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

import bench_attacks
from advfast import attacks

Run = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def variants(bf16: bool, compact_every: list[int]) -> dict[str, dict]:
    """Name suffix -> engine options of advfast's configurations: fp32 (and bf16 with
    channels_last), at the attack's default ``compact_every`` or at each one given."""
    precisions = {"": {}}
    if bf16:
        precisions[", bf16 + channels_last"] = {"amp": "bf16", "channels_last": True}
    cadences = {f", compact_every {k}": {"compact_every": k} for k in compact_every} or {"": {}}
    return {p + c: {**precision, **cadence} for p, precision in precisions.items()
            for c, cadence in cadences.items()}


def configurations(params: dict, fractions: list[float],
                   options: dict[str, dict]) -> dict[str, Run]:
    """name -> run(model, x0, target) for the setting's CW parameters, each advfast
    configuration once per entry of ``options`` (:func:`variants`)."""

    def advfast(steps: int, warm: bool, engine: dict) -> Run:
        def run(model, x0, target):
            return attacks.CarliniWagnerL2(
                model, c=params["c"], kappa=0.0, steps=steps, lr=params["lr"],
                binary_search_steps=params["search"], warm_start=warm,
                **engine)(x0, target).adversarial
        return run

    runs = {}
    for suffix, engine in options.items():
        runs["advfast" + suffix] = advfast(params["steps"], False, engine)
        for fraction in fractions:
            steps = max(1, round(params["steps"] * fraction))
            name = f"advfast, warm start, {steps} steps{suffix}"
            if name in runs:
                raise SystemExit(f"--warm-steps: {fraction} gives {steps} steps again")
            runs[name] = advfast(steps, True, engine)
    runs["foolbox"] = lambda model, x0, target: bench_attacks.foolbox_cw(model, x0, target,
                                                                         params)
    return runs


def outcome(model, x0, target, images) -> tuple[torch.Tensor, torch.Tensor]:
    """(success [B] bool, L2 [B]) of returned images."""
    with torch.no_grad():
        ok = model(images).argmax(1) == target
    return ok, (images - x0).flatten(1).norm(dim=1)


def compare(ours: tuple, peer: tuple) -> dict:
    """Success, median L2 of the successes, and the median L2 on the samples both succeed on
    relative to the peer's there."""
    (ok, l2), (peer_ok, peer_l2) = ours, peer
    both = ok & peer_ok
    # None where there is nothing to take a median of (strict JSON has no NaN)
    ratio = float(l2[both].median() / peer_l2[both].median()) if both.any() else None
    success = float(ok.float().mean())
    return {"success": success, "median_l2": float(l2[ok].median()) if ok.any() else None,
            "both_succeed": int(both.sum()), "l2_on_both_vs_foolbox": ratio,
            "at_least_foolbox": ratio is not None and ratio <= 1.02
            and success >= float(peer_ok.float().mean()) - 0.01}


def measure(model, x0, target, runs: dict[str, Run], repeats: int) -> dict:
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    outcomes = {}
    for _ in range(repeats):
        for key, run in runs.items():
            begin = time.thread_time()
            images = run(model, x0, target)
            seconds[key].append(time.thread_time() - begin)
            outcomes[key] = outcome(model, x0, target, images)  # deterministic: the last
    rows = {}
    for key in runs:
        ratios = [f / a for a, f in zip(seconds[key], seconds["foolbox"])]
        rows[key] = {"median_s": statistics.median(seconds[key]),
                     "foolbox_over_this": ratios, **compare(outcomes[key], outcomes["foolbox"])}
    return rows


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-steps", type=float, nargs="*", default=[1.0, 0.4],
                        help="fractions of the steps to run advfast's warm start at")
    parser.add_argument("--bf16", action="store_true",
                        help="also run advfast's configurations in bf16 with channels_last")
    parser.add_argument("--compact-every", type=int, nargs="*", default=[],
                        help="run advfast's configurations at each of these compact_every "
                             "(default: the attack's own)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = []
    for name, model, x0, target, params in bench_attacks.settings(torch.device("cpu"), False):
        model.requires_grad_(False)
        runs = configurations(params["cw"], args.warm_steps,
                              variants(args.bf16, args.compact_every))
        rows = measure(model, x0, target, runs, args.repeats)
        report.append({"setting": name, "params": params["cw"], "configurations": rows})
        print(f"{name}:")
        for key, r in rows.items():
            print(f"  {key}: {r['median_s']:.2f} s, Foolbox / it "
                  f"{', '.join(f'{x:.2f}' for x in r['foolbox_over_this'])}; success "
                  f"{r['success']:.3f}, median L2 {_shown(r['median_l2'])}, on the "
                  f"{r['both_succeed']} both succeed on {_shown(r['l2_on_both_vs_foolbox'])}x "
                  f"Foolbox's; result at least Foolbox's: {r['at_least_foolbox']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
