"""CW-L2 with the search, advfast against Foolbox, alternated: per-thread CPU time, one thread.

The settings of bench/bench_attacks.py ("CW-L2 with search").  Configurations: advfast as the
original algorithm; advfast with ``warm_start=True`` (each run of the search goes on from the
last one's end, a deviation from the original) at each fraction of the steps in --warm-steps;
with --bf16 each of these again under ``amp="bf16", channels_last=True``, with --pack-weights
each again with ``pack_weights=True`` (its conv weights laid out once per call), and with
--compact-every at each cadence given (a search restarts a sample whose run ended, and the
finished leave, every ``compact_every`` iterations); Foolbox (fp32).  Each repeat runs every
configuration once, in turn, timed with ``time.thread_time`` so that other tenants' load counts
less than in wall time.  Per configuration: the median seconds, Foolbox / it per repeat, the
success, the median L2 of the successes, and the median L2 on the samples both it and Foolbox
succeed on over Foolbox's there.  Its result is "at least Foolbox's"
when its success is at most 1 point below Foolbox's and that L2 ratio at most 1.02.  Also the
model's calls and rows in each (bench/batch_cost.py's counter), and with --cost-model the time
those predict by the model's cost per call and per row, fitted in the same process (fp32).

    python bench/cw_paired.py [--repeats 5] [--warm-steps 1.0 0.4] [--bf16] [--pack-weights]
                               [--compact-every 8 1] [--cost-model] [--only resnet18]
                               [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import batch_cost
import bench_attacks
from advfast import attacks
from advfast.io.files import write_json

Run = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def variants(bf16: bool, compact_every: list[int], pack: bool = False) -> dict[str, dict]:
    """Name suffix -> engine options of advfast's configurations: fp32 (and bf16 with
    channels_last), each also with its weights packed (``pack``), at the attack's default
    ``compact_every`` or at each one given."""
    precisions = {"": {}}
    if bf16:
        precisions[", bf16 + channels_last"] = {"amp": "bf16", "channels_last": True}
    if pack:
        precisions.update({f"{p}, packed": {**o, "pack_weights": True}
                           for p, o in precisions.items()})
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
    outcomes, counts = {}, {}
    for _ in range(repeats):
        for key, run in runs.items():
            with batch_cost.Counter(model) as counter:
                begin = time.thread_time()
                images = run(model, x0, target)
                seconds[key].append(time.thread_time() - begin)
            # deterministic: the last repeat's
            outcomes[key] = outcome(model, x0, target, images)
            counts[key] = counter.figures()
    rows = {}
    for key in runs:
        ratios = [f / a for a, f in zip(seconds[key], seconds["foolbox"])]
        rows[key] = {"median_s": statistics.median(seconds[key]),
                     "foolbox_over_this": ratios, **counts[key],
                     **compare(outcomes[key], outcomes["foolbox"])}
    return rows


def cost_model(model, x0: torch.Tensor, repeats: int) -> dict[str, float]:
    """The model's call cost on these inputs, fitted at batch sizes 1, 2, 4, ... up to the
    setting's (:mod:`batch_cost`): with the input gradient (steps) and without (checks)."""
    sizes = [2 ** k for k in range(len(x0).bit_length()) if 2 ** k < len(x0)] + [len(x0)]
    fits = {}
    for grad in (True, False):
        fixed, per_row = batch_cost.fit(batch_cost.measure(model, tuple(x0.shape[1:]), sizes,
                                                           repeats, grad))
        fits.update({f"{'step' if grad else 'check'}_fixed_s": fixed,
                     f"{'step' if grad else 'check'}_per_row_s": per_row})
    return fits


def predicted_seconds(fits: dict[str, float], counts: dict) -> float:
    """What a configuration's calls and rows cost by the fitted model alone."""
    return (fits["step_fixed_s"] * counts["calls"] + fits["step_per_row_s"] * counts["rows"]
            + fits["check_fixed_s"] * counts["checks"]
            + fits["check_per_row_s"] * counts["check_rows"])


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-steps", type=float, nargs="*", default=[1.0, 0.4],
                        help="fractions of the steps to run advfast's warm start at")
    parser.add_argument("--bf16", action="store_true",
                        help="also run advfast's configurations in bf16 with channels_last")
    parser.add_argument("--pack-weights", action="store_true",
                        help="also run each of advfast's configurations with pack_weights")
    parser.add_argument("--only", help="the settings whose name starts with this "
                                       "(digits, resnet18; default: both)")
    parser.add_argument("--compact-every", type=int, nargs="*", default=[],
                        help="run advfast's configurations at each of these compact_every "
                             "(default: the attack's own)")
    parser.add_argument("--cost-model", action="store_true",
                        help="also fit the model's cost per call and per row and give each "
                             "configuration's time as its calls and rows predict it")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = []
    for name, model, x0, target, params in bench_attacks.settings(torch.device("cpu"), False):
        if args.only and not name.startswith(args.only):
            continue
        model.requires_grad_(False)
        runs = configurations(params["cw"], args.warm_steps,
                              variants(args.bf16, args.compact_every, args.pack_weights))
        rows = measure(model, x0, target, runs, args.repeats)
        fits = cost_model(model, x0, args.repeats) if args.cost_model else None
        report.append({"setting": name, "params": params["cw"], "configurations": rows,
                       **({"cost_model": fits} if fits else {})})
        print(f"{name}:" + (f" a step costs {fits['step_fixed_s'] * 1e3:.1f} ms a call + "
                            f"{fits['step_per_row_s'] * 1e3:.2f} ms a row" if fits else ""))
        for key, r in rows.items():
            if fits and "bf16" not in key and "packed" not in key:  # the fp32 model's fit
                r["predicted_s"] = predicted_seconds(fits, r)
            print(f"  {key}: {r['median_s']:.2f} s, Foolbox / it "
                  f"{', '.join(f'{x:.2f}' for x in r['foolbox_over_this'])}; success "
                  f"{r['success']:.3f}, median L2 {_shown(r['median_l2'])}, on the "
                  f"{r['both_succeed']} both succeed on {_shown(r['l2_on_both_vs_foolbox'])}x "
                  f"Foolbox's; result at least Foolbox's: {r['at_least_foolbox']}; "
                  f"{r['calls']} calls of {r['rows']} rows, {r['checks']} checks of "
                  f"{r['check_rows']}" + (f"; predicted {r['predicted_s']:.2f} s"
                                          if "predicted_s" in r else ""))
    if args.json:
        write_json(args.json, report)  # strict JSON, written durably
    return 0


if __name__ == "__main__":
    sys.exit(main())
