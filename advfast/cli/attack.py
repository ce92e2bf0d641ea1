"""``advfast attack``: one attack over the chosen inputs; saves the adversarial images and the
per-sample metrics (and, with --png, 8-bit images and a saliency panel)."""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from advfast import __version__
from advfast.cli.options import (FIG5_INPUTS, add_attack_command_options, arguments,
                                 attack_params, setup)
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


def run(args: argparse.Namespace) -> int:
    params = attack_params(args)
    out = OutputFolder(args.out, ["adversarial.safetensors", "metrics.csv", "summary.json",
                                  "png/", "saliency.png"], args.overwrite)
    out.claim()
    device, model, chosen = setup(args)
    attack = specs.build(args.attack, model, params, amp=args.amp, compile=args.compile)
    adversarial, rows = [], []
    started = time.perf_counter()
    n = len(chosen.labels)
    for s in tqdm(range(0, n, args.batch_size), desc=args.attack, unit="batch",
                  disable=args.quiet):
        sl = slice(s, s + args.batch_size)
        result = attack(chosen.images[sl].to(device), chosen.targets[sl].to(device),
                        source=chosen.labels[sl].to(device))
        adversarial.append(result.adversarial.cpu())
        rows += [{"index": int(chosen.index[i]), "path": chosen.paths[i],
                  "label": int(chosen.labels[i]), "target": int(chosen.targets[i]),
                  "attack": args.attack, **record}
                 for i, record in enumerate(result.records(), start=s)]
    elapsed = time.perf_counter() - started
    adv = torch.cat(adversarial)
    payload = save({"adversarial": adv.contiguous(), "index": chosen.index.contiguous(),
                    "label": chosen.labels.contiguous(), "target": chosen.targets.contiguous()})
    write_durably(out.file("adversarial.safetensors"), lambda tmp: write_bytes(tmp, payload))
    write_durably(out.file("metrics.csv"), lambda tmp: _write_csv(tmp, rows))
    if args.png:
        for image, index in zip(adv, chosen.index.tolist()):
            path = out.file(os.path.join("png", f"{index:06d}.png"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_durably(path, lambda tmp, image=image: save_png(image, tmp))
        k = min(FIG5_INPUTS * 2, n)
        delta = {args.attack: adv[:k] - chosen.images[:k]}
        write_durably(out.file("saliency.png"),
                      lambda tmp: figures.saliency_panel(chosen.images[:k], delta, tmp))
    flipped = sum(r["flipped"] for r in rows)
    write_json(out.file("summary.json"),
               {"config": {**arguments(args), "params": params, "device": str(device),
                           "advfast": __version__},
                "n": n, "flipped": flipped / n, "seconds": elapsed, "images_per_s": n / elapsed})
    out.record()
    print(f"{flipped}/{n} flipped to their target in {elapsed:.1f} s; wrote "
          f"{', '.join(sorted(set(w.split('/')[0] for w in out.written)))} in {args.out}")
    return 0


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
