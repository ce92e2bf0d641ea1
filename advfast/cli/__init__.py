"""The ``advfast`` command line: one module per command, each with ``register`` (its options,
taken from :mod:`advfast.cli.options`, where every option is defined once) and ``run``.

A user error (a bad option, a missing file, weights that do not fit, a folder in use: an
:class:`advfast.errors.UserError`, or the operating system refusing a file) ends with one line
on stderr and exit status 2.  Anything else is a bug in advfast or a failure of the machine
(a CUDA out-of-memory, say): its traceback is printed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning.  On a shared
# machine spinning threads fight the other jobs for the cores, and an attack with two
# threads ran 4x slower than with one (bench/bench_threads.py measures it); a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from advfast import __version__  # noqa: E402
from advfast.cli import attack, bench, detect, generate, table1, toy  # noqa: E402
from advfast.cli.options import Parser  # noqa: E402
from advfast.engine.runtime import keep_freed_memory, set_threads  # noqa: E402
from advfast.errors import UserError  # noqa: E402

COMMANDS = (table1, attack, generate, bench, detect, toy)
# The library names its parameters; the command line shows them as its flags.
FLAGS = {"overwrite=True": "--overwrite", "resume=True": "--resume", "out folder": "--out",
         "(num_classes)": "(--num-classes)", "as weights": "with --weights",
         "generate, resumed,": "generate --resume", "(image size ": "(--image-size ",
         "(model name such as ": "(--model "}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="advfast", description="Fast, instrumented targeted adversarial "
                    "attacks (Ozbulak et al.'s perturbation analysis).")
    parser.add_argument("--version", action="version", version=f"advfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        args.argv = argv
    try:
        keep_freed_memory()
        set_threads(getattr(args, "threads", None))
        return args.func(args)
    except KeyboardInterrupt:
        print(f"advfast {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as err:
        print(f"advfast {args.command}: error: {as_flags(err)}", file=sys.stderr)
        return 2


def as_flags(err: BaseException) -> str:
    """The error's message on one line, with the library's parameter names as flags."""
    message = " ".join(str(err).split()) or type(err).__name__
    for name, flag in FLAGS.items():
        message = message.replace(name, flag)
    return message
