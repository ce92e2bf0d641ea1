"""An upper bound on what folding eval BatchNorm into the packed convolutions and fusing their
ReLU could save a model call: the packed model against a copy with every ``BatchNorm2d`` and
``ReLU`` replaced by ``Identity``.

The copy computes something else (a bound, not a candidate): a fold would still pay the
ReLU's mask in the backward and the BN's per-channel scale in the packed weights, so the real
saving is at most the difference measured here.  Per-thread CPU time of forward +
input-backward (bench/batch_cost.py's call), one thread, the two models alternated in each
repeat, the call that makes the packs not timed; under bf16 autocast with the weights cast
once (as the attacks run it) when ``--amp bf16``, channels_last with ``--channels-last``.

    python bench/bound_bn_relu.py [--model resnet18] [--size 32] [--sizes 4 12 16]
                                  [--repeats 7] [--amp bf16] [--channels-last] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from contextlib import ExitStack

import torch
from torch import nn

import batch_cost
from advfast.engine.core import weights_cast_once
from advfast.engine.packing import weights_packed
from advfast.errors import UserError
from advfast.io import models
from advfast.io.files import write_json


def stripped(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d and ReLU child replaced by Identity."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.BatchNorm2d, nn.ReLU)):
                setattr(parent, name, nn.Identity())
    return model


def timed(pair: dict[str, nn.Module], inputs: dict[int, torch.Tensor], repeats: int,
          amp: str | None) -> dict[int, dict[str, float]]:
    """Batch size -> model name -> median over ``repeats`` of the fastest of three calls."""
    times = {n: {k: [] for k in pair} for n in inputs}
    with ExitStack() as stack:
        for model in pair.values():
            if amp is not None:
                stack.enter_context(weights_cast_once(model, amp))
            stack.enter_context(weights_packed(model))
            for x in inputs.values():  # makes the packs and oneDNN's primitives
                batch_cost.call_seconds(model, x, True, amp)
        for _ in range(repeats):
            for n, x in inputs.items():
                for name, model in pair.items():
                    times[n][name].append(batch_cost.fastest(model, x, True, amp))
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 12, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--amp", choices=["bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.size < 1 or args.repeats < 1 or any(n < 1 for n in args.sizes):
        parser.error("--size, --sizes, --repeats: at least 1")
    torch.set_num_threads(1)
    try:
        model = models.load(args.model, device=torch.device("cpu")).eval().requires_grad_(False)
    except UserError as error:
        parser.error(str(error))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    shape = (models.input_channels(model), args.size, args.size)
    inputs = batch_cost.batches(shape, args.sizes, args.channels_last)
    seconds = timed({"packed": model, "without BN and ReLU": stripped(model)}, inputs,
                    args.repeats, args.amp)
    print(f"{args.model} {'x'.join(map(str, shape))}, one thread, packed, "
          f"{args.amp or 'fp32'}{', channels_last' if args.channels_last else ''}:")
    for n, t in seconds.items():
        full, bound = t["packed"], t["without BN and ReLU"]
        print(f"  batch {n}: {full * 1e3:.1f} ms, without BN and ReLU {bound * 1e3:.1f} ms: "
              f"at most {1 - bound / full:.0%} saved")
    if args.json:
        write_json(args.json, {"model": args.model, "input": list(shape), "amp": args.amp,
                               "channels_last": args.channels_last, "seconds": seconds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
