"""Where CW-L2's iterations go: per search step, the Adam steps spent and whether they changed
a sample's result.

advfast's CarliniWagnerL2 treats every sample on its own (its search, abort and restarts), so
the run with k search steps is the first k steps of the run with more: running k = 1..S and
differencing gives, per search step, the steps each sample spent and whether its best L2 (or
its success) changed.  Reported: the share of all Adam steps spent in search steps that changed
nothing, split by whether the sample had already succeeded, on the settings of
bench/bench_attacks.py ("CW-L2 with search").

    python bench/cw_iterations.py [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from advfast import attacks
from advfast.io import models, selection


def settings(device: torch.device):
    digits = models.load("digits", device=device)
    chosen, _ = selection.prepare(digits, selection.DigitsSource("test"), 64, seed=0,
                                  device=device)
    yield ("digits (1x8x8)", digits, chosen.images.to(device), chosen.targets.to(device),
           dict(c=1e-2, steps=100, lr=1e-2, search=5))
    resnet = models.load("resnet18", device=device).eval()
    x0 = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        source = resnet(x0).argmax(1)
    target = (source + 1 + torch.randint(0, 999, (16,), generator=torch.Generator()
                                         .manual_seed(1)).to(device)) % 1000
    yield "resnet18 (3x32x32)", resnet, x0, target, dict(c=1.0, steps=50, lr=5e-2, search=3)


def prefixes(model, x0, target, p: dict) -> list[dict]:
    """Per k = 1..search: each sample's total steps, best squared L2 (inf: no success)."""
    out = []
    for k in range(1, p["search"] + 1):
        result = attacks.CarliniWagnerL2(model, c=p["c"], steps=p["steps"], lr=p["lr"],
                                         binary_search_steps=k)(x0, target)
        with torch.no_grad():
            ok = model(result.adversarial).argmax(1) == target
        l2 = (result.adversarial - x0).flatten(1).square().sum(1)
        out.append({"steps": result.steps.cpu(), "l2": torch.where(ok, l2, torch.inf).cpu()})
    return out


def where(runs: list[dict]) -> dict:
    """Steps per search step, split into: changed the result, no change before any success,
    no change after a success."""
    changed = idle_before = idle_after = 0
    previous_steps = torch.zeros_like(runs[0]["steps"])
    previous_l2 = torch.full_like(runs[0]["l2"], torch.inf)
    per_step = []
    for run in runs:
        spent = run["steps"] - previous_steps
        moved = run["l2"] < previous_l2
        had = torch.isfinite(previous_l2)
        changed += int(spent[moved].sum())
        idle_before += int(spent[~moved & ~had].sum())
        idle_after += int(spent[~moved & had].sum())
        per_step.append({"steps": int(spent.sum()), "samples_improved": int(moved.sum())})
        previous_steps, previous_l2 = run["steps"], torch.minimum(previous_l2, run["l2"])
    total = changed + idle_before + idle_after
    return {"total_steps": total, "changed": changed / total,
            "unchanged_before_success": idle_before / total,
            "unchanged_after_success": idle_after / total, "per_search_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    print("| setting | Adam steps | in search steps that improved a result | unchanged, "
          "no success yet | unchanged, after a success | improved per search step |")
    print("|---|---|---|---|---|---|")
    for name, model, x0, target, p in settings(device):
        model.requires_grad_(False)
        w = where(prefixes(model, x0, target, p))
        per = ", ".join(str(s["samples_improved"]) for s in w["per_search_step"])
        print(f"| {name} | {w['total_steps']} | {w['changed']:.0%} | "
              f"{w['unchanged_before_success']:.0%} | {w['unchanged_after_success']:.0%} | "
              f"{per} of {len(x0)} |", flush=True)
        results.append({"setting": name, "params": p, **w})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
