"""The ``advfast`` command line: ``advfast table1``, ``advfast attack`` and ``advfast generate``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

from . import figures, generate, models, ops, table1
from .attack import STEPS, STOPS, Attack
from .inputs import DIGITS_ALPHA, DIGITS_BETA, prepare, resolve_device, step_sizes


def _common(parser: argparse.ArgumentParser, n_default: int | None) -> None:
    parser.add_argument("--model", default="digits",
                        help="'digits' (built-in default, no download) or a torchvision "
                             "classifier name such as resnet50")
    parser.add_argument("--weights", help="torchvision weights name (needs the internet) or a "
                                          "local .safetensors/.pt file; default: random init "
                                          "(digits: the built-in trained CNN)")
    parser.add_argument("--num-classes", type=int,
                        help="output classes of a torchvision model (default 1000)")
    parser.add_argument("--data", help="image folder (ImageFolder layout, or flat with "
                                       "labels.csv); default: the digits test split")
    parser.add_argument("--labels-csv", help="labels file for a flat folder "
                                             "(default DIR/labels.csv)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="centre-crop size for folder images (default 224)")
    parser.add_argument("--n", type=int, default=n_default,
                        help="attack the first N correctly classified inputs")
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kappa", type=float, default=20.0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="autocast forward/backward")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random targets")
    parser.add_argument("--workers", type=int, default=0, help="image loading processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _setup(args: argparse.Namespace):
    if args.n is not None and args.n < 1:
        raise ValueError("--n must be at least 1")
    if args.iterations < 1 or args.batch_size < 1:
        raise ValueError("--iterations and --batch-size must be at least 1")
    device = resolve_device(args.device)
    model = models.load(args.model, weights=args.weights, device=device,
                        num_classes=args.num_classes)
    inputs = prepare(model, args.model, args.data, args.n, args.seed, device,
                     labels_csv=args.labels_csv, image_size=args.image_size,
                     batch_size=args.batch_size, workers=args.workers)
    if args.n is not None and len(inputs.labels) < args.n and not args.quiet:
        print(f"note: only {len(inputs.labels)} correctly classified inputs are available "
              f"(asked for {args.n}); using all of them", file=sys.stderr)
    return device, model, inputs


def cmd_table1(args: argparse.Namespace) -> int:
    device, model, inputs = _setup(args)
    alpha, beta = step_sizes(args)
    if not args.quiet:
        print(f"Table I: {args.model} on {device}, {len(inputs.labels)} images, "
              f"{args.iterations} iterations, alpha={alpha:g}, beta={beta:g}, "
              f"kernels={ops.backend()}", file=sys.stderr)
    cells = table1.run(model, inputs, iterations=args.iterations, alpha=alpha, beta=beta,
                       batch_size=args.batch_size, device=device, amp=args.amp,
                       kappa=args.kappa, quiet=args.quiet)
    print(table1.format_table(cells, alpha, beta))
    config = {**vars(args), "alpha": alpha, "beta": beta, "device": str(device),
              "n_images": len(inputs.labels), "backend": ops.backend(),
              "torch": torch.__version__}
    config.pop("func", None)
    written = [*table1.write(cells, args.out, config).values()]
    if not args.no_figures:
        written += figures.draw_all(cells, args.out)
    print(f"wrote {', '.join(written)}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    device, model, inputs = _setup(args)
    alpha, beta = step_sizes(args)
    os.makedirs(args.out, exist_ok=True)
    attack = Attack(model, loss=args.loss, step=args.step, alpha=alpha, beta=beta,
                    iterations=args.iterations, kappa=args.kappa, kappa_mode=args.kappa_mode,
                    eps=args.eps, stop=args.stop, amp=args.amp, record=False)
    from tqdm.auto import tqdm

    adversarial, rows = [], []
    started = time.perf_counter()
    n = len(inputs.labels)
    for s in tqdm(range(0, n, args.batch_size), desc=f"{args.loss} {args.step}", unit="batch",
                  disable=args.quiet):
        sl = slice(s, s + args.batch_size)
        result = attack(inputs.images[sl].to(device), inputs.targets[sl].to(device),
                        source=inputs.labels[sl].to(device))
        adversarial.append(result.adversarial.cpu())
        rows += [{"index": int(inputs.index[i]), "path": inputs.paths[i],
                  "label": int(inputs.labels[i]), "target": int(inputs.targets[i]), **record}
                 for i, record in enumerate(result.records(), start=s)]
    elapsed = time.perf_counter() - started
    adv = torch.cat(adversarial)
    save_file({"adversarial": adv.contiguous(), "index": inputs.index.contiguous(),
               "label": inputs.labels.contiguous(), "target": inputs.targets.contiguous()},
              os.path.join(args.out, "adversarial.safetensors"))
    with open(os.path.join(args.out, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if args.png:
        from torchvision.utils import save_image

        folder = os.path.join(args.out, "png")
        os.makedirs(folder, exist_ok=True)
        for image, index in zip(adv, inputs.index.tolist()):
            save_image(image, os.path.join(folder, f"{index:06d}.png"))
    flipped = sum(r["flipped"] for r in rows)
    summary = {"config": {k: v for k, v in vars(args).items() if k != "func"} | {
                   "alpha": alpha, "beta": beta, "device": str(device)},
               "n": n, "flipped": flipped / n, "seconds": elapsed, "images_per_s": n / elapsed}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{flipped}/{n} flipped to their target in {elapsed:.1f} s; wrote "
          f"{os.path.join(args.out, 'adversarial.safetensors')}, metrics.csv, summary.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advfast", description="Fast, instrumented targeted "
                                     "adversarial attacks (Ozbulak et al.'s perturbation "
                                     "analysis).")
    sub = parser.add_subparsers(dest="command", required=True)
    t1 = sub.add_parser("table1", help="the paper's Table I and Figs. 1-4: four losses under "
                                       "both step rules")
    _common(t1, n_default=1000)
    t1.add_argument("--alpha", type=float, help="equal multiplier step (paper 5e-4; digits "
                                                f"default {DIGITS_ALPHA})")
    t1.add_argument("--beta", type=float, help="equal perturbation L1 per step (paper 5; "
                                               f"digits default {DIGITS_BETA})")
    t1.add_argument("--out", default="runs/table1", help="output folder")
    t1.add_argument("--no-figures", action="store_true")
    t1.set_defaults(func=cmd_table1)
    at = sub.add_parser("attack", help="one configuration on a folder (or the digits); saves "
                                       "adversarial images and a metrics file")
    _common(at, n_default=None)
    at.add_argument("--loss", choices=ops.LOSSES, default="ce")
    at.add_argument("--step", choices=STEPS, default="equal-perturbation")
    at.add_argument("--alpha", type=float)
    at.add_argument("--beta", type=float)
    at.add_argument("--kappa-mode", choices=ops.KAPPA_MODES, default="clamp")
    at.add_argument("--eps", type=float, help="Linf ball around the clean image")
    at.add_argument("--stop", choices=STOPS, default="flip")
    at.add_argument("--png", action="store_true", help="also write 8-bit PNGs")
    at.add_argument("--out", required=True, help="output folder")
    at.set_defaults(func=cmd_attack)
    gen = sub.add_parser("generate", help="a large adversarial dataset: continuous batching, "
                                          "durable shards, --resume, torchrun")
    generate.add_arguments(gen)
    gen.set_defaults(func=generate.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"advfast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
