"""``advfast attack``: one attack over the chosen inputs; saves the adversarial images and the
per-sample metrics (and, with --png, 8-bit images and a saliency panel)."""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from advfast import __version__
from advfast.cli.options import (FIG5_INPUTS, add_attack_command_options, arguments,
                                 attack_params, claimed, setup)
from advfast.experiments import figures
from advfast.io.files import OutputFolder, write_durably, write_json
from advfast.io.shards import save_png, write_bytes
from advfast.tools import specs


def register(sub) -> None:
    at = sub.add_parser("attack", help="one attack; saves adversarial images and per-sample "
                                       "metrics")
    add_attack_command_options(at, reuse="overwrite")
    at.add_argument("--png", action="store_true", help="also write 8-bit PNGs and Fig. 5's "
                                                       "panel")
    at.set_defaults(func=run)


# What to raise when nothing flips, per attack.
RAISE = {"eq11": "raise --iterations or the step (--beta, or --alpha with --step "
                 "equal-multiplier)",
         "ifgs": "raise --eps (the ball) and --iterations or --alpha (the steps)",
         "cw-l2": "raise --c, --iterations or --binary-search-steps",
         "lbfgs": "lower --b or raise --iterations or --binary-search-steps"}
FILES = ["adversarial.safetensors", "metrics.csv", "summary.json", "png/", "saliency.png"]


def run(args: argparse.Namespace) -> int:
    params = attack_params(args)
    out = OutputFolder(args.out, FILES, args.overwrite)
    out.check()
    device, model, chosen = setup(args)
    attack = specs.build(args.attack, model, params, amp=args.amp,
                         channels_last=args.channels_last, compile=args.compile,
                         pack_weights=args.pack_weights)
    with claimed(out):
        started = time.perf_counter()
        adv, rows = _attack_all(args, attack, device, chosen)
        elapsed = time.perf_counter() - started
        _write(args, out, chosen, adv, rows)
        n, flipped = len(rows), sum(r["flipped"] for r in rows)
        write_json(out.file("summary.json"),
                   {"config": {**arguments(args), "params": params, "device": str(device),
                               "advfast": __version__},
                    "n": n, "flipped": flipped / n, "seconds": elapsed,
                    "images_per_s": n / elapsed})
        out.record()
    print(f"{flipped}/{n} flipped to their target in {elapsed:.1f} s; wrote "
          f"{', '.join(sorted(set(w.split('/')[0] for w in out.written)))} in {args.out}")
    if flipped == 0 and not args.quiet:
        print(f"note: no input flipped; {RAISE.get(args.attack, '')}", file=sys.stderr)
    return 0


def _attack_all(args: argparse.Namespace, attack, device, chosen) -> tuple[torch.Tensor,
                                                                              list[dict]]:
    """The adversarial images of every chosen input [N, C, H, W] (CPU) and one metrics row
    each, batch by batch; the bar counts finished images and, within a batch, the
    iterations run (searches such as CW's run thousands per batch)."""
    adversarial, rows = [], []
    bar = tqdm(total=len(chosen.labels), desc=args.attack, unit="img", disable=args.quiet)
    for s in range(0, len(chosen.labels), args.batch_size):
        sl = slice(s, s + args.batch_size)
        attack.progress = _within_batch(bar, s)
        result = attack(chosen.images[sl].to(device), chosen.targets[sl].to(device),
                        source=chosen.labels[sl].to(device))
        bar.n = min(s + args.batch_size, len(chosen.labels))
        bar.refresh()
        adversarial.append(result.adversarial.cpu())
        rows += [{"index": int(chosen.index[i]), "path": chosen.paths[i],
                  "label": int(chosen.labels[i]), "target": int(chosen.targets[i]),
                  "attack": args.attack, **record}
                 for i, record in enumerate(result.records(), start=s)]
    bar.close()
    return torch.cat(adversarial), rows


def _within_batch(bar, start: int):
    def progress(iterations: int, finished: int) -> None:
        bar.n = start + finished
        bar.set_postfix_str(f"batch at iteration {iterations}", refresh=True)

    return progress


def _write(args: argparse.Namespace, out: OutputFolder, chosen, adv: torch.Tensor,
           rows: list[dict]) -> None:
    """adversarial.safetensors, metrics.csv and, with --png, the PNGs and saliency.png."""
    payload = save({"adversarial": adv.contiguous(), "index": chosen.index.contiguous(),
                    "label": chosen.labels.contiguous(), "target": chosen.targets.contiguous()})
    write_durably(out.file("adversarial.safetensors"), lambda tmp: write_bytes(tmp, payload))
    write_durably(out.file("metrics.csv"), lambda tmp: _write_csv(tmp, rows))
    if not args.png:
        return
    for image, index in zip(adv, chosen.index.tolist()):
        path = out.file(f"png/{index:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_durably(path, lambda tmp, image=image: save_png(image, tmp))
    k = min(FIG5_INPUTS * 2, len(rows))
    delta = {_column_name(args): adv[:k] - chosen.images[:k]}
    write_durably(out.file("saliency.png"),
                  lambda tmp: figures.saliency_panel(chosen.images[:k], delta, tmp))


def _column_name(args: argparse.Namespace) -> str:
    """The saliency column's title: the attack, and for the paper's scheme its loss."""
    return f"eq11, {args.loss or 'ce'}" if args.attack == "eq11" else args.attack


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
