"""``advfast table1``: the paper's Table I and Figs. 1-5, four losses under both step rules."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from advfast import __version__, ops
from advfast.cli.options import (FIG5_INPUTS, add, add_input_options, add_model_options,
                                 add_out_options, add_run_options, arguments, claimed,
                                 setup)
from advfast.experiments import figures, table1, theorem
from advfast.io.files import OutputFolder
from advfast.tools import specs


def register(sub) -> None:
    t1 = sub.add_parser("table1", help="the paper's Table I and Figs. 1-5: four losses under "
                                       "both step rules")
    add_model_options(t1)
    add_input_options(t1, n_default=1000)
    g = t1.add_argument_group("the paper's scheme (Eq. 11), both step rules")
    add(g, "alpha", help="equal multiplier step (None: 5e-4, digits 2e-3)")
    add(g, "beta", help="equal perturbation L1 per step (None: 5, digits 0.1)")
    add(g, "kappa", default=20.0, help="M-logit margin (Eq. 16)")
    add(g, "iterations", default=250, help="iterations per attack")
    add(g, "exact_l1", help="the box-aware table: each equal-perturbation step adds exactly "
                            "beta in L1 where the box leaves room (None: the paper's rule)")
    add(g, "ce_seed", help="CE seed at the target: exact or eager (None: exact)")
    add_run_options(t1)
    add_out_options(t1, default=os.path.join("runs", "table1"))
    t1.add_argument("--no-figures", action="store_true", help="write the table only")
    t1.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = OutputFolder(args.out, [*table1.FILES, *figures.FILES, *theorem.FILES],
                       args.overwrite)
    out.check()
    device, model, chosen = setup(args)
    with claimed(out):
        return _run(args, out, device, model, chosen)


def _run(args: argparse.Namespace, out: OutputFolder, device, model, chosen) -> int:
    alpha, beta = specs.step_sizes(args.model if args.data is None else None, args.alpha,
                                   args.beta)
    if not args.quiet:
        print(f"Table I: {args.model} on {device}, {len(chosen.labels)} images, "
              f"{args.iterations} iterations, alpha={alpha:g}, beta={beta:g}, "
              f"kernels={ops.backend()}, {torch.get_num_threads()} threads", file=sys.stderr)
    cells = table1.run(model, chosen, iterations=args.iterations, alpha=alpha, beta=beta,
                       batch_size=args.batch_size, device=device, amp=args.amp,
                       channels_last=args.channels_last, pack_weights=args.pack_weights,
                       kappa=args.kappa, quiet=args.quiet, compile=args.compile,
                       exact_l1=bool(args.exact_l1), ce_seed=args.ce_seed or "exact")
    print(table1.format_table(cells, alpha, beta))
    config = {**arguments(args), "alpha": alpha, "beta": beta, "device": str(device),
              "n_images": len(chosen.labels), "backend": ops.backend(),
              "torch": torch.__version__, "advfast": __version__,
              "threads": torch.get_num_threads()}
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr,
                                                                      flush=True))
    say(f"Theorem IV.2: gradients along {min(theorem.TABLE1_SAMPLES, len(chosen.labels))} "
        "inputs' CE trajectories ...")
    measured = theorem.for_table1(model, chosen.images.to(device), chosen.targets.to(device),
                                  args.iterations, beta, None if args.no_figures else out)
    table1.write(cells, out, config, measured)
    if not args.no_figures:
        say("drawing Figs. 1-4 from the trajectories ...")
        figures.draw_all(cells, out)
        k = min(FIG5_INPUTS, len(chosen.labels))
        say(f"Fig. 5: attacking {k} inputs with each loss until they flip ...")
        figures.figure5(model, chosen.images[:k].to(device), chosen.targets[:k].to(device),
                        chosen.labels[:k].to(device), beta, args.iterations, out)
    out.record()
    print(f"wrote {', '.join(out.written)} in {args.out}")
    return 0
