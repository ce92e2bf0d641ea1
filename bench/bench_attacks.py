"""The paper's three attacks against their peers, on the same inputs, targets and parameters.

* CW-L2: advfast.attacks.CarliniWagnerL2 against torchattacks' CW (which has no search over c:
  compared at one search step) and Foolbox 3's L2CarliniWagnerAttack (with the search).
* L-BFGS: advfast.attacks.LBFGS against the classic implementation, scipy's L-BFGS-B looping
  over samples (one sample at a time on the CPU, float64, the same bisection on b).
* IFGS: advfast.attacks.IFGS with stop="flip" and continuous batching against torchattacks' BIM.

For each: success rate (final image predicted as the target), median L2 of the successes,
seconds, and the time ratio peer / advfast, all in one run.  Settings: the digits default and
torchvision resnet18 (random weights, seeded) at 3x32x32.

    python bench/bench_attacks.py [--device cpu|cuda] [--json out.json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from advfast import attacks, ops
from advfast.engine.timing import hardware_info
from advfast.io import models, selection


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    images = fn()
    _sync(device)
    return images, time.perf_counter() - start


def summary(model, x0, target, images, seconds) -> dict:
    with torch.no_grad():
        ok = model(images).argmax(1) == target
    l2 = (images - x0).flatten(1).norm(dim=1)[ok]
    return {"success": float(ok.float().mean()), "median_l2": float(l2.median()) if len(l2)
            else float("nan"), "seconds": seconds}


def ours_cw(model, x0, target, p):
    return attacks.CarliniWagnerL2(model, c=p["c"], kappa=0.0, steps=p["steps"], lr=p["lr"],
                                   binary_search_steps=p["search"])(x0, target).adversarial


def torchattacks_cw(model, x0, target, p):
    import torchattacks

    attack = torchattacks.CW(model, c=p["c"], kappa=0.0, steps=p["steps"], lr=p["lr"])
    attack.set_mode_targeted_by_label(quiet=True)
    return attack(x0, target)


def foolbox_cw(model, x0, target, p):
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x0.device)
    attack = foolbox.attacks.L2CarliniWagnerAttack(
        binary_search_steps=p["search"], steps=p["steps"], stepsize=p["lr"], confidence=0,
        initial_const=p["c"], abort_early=True)
    _, images, _ = attack(fmodel, x0, foolbox.criteria.TargetedMisclassification(target),
                          epsilons=None)
    # Foolbox returns an all-zero image where it found nothing (its best starts at zeros), which
    # the model may well predict as the target; return the clean image there, as advfast does
    found = images.flatten(1).ne(0).any(1)
    return torch.where(found.view(-1, *[1] * (x0.dim() - 1)), images, x0)


def ours_lbfgs(model, x0, target, p):
    return attacks.LBFGS(model, b=p["b"], steps=p["steps"],
                         binary_search_steps=p["search"])(x0, target).adversarial


def scipy_lbfgs(model, x0, target, p):
    """The classic L-BFGS attack: per sample, scipy's L-BFGS-B on b ||x - x0||^2 + CE, with
    the same search on b (x10 / /10 until bracketed, then bisection), keeping the smallest
    successful perturbation."""
    from scipy.optimize import minimize

    out = x0.clone()
    for i in range(len(x0)):
        xi, ti = x0[i:i + 1], target[i:i + 1]

        def objective(flat, b):
            x = torch.tensor(flat, dtype=torch.float32, device=x0.device).view_as(xi)
            x.requires_grad_(True)
            f = b * ((x - xi) ** 2).sum() + torch.nn.functional.cross_entropy(model(x), ti)
            (g,) = torch.autograd.grad(f, x)
            return f.item(), g.double().cpu().numpy().ravel()

        b, lo, hi, best = p["b"], None, None, float("inf")
        for _ in range(p["search"]):
            res = minimize(objective, xi.double().cpu().numpy().ravel(), args=(b,), jac=True,
                           method="L-BFGS-B", bounds=[(0.0, 1.0)] * xi.numel(),
                           options={"maxiter": p["steps"]})
            x = torch.tensor(res.x, dtype=torch.float32, device=x0.device).view_as(xi)
            with torch.no_grad():
                success = bool(model(x).argmax(1) == ti)
            if success:
                l2 = float((x - xi).norm())
                if l2 < best:
                    best, out[i:i + 1] = l2, x
                lo = b if lo is None else max(lo, b)
            else:
                hi = b if hi is None else min(hi, b)
            b = (lo + hi) / 2 if lo is not None and hi is not None else (b * 10 if success
                                                                         else b / 10)
    return out


def ours_ifgs(model, x0, target, p):
    return attacks.IFGS(model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"], stop="flip",
                        compact_every=4)(x0, target).adversarial


def torchattacks_bim(model, x0, target, p):
    import torchattacks

    attack = torchattacks.BIM(model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"])
    attack.set_mode_targeted_by_label(quiet=True)
    return attack(x0, target)


def _installed(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def settings(device: torch.device, tiny: bool):
    digits = models.load("digits", device=device)
    n = 16 if tiny else 64
    chosen, _ = selection.prepare(digits, selection.DigitsSource("test"), n, seed=0,
                                  device=device)
    yield ("digits (1x8x8)", digits, chosen.images.to(device), chosen.targets.to(device),
           {"cw": dict(c=1e-2, steps=10 if tiny else 100, lr=1e-2, search=2 if tiny else 5),
            "cw1": dict(c=1.0, steps=10 if tiny else 100, lr=1e-2, search=1),
            "lbfgs": dict(b=1e-2, steps=10 if tiny else 50, search=2 if tiny else 6),
            "ifgs": dict(eps=0.3, alpha=0.01, steps=10 if tiny else 100)})
    resnet = models.load("resnet18", device=device).eval()
    n = 2 if tiny else 16
    noise = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        source = resnet(noise).argmax(1)
    target = (source + 1 + torch.randint(0, 999, (n,), generator=torch.Generator()
                                         .manual_seed(1)).to(device)) % 1000
    # random weights: nearly uniform logits over 1000 classes, so larger constants and steps
    yield ("resnet18 (3x32x32)", resnet, noise, target,
           {"cw": dict(c=1.0, steps=5 if tiny else 50, lr=5e-2, search=2 if tiny else 3),
            "cw1": dict(c=10.0, steps=5 if tiny else 50, lr=5e-2, search=1),
            "lbfgs": dict(b=1e-2, steps=5 if tiny else 30, search=2 if tiny else 4),
            "ifgs": dict(eps=0.1, alpha=0.01, steps=5 if tiny else 50)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"advfast attacks vs peers: device={device} backend={ops.backend()} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}\n")
    print("| setting | attack | parameters | implementation | success | median L2 | seconds | "
          "peer / advfast |")
    print("|---|---|---|---|---|---|---|---|")
    comparisons = [
        ("CW-L2, 1 search step", "cw1", ours_cw,
         [("torchattacks CW", "torchattacks", torchattacks_cw)]),
        ("CW-L2 with search", "cw", ours_cw, [("Foolbox L2CarliniWagner", "foolbox", foolbox_cw)]),
        ("L-BFGS", "lbfgs", ours_lbfgs, [("scipy L-BFGS-B per sample", "scipy", scipy_lbfgs)]),
        ("IFGS (stop=flip)", "ifgs", ours_ifgs, [("torchattacks BIM", "torchattacks",
                                                  torchattacks_bim)]),
    ]
    results = []
    for name, model, x0, target, params in settings(device, args.tiny):
        model.requires_grad_(False)
        for title, key, ours, peers in comparisons:
            p = params[key]
            shown = ", ".join(f"{k}={v:g}" for k, v in p.items())
            mine = summary(model, x0, target, *timed(lambda: ours(model, x0, target, p), device))
            rows = [("advfast", mine)]
            for peer, package, run in peers:
                if not _installed(package):
                    print(f"| {name} | {title} | {shown} | {peer} | not installed | | | |")
                    continue
                theirs = summary(model, x0, target,
                                 *timed(lambda run=run: run(model, x0, target, p), device))
                rows.append((peer, theirs))
            for impl, r in rows:
                ratio = "" if impl == "advfast" else f"{r['seconds'] / mine['seconds']:.1f}x"
                print(f"| {name} | {title} | {shown} | {impl} | {r['success']:.0%} | "
                      f"{r['median_l2']:.3f} | {r['seconds']:.2f} | {ratio} |", flush=True)
                results.append({"setting": name, "attack": title, "params": p,
                                "implementation": impl, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "hardware": hardware_info(device),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
