"""Kernel benchmark: advfast's fused ops against eager PyTorch, torch.compile and the memory floor.

For each image shape and each step variant (equal multiplier / equal perturbation, raw
gradient / its sign) it times, in one process:
  * ``perturb_step_``,
  * the eager reference chain (advfast.ops.reference.perturb_step_),
  * torch.compile of that chain,
  * one ``x.copy_(grad)``: the memory floor (read one tensor, write one),
and ``loss_head`` against its eager reference on [B, 1000] logits, and CW's
``adam_tanh_step_`` against its eager reference and the copy.  Ratios are to the copy (steps)
or to eager (head), all measured in the same run.  Then the exact equal perturbation
(``exact_l1=True``) against the paper's rule on the same inputs, in the open (x0 uniform in
[0, 1]) and at the box (half the pixels at 0 or 1): on the CPU in per-thread CPU time
(``time.thread_time``) with one thread, the two alternating, so that other load on the machine
does not count; on CUDA in synchronised wall-clock time.

    python bench/bench_ops.py [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch.utils import benchmark

from advfast import ops
from advfast.ops import reference

SHAPES = [(8, 3, 224, 224), (32, 3, 64, 64), (256, 3, 32, 32)]
TINY_SHAPES = [(2, 3, 16, 16)]  # --tiny: the same steps in seconds (the GPU check's CPU mode)
VARIANTS = {"alpha": dict(sign=False, alpha=5e-4), "beta": dict(sign=False, beta=5.0),
            "alpha-sign": dict(sign=True, alpha=5e-4), "beta-sign": dict(sign=True, beta=5.0)}
CLASSES = 1000
EXACT_VARIANTS = {"beta": dict(sign=False, beta=5.0), "beta-sign": dict(sign=True, beta=5.0)}
EXACT_ROUNDS = 5  # alternations of the paper's rule and the exact one


def _median_ms(fn, min_run_time: float) -> float:
    fn()  # warm-up (and compilation for torch.compile)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def bench_step(shape, variant: dict, device: str, min_run_time: float,
               compile_chain: bool = True, cpu_time: bool = False) -> dict:
    x0 = torch.rand(shape, device=device)
    grad = torch.randn(shape, device=device) * 1e-3
    x = x0.clone()
    rows = {
        "copy": lambda: x.copy_(grad),
        "advfast": lambda: ops.perturb_step_(x, grad, x0, **variant),
        "eager": lambda: reference.perturb_step_(x, grad, x0, **variant),
    }
    if compile_chain:
        torch._dynamo.reset()
        compiled_chain = torch.compile(reference.perturb_step_, fullgraph=True)
        rows["compile"] = lambda: compiled_chain(x, grad, x0, **variant)
    measure = _cpu_ms if cpu_time else _median_ms
    out = {name: measure(fn, min_run_time) for name, fn in rows.items()}
    out.setdefault("compile", None)  # skipped (strict JSON has no NaN)
    return out


def _shown(ms: float | None, per: float | None = None) -> str:
    """A table cell: ms, or its ratio to ``per``; "-" where the column was skipped."""
    if ms is None:
        return "-"
    return f"{ms:.3f}" if per is None else f"{ms / per:.1f}x"


def _step_inputs(shape, device: str, at_box: bool):
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(shape, device=device, generator=gen)
    if at_box:
        half = torch.rand(shape, device=device, generator=gen) < 0.5
        x0 = torch.where(half, (x0 > 0.5).float(), x0)
    return x0, torch.randn(shape, device=device, generator=gen) * 1e-3


def _cpu_ms(fn, seconds: float) -> float:
    """Per-call CPU time of this thread (ms), over at least ``seconds`` of it."""
    fn()
    calls, start = 0, time.thread_time()
    while time.thread_time() - start < seconds or calls < 3:
        fn()
        calls += 1
    return (time.thread_time() - start) * 1e3 / calls


def bench_exact(shape, variant: dict, device: str, min_run_time: float, at_box: bool) -> dict:
    """ms of one step of the paper's rule and of the exact one from the same images (each call
    restores x first; the restore alone is measured and subtracted), and the L1 each adds."""
    x0, grad = _step_inputs(shape, device, at_box)
    x = x0.clone()
    rows = {"restore": lambda: x.copy_(x0),
            "paper": lambda: ops.perturb_step_(x.copy_(x0), grad, x0, **variant),
            "exact": lambda: ops.perturb_step_(x.copy_(x0), grad, x0, exact_l1=True, **variant)}
    measure = ((lambda fn: _cpu_ms(fn, min_run_time / EXACT_ROUNDS)) if device == "cpu"
               else (lambda fn: _median_ms(fn, min_run_time / EXACT_ROUNDS)))
    times = {name: [] for name in rows}
    for _ in range(EXACT_ROUNDS):  # alternating, so that drifts of the machine hit both
        for name, fn in rows.items():
            times[name].append(measure(fn))
    out = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    for name in ("paper", "exact"):
        stats = rows[name]()
        out[f"{name}_step_l1"] = float(stats[:, ops.STEP_STATS.index("step_l1")].mean())
    out["ratio"] = (out["exact"] - out["restore"]) / (out["paper"] - out["restore"])
    return out


def report_exact(shapes, device: str, min_run_time: float) -> list[dict]:
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    clock = "CPU time, 1 thread" if device == "cpu" else "synchronised wall clock"
    print(f"\nexact_l1 against the paper's rule, beta = 5 (ms, {clock}; restore of x "
          "subtracted)\n")
    print("| shape | rule | inputs | paper | exact | exact/paper | L1 paper | L1 exact |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in shapes:
        for name, variant in EXACT_VARIANTS.items():
            for at_box in (False, True):
                t = bench_exact(shape, variant, device, min_run_time, at_box)
                where = "at the box" if at_box else "open"
                print(f"| {'x'.join(map(str, shape))} | {name} | {where} | "
                      f"{t['paper'] - t['restore']:.3f} | {t['exact'] - t['restore']:.3f} | "
                      f"{t['ratio']:.2f}x | {t['paper_step_l1']:.3f} | "
                      f"{t['exact_step_l1']:.3f} |", flush=True)
                rows.append({"shape": list(shape), "rule": name, "inputs": where, "ms": t})
    torch.set_num_threads(threads)
    return rows


def bench_head(batch: int, device: str, min_run_time: float) -> dict:
    logits = torch.randn(batch, CLASSES, device=device) * 5
    target = torch.randint(0, CLASSES, (batch,), device=device)
    source = torch.randint(0, CLASSES, (batch,), device=device)
    out = {}
    for loss in ("ce", "m-logit"):
        out[loss] = {
            "advfast": _median_ms(lambda: ops.loss_head(logits, target, source, loss,
                                                        validate_indices=False), min_run_time),
            "eager": _median_ms(lambda: reference.loss_head(logits, target, source, loss),
                                min_run_time),
        }
    return out


def bench_adam(shape, device: str, min_run_time: float, cpu_time: bool) -> dict:
    """ms of one copy, of adam_tanh_step_ and of its eager reference (CW, first steps)."""
    x0 = torch.rand(shape, device=device)
    grad = torch.randn(shape, device=device)
    w = torch.atanh((2 * x0 - 1) * (1 - 1e-6))
    m, v, x = torch.zeros_like(w), torch.zeros_like(w), (torch.tanh(w) + 1) / 2
    c = torch.ones(shape[0], device=device)
    step = torch.ones(shape[0], dtype=torch.int64, device=device)
    rows = {"copy": lambda: x.copy_(grad),
            "advfast": lambda: ops.adam_tanh_step_(w, m, v, x, grad, x0, c, step, lr=1e-2),
            "eager": lambda: reference.adam_tanh_step_(w, m, v, x, grad, x0, c, step, lr=1e-2)}
    measure = _cpu_ms if cpu_time else _median_ms
    return {name: measure(fn, min_run_time) for name, fn in rows.items()}


def report_adam(shapes, device: str, min_run_time: float, cpu_time: bool) -> list[dict]:
    print("\nadam_tanh_step_ (CW-L2's step; ms, and ratio to one x.copy_(grad))\n")
    print("| shape | copy | advfast | eager | advfast/copy | eager/advfast |")
    print("|---|---|---|---|---|---|")
    out = []
    for shape in shapes:
        t = bench_adam(shape, device, min_run_time, cpu_time)
        print(f"| {'x'.join(map(str, shape))} | {t['copy']:.3f} | {t['advfast']:.3f} | "
              f"{t['eager']:.3f} | {t['advfast'] / t['copy']:.1f}x | "
              f"{t['eager'] / t['advfast']:.1f}x |", flush=True)
        out.append({"shape": list(shape), "ms": t})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape (smoke test)")
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out the torch.compile column (it compiles once per row)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the step table in this thread's CPU time (time.thread_time), "
                             "which other load on a shared CPU moves less than wall time")
    args = parser.parse_args()
    shapes = TINY_SHAPES if args.tiny else SHAPES
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.machine()}, {torch.ops.advfast.cpu_isa()} kernels, "
                        f"{torch.get_num_threads()} threads")
    print(f"advfast ops benchmark: backend={ops.backend()} device={args.device} ({device_name}) "
          f"torch={torch.__version__}\n")
    print("perturb_step_ (ms, and ratio to one x.copy_(grad))\n")
    print("| shape | rule | copy | advfast | eager | torch.compile | advfast/copy | eager/copy | "
          "compile/copy |")
    print("|---|---|---|---|---|---|---|---|---|")
    steps, heads = [], []
    for shape in shapes:
        for name, variant in VARIANTS.items():
            t = bench_step(shape, variant, args.device, args.min_run_time, not args.skip_compile,
                           args.cpu_time and args.device == "cpu")
            print(f"| {'x'.join(map(str, shape))} | {name} | {t['copy']:.3f} | "
                  f"{t['advfast']:.3f} | "
                  f"{t['eager']:.3f} | {_shown(t['compile'])} | "
                  f"{t['advfast'] / t['copy']:.2f}x | {t['eager'] / t['copy']:.1f}x | "
                  f"{_shown(t['compile'], t['copy'])} |", flush=True)
            steps.append({"shape": list(shape), "rule": name, "ms": t})
    print(f"\nloss_head on [B, {CLASSES}] logits (ms)\n")
    print("| B | loss | advfast | eager | eager/advfast |")
    print("|---|---|---|---|---|")
    for batch in sorted({shape[0] for shape in shapes}):
        for loss, t in bench_head(batch, args.device, args.min_run_time).items():
            print(f"| {batch} | {loss} | {t['advfast']:.3f} | {t['eager']:.3f} | "
                  f"{t['eager'] / t['advfast']:.2f}x |", flush=True)
            heads.append({"batch": batch, "loss": loss, "ms": t})
    adam = report_adam(shapes, args.device, args.min_run_time,
                       args.cpu_time and args.device == "cpu")
    exact = report_exact(shapes, args.device, args.min_run_time)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": device_name,
                       "backend": ops.backend(), "perturb_step": steps, "loss_head": heads,
                       "adam_tanh_step": adam, "exact_l1": exact}, f, indent=2)


if __name__ == "__main__":
    main()
