"""What one call of a model costs: forward + input-backward seconds against the batch size,
fitted as ``fixed + per_row * rows``, and a counter of an attack's calls and rows.

On one CPU thread a model with small inputs has a large fixed part per call: oneDNN lays every
convolution weight out again on every call (``--onednn`` shows the share of its time that
goes to these reorders).  An attack's time then follows its number of batch iterations more
than its number of rows: compacting the batch to the samples still running saves the rows'
part only.  bench/cw_paired.py uses the fit to explain its times.

With ``--amp bf16`` it also times each call under autocast as a plain loop runs it (autocast
casts every conv and linear weight again on every call) and with the weights cast once for the
whole attack, as advfast's attacks do (``engine.core.weights_cast_once``; the same bits).

With ``--pack-weights`` it times float32 calls of the plain model against the same model with
its conv weights packed once, as ``pack_weights`` does (``engine.packing``), and fits those.

    python bench/batch_cost.py [--model resnet18] [--size 32] [--sizes 1 2 4 8 16]
                               [--repeats 5] [--onednn] [--amp bf16 | --pack-weights]
                               [--pack-weights --one-position [--amp bf16]]
                               [--channels-last] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from advfast.engine import packing
from advfast.engine.core import autocast, weights_cast_once
from advfast.engine.packing import weights_packed
from advfast.errors import UserError
from advfast.io import models
from advfast.io.files import write_json


def call_seconds(model: torch.nn.Module, x: torch.Tensor, grad: bool,
                 amp: str | None = None) -> float:
    """Per-thread CPU seconds of one call: the forward (under autocast to ``amp``'s dtype if
    given), and with ``grad`` the gradient of the logits' sum w.r.t. the input (what an
    attack's iteration asks of the model)."""
    begin = time.thread_time()
    if grad:
        x = x.detach().requires_grad_(True)
        with autocast(x.device, amp):
            logits = model(x)
        torch.autograd.grad(logits.float().sum(), x)
    else:
        with torch.no_grad(), autocast(x.device, amp):
            model(x)
    return time.thread_time() - begin


def fastest(model: torch.nn.Module, x: torch.Tensor, grad: bool,
            amp: str | None = None) -> float:
    """The fastest of three calls (:func:`call_seconds`): the least disturbed by other load."""
    return min(call_seconds(model, x, grad, amp) for _ in range(3))


def batches(image_shape: tuple[int, ...], sizes: list[int],
            channels_last: bool = False) -> dict[int, torch.Tensor]:
    """Batch size -> a seeded uniform batch of that size (channels_last: in that layout)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return {n: torch.rand(n, *image_shape, generator=torch.Generator().manual_seed(n))
            .contiguous(memory_format=layout) for n in sizes}


def measure(model: torch.nn.Module, image_shape: tuple[int, ...], sizes: list[int],
            repeats: int, grad: bool = True) -> dict[int, float]:
    """Batch size -> median over ``repeats`` of the fastest of three calls, the sizes taken
    in turn within each repeat so that a change of load falls on all of them."""
    inputs = batches(image_shape, sizes)
    for n in sizes:  # oneDNN builds its primitives for a new shape on the first call
        call_seconds(model, inputs[n], grad)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            times[n].append(fastest(model, inputs[n], grad))
    return {n: statistics.median(t) for n, t in times.items()}


def alternated(model: torch.nn.Module, inputs: dict[int, torch.Tensor], repeats: int,
               variants: tuple[Callable[[], AbstractContextManager], ...],
               amp: str | None = None) -> dict[int, tuple[float, ...]]:
    """Batch size -> per variant, the median over ``repeats`` of the fastest of three calls
    (forward + input-backward, under ``amp``) inside that variant's context; the variants in
    turn within each size of each repeat, so that a change of load falls on all of them; the
    first call inside each context (its casts, packs, oneDNN primitives) is not timed."""
    times: dict[int, list[list[float]]] = {n: [[] for _ in variants] for n in inputs}
    for _ in range(repeats):
        for n, x in inputs.items():
            for kept, variant in zip(times[n], variants):
                with variant():
                    call_seconds(model, x, True, amp)
                    kept.append(fastest(model, x, True, amp))
    return {n: tuple(statistics.median(t) for t in kept) for n, kept in times.items()}


def cast_once_gain(model: torch.nn.Module, image_shape: tuple[int, ...], sizes: list[int],
                   repeats: int, amp: str,
                   channels_last: bool = False) -> dict[int, tuple[float, float]]:
    """Batch size -> (seconds of a call under autocast as a plain loop runs it, seconds with
    the attacks' weights cast once, engine.core.weights_cast_once), :func:`alternated`;
    inputs channels_last if asked (the model's layout is the caller's)."""
    return alternated(model, batches(image_shape, sizes, channels_last), repeats,
                      (nullcontext, lambda: weights_cast_once(model, amp)), amp)


def packed_gain(model: torch.nn.Module, image_shape: tuple[int, ...], sizes: list[int],
                repeats: int, channels_last: bool = False) -> dict[int, tuple[float, float]]:
    """Batch size -> (seconds of a float32 call of the plain model, seconds with its conv
    weights packed once as ``pack_weights`` does, engine.packing.weights_packed),
    :func:`alternated` (the call that makes the packs is not timed: an attack makes them once
    for all its iterations)."""
    return alternated(model, batches(image_shape, sizes, channels_last), repeats,
                      (nullcontext, lambda: weights_packed(model)))


@contextmanager
def _packed_under(model: torch.nn.Module, amp: str | None, rule) -> Iterator[None]:
    """The model packed (its weights cast once under ``amp``) with ``rule`` standing in for
    ``packing.single_window``, which is back afterwards."""
    window = packing.single_window
    packing.single_window = rule
    try:
        with weights_cast_once(model, amp), weights_packed(model):
            yield
    finally:
        packing.single_window = window


def one_position_gain(model: torch.nn.Module, image_shape: tuple[int, ...], sizes: list[int],
                      repeats: int, channels_last: bool = False,
                      amp: str | None = None) -> dict[int, tuple[float, float]]:
    """Batch size -> (seconds of a packed call without the one-position product, seconds
    with it), :func:`alternated`: the packs as ``pack_weights`` makes them, once with
    ``packing.single_window`` answering None for every convolution (each then runs as a
    packed convolution) and once as it is; under ``amp`` with the weights cast once, as the
    attacks run."""
    window = packing.single_window
    return alternated(model, batches(image_shape, sizes, channels_last), repeats,
                      (lambda: _packed_under(model, amp, lambda *_: None),
                       lambda: _packed_under(model, amp, window)), amp)


def _print_one_position(model: torch.nn.Module, shape: tuple[int, ...], args) -> dict:
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    gains = one_position_gain(model, shape, args.sizes, args.repeats, args.channels_last,
                              args.amp)
    print(f"packed, {args.amp or 'float32'}{', channels_last' if args.channels_last else ''}: "
          "without / with the one-position product")
    for n, (without, with_) in gains.items():
        print(f"  batch {n}: {without * 1e3:.1f} / {with_ * 1e3:.1f} ms "
              f"({without / with_:.2f}x)")
    return {"amp": args.amp, "channels_last": args.channels_last, "seconds": gains}


def _print_packed(model: torch.nn.Module, shape: tuple[int, ...], args) -> dict:
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    gains = packed_gain(model, shape, args.sizes, args.repeats, args.channels_last)
    print(f"float32{', channels_last' if args.channels_last else ''}: plain / weights packed")
    for n, (plain, packed) in gains.items():
        print(f"  batch {n}: {plain * 1e3:.1f} / {packed * 1e3:.1f} ms ({plain / packed:.2f}x)")
    fixed, per_row = fit({n: b for n, (_, b) in gains.items()})
    print(f"  fit, packed: {fixed * 1e3:.1f} ms a call + {per_row * 1e3:.2f} ms a row")
    return {"channels_last": args.channels_last, "seconds": gains, "fixed_s": fixed,
            "per_row_s": per_row}


def fit(seconds: dict[int, float]) -> tuple[float, float]:
    """Least-squares ``(fixed, per_row)`` of ``seconds[n] ~ fixed + per_row * n``."""
    if len(seconds) < 2:
        raise ValueError("a fit needs at least two batch sizes")
    n_mean = statistics.fmean(seconds)
    t_mean = statistics.fmean(seconds.values())
    per_row = (sum((n - n_mean) * (t - t_mean) for n, t in seconds.items())
               / sum((n - n_mean) ** 2 for n in seconds))
    return t_mean - per_row * n_mean, per_row


class Counter:
    """Counts a model's calls and rows while active: ``calls``/``rows`` with autograd on
    (an attack's steps), ``checks``/``check_rows`` with it off (success checks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls = self.rows = self.checks = self.check_rows = 0

    def _count(self, _module, args) -> None:
        rows = len(args[0])
        if torch.is_grad_enabled():
            self.calls, self.rows = self.calls + 1, self.rows + rows
        else:
            self.checks, self.check_rows = self.checks + 1, self.check_rows + rows

    def __enter__(self) -> Counter:
        self._handle = self.model.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *_) -> None:
        self._handle.remove()

    def figures(self) -> dict[str, int]:
        return {"calls": self.calls, "rows": self.rows, "checks": self.checks,
                "check_rows": self.check_rows}


def onednn_reorder_share(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(milliseconds oneDNN executes in one call, the share of them spent in reorders),
    from oneDNN's verbose log of one warm call (printed by C code: caught at the file
    descriptor)."""
    call_seconds(model, x, True)
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                call_seconds(model, x, True)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        executed = [line.rstrip().split(",") for line in log
                    if line.startswith("onednn_verbose") and ",exec," in line]
    total = sum(float(fields[-1]) for fields in executed)
    reorders = sum(float(fields[-1]) for fields in executed if fields[5] == "reorder")
    return total, reorders / total if total else 0.0


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, checked; the parser too, for errors found after parsing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18",
                        help="digits, mnist or a torchvision classifier (random weights)")
    parser.add_argument("--size", type=int, default=32, help="image side (digits: 8)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--onednn", action="store_true",
                        help="also show oneDNN's reorder share of one call at each size")
    parser.add_argument("--amp", choices=["bf16", "fp16"],
                        help="also time the calls under autocast, as a plain loop runs them "
                             "and with the weights cast once as advfast's attacks do")
    parser.add_argument("--pack-weights", action="store_true",
                        help="also time float32 calls with the conv weights packed once, as "
                             "pack_weights does, against the plain model")
    parser.add_argument("--one-position", action="store_true",
                        help="with --pack-weights: also time the packed calls without and "
                             "with the one-position product (in float32, or under --amp bf16 "
                             "with the weights cast once)")
    parser.add_argument("--channels-last", action="store_true",
                        help="with --amp or --pack-weights: the model and inputs in "
                             "channels_last")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if any(n < 1 for n in args.sizes) or args.size < 1:
        parser.error("--sizes, --size: at least 1")
    if args.channels_last and not (args.amp or args.pack_weights):
        parser.error("--channels-last: only with --amp or --pack-weights")
    if args.one_position and not args.pack_weights:
        parser.error("--one-position: only with --pack-weights")
    if args.amp and args.pack_weights and not (args.one_position and args.amp == "bf16"):
        parser.error("--amp and --pack-weights: one at a time (both: only --amp bf16 with "
                     "--one-position)")
    if len(set(args.sizes)) < 2:
        parser.error("--sizes: at least two different batch sizes to fit a line through")
    return parser, args


def main() -> int:
    parser, args = parse_args()
    torch.set_num_threads(1)
    try:
        model = models.load(args.model, device=torch.device("cpu")).eval().requires_grad_(False)
    except UserError as error:
        parser.error(str(error))
    shape = (models.input_channels(model), args.size, args.size)
    seconds = measure(model, shape, args.sizes, args.repeats)
    fixed, per_row = fit(seconds)
    print(f"{args.model} {'x'.join(map(str, shape))}, one thread, forward + input-backward:")
    report = {"model": args.model, "input": list(shape), "seconds": seconds,
              "fixed_s": fixed, "per_row_s": per_row, "onednn": {}}
    for n, t in seconds.items():
        line = f"  batch {n}: {t * 1e3:.1f} ms, {t / n * 1e3:.2f} ms a row"
        if args.onednn:
            total, share = onednn_reorder_share(model, torch.rand(n, *shape))
            report["onednn"][n] = {"exec_ms": total, "reorder_share": share}
            line += f"; oneDNN {total:.1f} ms, {share:.0%} of it reorders"
        print(line)
    print(f"  fit: {fixed * 1e3:.1f} ms a call + {per_row * 1e3:.2f} ms a row")
    if args.amp and not args.pack_weights:
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        report["amp"] = {"amp": args.amp, "channels_last": args.channels_last,
                         "seconds": cast_once_gain(model, shape, args.sizes, args.repeats,
                                                   args.amp, args.channels_last)}
        print(f"under {args.amp} autocast{', channels_last' if args.channels_last else ''}: "
              "casting each call / weights cast once")
        for n, (each, once) in report["amp"]["seconds"].items():
            print(f"  batch {n}: {each * 1e3:.1f} / {once * 1e3:.1f} ms ({each / once:.2f}x)")
    if args.pack_weights and not args.amp:
        report["packed"] = _print_packed(model, shape, args)
    if args.one_position:
        report["one_position"] = _print_one_position(model, shape, args)
    if args.json:
        write_json(args.json, report)  # strict JSON, written durably
    return 0


if __name__ == "__main__":
    sys.exit(main())
