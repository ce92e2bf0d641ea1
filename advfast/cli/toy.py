"""``advfast toy``: the 2-D experiment (Fig. 6) and a check of Theorem IV.2."""

from __future__ import annotations

import argparse
import os

from advfast.cli.options import add_out_options, claimed, int_at_least
from advfast.experiments import toy
from advfast.io.files import OutputFolder


def register(sub) -> None:
    p = sub.add_parser("toy", help="the 2-D experiment (Fig. 6) and a check of Theorem IV.2")
    p.add_argument("--grid", type=int_at_least(11), default=201, help="grid points per axis")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    add_out_options(p, default=os.path.join("runs", "toy"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = OutputFolder(args.out, toy.FILES, args.overwrite)
    with claimed(out):
        check = toy.run(out, steps=args.grid, seed=args.seed)
        out.record()
    print(f"Theorem IV.2 on the 2-D toy ({check['points']['D1']} grid points in D1, "
          f"{check['points']['D3']} in D3):")
    print(f"  D3: CE gradient / logit gradient, median {check['D3_median_ce_over_logit_gradient']:.2e} "
          f"({check['D3_orders_of_magnitude']:.1f} orders of magnitude smaller); the float32 "
          f"sign has vanished at {check['D3_share_sign_vanished']:.0%} of D3")
    print(f"  D1: |grad CE - (grad g_r - grad g_c)| / |grad g_r - grad g_c|, median "
          f"{check['D1_median_relative_error_of_eq8']:.2e}, within 1 - max softmax: "
          f"{check['D1_error_within_bound']}")
    print(f"wrote {', '.join(out.written)} in {args.out}")
    return 0
