"""``advfast generate``: a large adversarial dataset (see :mod:`advfast.tools.generate`)."""

from __future__ import annotations

import argparse

from advfast.cli.options import (add_attack_command_options, arguments, attack_params,
                                 int_at_least, running_notes)
from advfast.engine.runtime import resolve_device
from advfast.tools.generate import DTYPES, FORMATS, GenerateConfig
from advfast.tools.generate import run as run_generate


def register(sub) -> None:
    gen = sub.add_parser("generate", help="a large adversarial dataset: continuous batching, "
                                          "durable shards, --resume, torchrun")
    add_attack_command_options(gen, reuse="resume")
    g = gen.add_argument_group("dataset")
    g.add_argument("--compact-every", type=int_at_least(1), default=4,
                   help="refill finished slots every this many iterations")
    g.add_argument("--shard-size", type=int_at_least(1), default=1024, help="samples per shard")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="stored precision")
    g.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="png: also 8-bit PNGs, attacking until the 8-bit image holds")
    gen.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = attack_params(args)
    given = arguments(args)
    config = GenerateConfig(params=params, **{k: v for k, v in given.items()
                                              if k in GenerateConfig.__dataclass_fields__})
    running_notes(resolve_device(args.device), args.compile, args.amp, args.quiet)
    return run_generate(config)
