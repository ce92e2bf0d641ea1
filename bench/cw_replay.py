"""What a CW-L2 run spends outside its model's calls: the whole run against a replay of the
same model calls alone.

The run is bench/cw_paired.py's best configuration on ResNet-18 3x32x32 (the warm start at
the setting's steps, bf16 autocast + channels_last, weights packed).  A forward pre-hook
records each call's rows and whether it took the input gradient; the replay makes the same
calls, in the same order, on a channels_last copy of the model under the same casts and packs
(a gradient of the logits' sum where the run took one).  Whole run and replay alternate, in
per-thread CPU time, one thread; the difference is advfast's own work: the loss head, the
Adam step, the search's bookkeeping, the gathers of compaction.

    python bench/cw_replay.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import bench_attacks
from advfast import attacks
from advfast.engine.core import autocast, weights_cast_once
from advfast.engine.packing import weights_packed
from advfast.io.files import write_json

Call = tuple[int, bool]  # (rows, with the input gradient)


def recorded(model: torch.nn.Module, run) -> list[Call]:
    """The (rows, gradient) of each call of ``model`` while ``run()`` runs."""
    calls: list[Call] = []
    handle = model.register_forward_pre_hook(
        lambda _module, args: calls.append((len(args[0]), torch.is_grad_enabled())))
    try:
        run()
    finally:
        handle.remove()
    return calls


def replay_seconds(model: torch.nn.Module, calls: list[Call], image: tuple[int, ...]) -> float:
    """Per-thread CPU seconds of ``calls`` on ``model`` (channels_last, bf16 autocast with
    the weights cast once and packed, as the attack runs them); the packs are made first."""
    inputs = {n: torch.rand(n, *image).contiguous(memory_format=torch.channels_last)
              for n in {rows for rows, _ in calls}}
    with weights_cast_once(model, "bf16"), weights_packed(model):
        for rows in inputs:  # the packs, and oneDNN's primitives for each shape
            _call(model, inputs[rows], True)
        begin = time.thread_time()
        for rows, grad in calls:
            _call(model, inputs[rows], grad)
        return time.thread_time() - begin


def _call(model: torch.nn.Module, x: torch.Tensor, grad: bool) -> None:
    x = x.detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad), autocast(x.device, "bf16"):
        logits = model(x)
    if grad:
        torch.autograd.grad(logits.float().sum(), x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    torch.set_num_threads(1)
    _, model, x0, target, params = list(bench_attacks.settings(torch.device("cpu"), False))[1]
    model.requires_grad_(False)
    p = params["cw"]
    attack = attacks.CarliniWagnerL2(model, c=p["c"], kappa=0.0, steps=p["steps"], lr=p["lr"],
                                     binary_search_steps=p["search"], warm_start=True,
                                     amp="bf16", channels_last=True, pack_weights=True)
    calls = recorded(model, lambda: attack(x0, target))
    copied = copy.deepcopy(model).to(memory_format=torch.channels_last)
    whole, replay = [], []
    for _ in range(args.repeats):
        begin = time.thread_time()
        attack(x0, target)
        whole.append(time.thread_time() - begin)
        replay.append(replay_seconds(copied, calls, tuple(x0.shape[1:])))
    shares = [1 - r / w for w, r in zip(whole, replay)]
    print(f"CW-L2, warm start, bf16 + channels_last, packed, ResNet-18 3x32x32: {len(calls)} "
          f"calls, {sum(n for n, g in calls if g)} rows with the gradient")
    print(f"  whole run {statistics.median(whole):.3f} s, its model calls alone "
          f"{statistics.median(replay):.3f} s (medians of {args.repeats}); outside the calls "
          f"{min(shares):.1%}–{max(shares):.1%} a repeat, median {statistics.median(shares):.1%}")
    if args.json:
        write_json(args.json, {"calls": len(calls), "whole_s": whole, "replay_s": replay,
                               "outside_share": shares})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
