"""Attack-engine benchmark: per-iteration time of ``advfast.Attack`` divided by a bare
forward + backward w.r.t. the input (the floor any gradient attack pays), in one process.

For each loss, recording on and off, on a torchvision model (random weights; default resnet18
at 3x64x64 batch 32 and 3x224x224 batch 8); torchattacks' BIM joins the same run when it is
installed.
Configurations are timed round-robin, ``--repeats`` times, and the median is reported.  On a
noisy machine the ratios move by a few percent from run to run, so the engine's own work
(loss head + update + recording, timed inside the loop) is also reported as a share of the
floor: that is the part advfast adds.

    python bench/bench_attack.py [--device cpu|cuda] [--iterations 10] [--json out.json]
        [--model resnet50 --shape 3,224,224 --batch 64 256 --amp bf16 --channels-last]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

import advfast
from advfast import models, ops

SETTINGS = [((3, 64, 64), 32), ((3, 224, 224), 8)]
AMPS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_ms(model, x, iterations: int, amp: str | None) -> float:
    """Bare forward + backward w.r.t. the input only, the same number of times, in the same
    precision and layout."""
    model.requires_grad_(False)
    seed = torch.randn(len(x), 1000, device=x.device)
    cast = torch.autocast(x.device.type, dtype=AMPS[amp]) if amp else contextlib.nullcontext()
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(iterations):
        xr = x.detach().requires_grad_(True)
        with cast:
            logits = model(xr)
        (grad,) = torch.autograd.grad(logits, xr, seed.to(logits.dtype))
    _sync(x.device)
    return 1e3 * (time.perf_counter() - start) / iterations


def engine_ms(model, x, target, source, loss: str, record: bool, iterations: int,
              own_work: dict, amp: str | None, channels_last: bool) -> float:
    """Per-iteration ms of the engine; also notes the ms of its own phases (loss head,
    update and recording: everything but the model's forward and backward) in own_work."""
    attack = advfast.Attack(model, loss=loss, step="equal-perturbation", beta=5.0,
                            iterations=iterations, record=record, amp=amp,
                            channels_last=channels_last)
    timing = attack(x, target, source).timing
    own_work.setdefault((loss, record), []).append(timing.phases_ms["head"] +
                                                   timing.phases_ms["update"])
    return timing.per_iteration_ms


def bim_ms(model, x, target, iterations: int) -> float:
    import torchattacks

    model.requires_grad_(True)  # as a torchattacks user's model comes
    attack = torchattacks.BIM(model, eps=8 / 255, alpha=1 / 255, steps=iterations)
    attack.set_mode_targeted_by_label(quiet=True)
    _sync(x.device)
    start = time.perf_counter()
    attack(x, target)
    _sync(x.device)
    return 1e3 * (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--model", default="resnet18", help="torchvision classifier")
    parser.add_argument("--shape", help="C,H,W of the input (default: both settings)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes for --shape")
    parser.add_argument("--amp", choices=["bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = SETTINGS
    if args.shape:
        shape = tuple(int(v) for v in args.shape.split(","))
        settings = [(shape, b) for b in (args.batch or [32])]
    try:
        import torchattacks  # noqa: F401

        have_bim = True
    except ImportError:
        have_bim = False
    print(f"advfast attack benchmark: {args.model} device={device} backend={ops.backend()} "
          f"torch={torch.__version__} iterations={args.iterations} repeats={args.repeats} "
          f"amp={args.amp} channels_last={args.channels_last}\n")
    print("| input | batch | floor ms/it | " + " | ".join(
        f"{loss}: rec / no-rec (own work)" for loss in ops.LOSSES) + (" | torchattacks BIM |" if have_bim else " |"))
    print("|---|---|---|" + "---|" * len(ops.LOSSES) + ("---|" if have_bim else ""))
    results = []
    for shape, batch in settings:
        torch.manual_seed(0)
        model = models.load(args.model, device=device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        x = torch.rand(batch, *shape, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,), device=device)
        source = (target + 1) % 1000
        own_work: dict = {}
        runs = {"floor": lambda: floor_ms(model, x, args.iterations, args.amp)}
        for loss in ops.LOSSES:
            for record in (True, False):
                runs[f"{loss}/{'rec' if record else 'norec'}"] = (
                    lambda loss=loss, record=record: engine_ms(
                        model, x, target, source, loss, record, args.iterations, own_work,
                        args.amp, args.channels_last))
        if have_bim:
            runs["bim"] = lambda: bim_ms(model, x, target, args.iterations)
        for fn in runs.values():  # warm-up
            fn()
        samples = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                samples[name].append(fn())
        ms = {name: statistics.median(v) for name, v in samples.items()}
        floor = ms["floor"]
        own = {loss: 100 * statistics.median(own_work[(loss, True)]) / floor
               for loss in ops.LOSSES}
        cells = [f"{ms[f'{loss}/rec'] / floor:.3f}x / {ms[f'{loss}/norec'] / floor:.3f}x "
                 f"(own {own[loss]:.2f}%)" for loss in ops.LOSSES]
        if have_bim:
            cells.append(f"{ms['bim'] / floor:.3f}x")
        print(f"| {'x'.join(map(str, shape))} | {batch} | {floor:.1f} | " + " | ".join(cells) + " |",
              flush=True)
        results.append({"shape": list(shape), "batch": batch, "ms_per_iteration": ms,
                        "own_work_percent_of_floor": own})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "model": args.model, "amp": args.amp,
                   "channels_last": args.channels_last, "iterations": args.iterations,
                   "hardware": advfast.timing.hardware_info(device), "results": results},
                  f, indent=2)


if __name__ == "__main__":
    main()
