"""Generation throughput: continuous batching against fixed batches, in one process.

Both produce the same adversarial examples (same model, inputs, targets, stop rule "flip",
iteration cap, advfast's kernels); they differ only in scheduling:
  * fixed: each batch runs until its slowest sample has flipped (or the cap), finished
    samples idling in the batch; how torchattacks-style loops work;
  * continuous: ``Attack.stream`` hands finished samples back and refills their slots every
    ``--compact-every`` iterations.
Settings: the digits default, and torchvision resnet18 (random weights) on 3x64x64 noise.

    python bench/bench_generate.py [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import advfast
from advfast import ops
from advfast.engine import frozen
from advfast.io import models, selection


def fixed_batches(model, images, target, source, batch, iterations, beta) -> tuple[float, int]:
    """Seconds and flipped count for the fixed-batch loop."""
    start, flipped = time.perf_counter(), 0
    with frozen(model):
        for s in range(0, len(images), batch):
            x0, t, src = images[s:s + batch], target[s:s + batch], source[s:s + batch]
            x = x0.clone()
            done = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
            for _ in range(iterations + 1):
                xr = x.detach().requires_grad_(True)
                logits = model(xr)
                seed, head = ops.loss_head(logits.detach(), t, src, "ce", validate_indices=False)
                done |= head[:, ops.HEAD_STATS.index("hit")] > 0.5
                if bool(done.all()):  # the per-iteration check such loops make
                    break
                (grad,) = torch.autograd.grad(logits, xr, seed)
                with torch.no_grad():
                    ops.perturb_step_(x, grad, x0, sign=False, beta=beta, active=~done)
            flipped += int(done.sum())
    return time.perf_counter() - start, flipped


def continuous(model, images, target, source, batch, iterations, beta,
               compact_every: int) -> tuple[float, int]:
    attack = advfast.Attack(model, loss="ce", beta=beta, iterations=iterations, stop="flip",
                            record=False, compact_every=compact_every, time_phases=False)
    position = [0]

    def feed(k):
        s = position[0]
        if s >= len(images):
            return None
        position[0] = s + k
        idx = torch.arange(s, min(s + k, len(images)), device=images.device)
        return images[idx], target[idx], source[idx], idx

    start, flipped = time.perf_counter(), 0
    for done in attack.stream(feed, capacity=batch):
        flipped += int((done.first_flip >= 0).sum())
    return time.perf_counter() - start, flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compact-every", type=int, default=4)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_digits, n_resnet, size = (32, 4, 16) if args.tiny else (1024, 128, 64)
    settings = []
    digits = models.load("digits", device=device)
    chosen, _ = selection.prepare(digits, selection.DigitsSource("all"), n_digits, seed=0,
                                  device=device)
    settings.append(("digits (1x8x8)", digits, chosen.images.to(device),
                     chosen.labels.to(device), chosen.targets.to(device),
                     min(256, n_digits), 250, 0.1))
    torch.manual_seed(0)
    resnet = models.load("resnet18", device=device)
    noise = torch.rand(n_resnet, 3, size, size, device=device)
    with torch.no_grad():
        src = resnet(noise).argmax(1)
    settings.append((f"resnet18 (3x{size}x{size})", resnet, noise, src,
                     (src + 1 + torch.randint(0, 999, (n_resnet,), device=device)) % 1000,
                     min(32, n_resnet), 100, 20.0))
    print(f"advfast generation benchmark: device={device} backend={ops.backend()} "
          f"compact_every={args.compact_every}\n")
    print("| setting | N | batch | cap | fixed ex/s | continuous ex/s | speed-up | flipped "
          "(fixed / continuous) |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name, model, images, source, target, batch, iterations, beta in settings:
        t_fixed, f_fixed = fixed_batches(model, images, target, source, batch, iterations, beta)
        t_cont, f_cont = continuous(model, images, target, source, batch, iterations, beta,
                                    args.compact_every)
        n = len(images)
        print(f"| {name} | {n} | {batch} | {iterations} | {n / t_fixed:.1f} | {n / t_cont:.1f} | "
              f"{t_fixed / t_cont:.2f}x | {f_fixed} / {f_cont} |", flush=True)
        results.append({"setting": name, "n": n, "fixed_s": t_fixed, "continuous_s": t_cont,
                        "flipped_fixed": f_fixed, "flipped_continuous": f_cont})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
