"""``advfast bench``: per-iteration time of an attack against the floor (a bare forward +
backward) and the installed peers (see :mod:`advfast.tools.bench`)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from advfast.cli.options import (add_attack_options, add_model_options, add_run_options,
                                 attack_params, input_size, int_at_least, peer_list)
from advfast.engine.core import COMPILE_MODES
from advfast.engine.runtime import resolve_device
from advfast.errors import InvalidValue
from advfast.io.files import write_json
from advfast.tools import bench


def register(sub) -> None:
    be = sub.add_parser("bench", help="per-iteration time of an attack against the floor "
                                      "(bare forward + backward) and installed peers")
    add_model_options(be)
    add_attack_options(be, iterations={"default": 20, "help": "iterations per timed run"})
    add_run_options(be, names=("device", "amp", "channels_last", "pack_weights", "batch_size",
                                "compile", "threads", "quiet"),
                    batch_size={"nargs": "+", "default": [64],
                                "help": "one table row group per batch size"},
                    compile={"nargs": "+", "default": ["none"],
                             "choices": ["none", *[m for m in COMPILE_MODES if m]],
                             "help": "eager (none) and/or torch.compile modes to measure"})
    g = be.add_argument_group("benchmark")
    g.add_argument("--input-size", type=input_size,
                   help="C,H,W of the random inputs (None: 1,8,8 for digits, else 3,224,224)")
    g.add_argument("--repeats", type=int_at_least(1), default=5,
                   help="round-robin repeats; cells are medians")
    g.add_argument("--peers", type=peer_list, default=["torchattacks", "foolbox", "art"],
                   help="comma-separated peers to time where installed, or none")
    g.add_argument("--json", help="also write everything measured here")
    g.add_argument("--nsys", action="store_true",
                   help="run under Nsight Systems (nsys profile -t cuda,nvtx)")
    g.add_argument("--nsys-report", default="advfast-bench",
                   help="report name for --nsys (.nsys-rep is added)")
    be.set_defaults(func=run, argv=None)


def run(args: argparse.Namespace) -> int:
    if args.nsys:
        report = os.path.abspath(args.nsys_report)
        command = bench.nsys_command(sys.argv[1:] if args.argv is None else args.argv, report)
        print("running under Nsight Systems:", " ".join(command), file=sys.stderr)
        done = subprocess.run(command)
        if done.returncode == 0:
            print(f"Nsight Systems report: {report}.nsys-rep (NVTX ranges iter N/forward, "
                  "iter N/head, iter N/backward, iter N/update)")
        return done.returncode
    fixed = [o for o in ("stop", "binary_search_steps", "abort_early", "warm_start")
             if getattr(args, o) is not None]
    if fixed:
        raise InvalidValue(f"bench runs every sample for all iterations with one constant; "
                         f"{', '.join('--' + o.replace('_', '-') for o in fixed)} would change "
                         "nothing, so leave it out")
    params = attack_params(args)
    params.pop("iterations", None)
    device = resolve_device(args.device)
    config = bench.BenchConfig(
        model=args.model, weights=args.weights, num_classes=args.num_classes,
        input_size=args.input_size, batch_sizes=tuple(args.batch_size), amp=args.amp,
        channels_last=args.channels_last, pack_weights=args.pack_weights,
        compile=tuple(args.compile), attack=args.attack,
        params=params, iterations=args.iterations, repeats=args.repeats,
        peers=tuple(args.peers), device=device)
    progress = (lambda text: None) if args.quiet else (
        lambda text: print(f"\r{text[:100]:<100}", end="", file=sys.stderr, flush=True))
    report = bench.run(config, progress)
    if not args.quiet:
        print(file=sys.stderr)
    print(bench.format_results(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0
