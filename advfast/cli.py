"""The ``advfast`` command line.

Every option is defined once, in the option groups below, and each subcommand takes the groups
it needs.  A user error (bad option, missing file, weights that do not fit, a folder in use...)
ends with one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch

from . import __version__, attacks, figures, inputs, models, ops, table1
from .attack import STEPS, STOPS
from .engine import COMPILE_MODES
from .generate import DTYPES, FORMATS, GenerateConfig
from .generate import run as run_generate
from .outputs import OutputFolder, check_resumable, write_durably, write_json
from .runtime import resolve_device, set_threads
from .shards import save_png, write_bytes


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
               "8/255, --alpha 2/255, --iterations 10, --random-start, --stop); cw-l2: "
               "Carlini-Wagner L2 (Eqs. 3-4; --c 1e-3, --kappa 0, --iterations 1000, --lr 1e-2, "
               "--binary-search-steps 9, --no-abort-early); lbfgs: box-constrained L-BFGS "
               "(Eq. 1; --b 1e-2, --iterations 100, --history 10, --binary-search-steps 10)")

OPTIONS: dict[str, dict] = {
    "attack": dict(choices=attacks.ATTACKS, default="eq11", help=ATTACK_HELP),
    "loss": dict(choices=ops.LOSSES, help="eq11: source of perturbation (None: ce)"),
    "step": dict(choices=STEPS, help="eq11: step rule (None: equal-perturbation)"),
    "alpha": dict(type=number(positive=True),
                  help="eq11 equal-multiplier step (None: 5e-4, digits 2e-3); ifgs step"),
    "beta": dict(type=number(positive=True),
                 help="eq11 equal-perturbation L1 per step (None: 5, digits 0.1)"),
    "kappa": dict(type=number(), help="M-logit / CW margin (None: eq11 20, cw-l2 0)"),
    "kappa_mode": dict(choices=ops.KAPPA_MODES,
                       help="eq11 M-logit beyond kappa: clamp (CW) or balance (None: clamp)"),
    "eps": dict(type=number(nonnegative=True),
                help="Linf ball around the clean image (eq11: None = no ball; ifgs: 8/255)"),
    "iterations": dict(type=int_at_least(0),
                       help="iterations (None: eq11 250, ifgs 10); steps per constant for "
                            "cw-l2 (1000) and lbfgs (100)"),
    "stop": dict(choices=STOPS, help="eq11/ifgs: stop a sample once it flips, once in D3, or "
                                     "never (None: flip)"),
    "random_start": dict(action="store_const", const=True,
                         help="ifgs: start from a random point in the eps ball (PGD)"),
    "c": dict(type=number(positive=True), help="cw-l2: initial constant (None: 1e-3)"),
    "lr": dict(type=number(positive=True), help="cw-l2: Adam's learning rate (None: 1e-2)"),
    "binary_search_steps": dict(type=int_at_least(1),
                                help="cw-l2 / lbfgs: constants tried per sample (None: 9 / 10)"),
    "abort_early": dict(action="store_const", const=False, flag="--no-abort-early",
                        help="cw-l2: run every step even when the loss stops improving"),
    "b": dict(type=number(positive=True), help="lbfgs: initial constant (None: 1e-2)"),
    "history": dict(type=int_at_least(1), help="lbfgs: (s, y) pairs kept (None: 10)"),
}


def add(group, name: str, **override) -> None:
    """Adds option ``name`` of OPTIONS to ``group``, with per-command overrides (default)."""
    spec = {**OPTIONS[name], **override}
    flag = spec.pop("flag", "--" + name.replace("_", "-"))
    group.add_argument(flag, dest=name, **spec)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="digits",
                   help="'digits' (built-in, no download) or a torchvision classifier name such "
                        "as resnet50")
    g.add_argument("--weights", help="torchvision weights name (downloads) or a local "
                                     ".safetensors/.pt file; without it digits is the built-in "
                                     "trained CNN and torchvision models get seeded random "
                                     "weights")
    g.add_argument("--num-classes", type=int_at_least(2),
                   help="output classes of a torchvision model (None: 1000)")


def add_input_options(parser: argparse.ArgumentParser, n_default: int | None) -> None:
    g = parser.add_argument_group("inputs (the first N correctly classified, in index order)")
    g.add_argument("--data", help="image folder: ImageFolder layout, or flat with labels.csv "
                                  "(None: the digits)")
    g.add_argument("--labels-csv", help="labels file of a flat folder (None: DATA/labels.csv)")
    g.add_argument("--image-size", type=int_at_least(8), default=224,
                   help="centre-crop size of folder images")
    g.add_argument("--split", choices=inputs.DIGITS_SPLITS, default="test",
                   help="digits only: test (never seen in training), train or all")
    g.add_argument("--n", "--num-inputs", dest="n", type=int_at_least(1), default=n_default,
                   help="how many inputs to attack (None: all); under torchrun write "
                        "--num-inputs")
    g.add_argument("--targets", choices=inputs.TARGET_RULES, default="random",
                   help="random (seeded, keyed by input index) or least-likely")
    g.add_argument("--seed", type=int, default=0, help="seed of the random targets")


def add_attack_options(parser: argparse.ArgumentParser, **overrides: dict) -> None:
    g = parser.add_argument_group("attack")
    for name in OPTIONS:
        add(g, name, **overrides.get(name, {}))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("running")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=["bf16", "fp16"], help="autocast forward and backward")
    g.add_argument("--compile", choices=[m for m in COMPILE_MODES if m],
                   help="torch.compile the model's forward with the loss head (None: eager; "
                        "reduce-overhead: CUDA graphs on GPUs)")
    g.add_argument("--batch-size", type=int_at_least(1), default=64, help="device batch")
    g.add_argument("--workers", type=int_at_least(0), default=0, help="image loading processes")
    g.add_argument("--threads", type=int_at_least(1),
                   help="CPU threads (None: $OMP_NUM_THREADS, else the cores this process may "
                        "use)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def add_out_option(parser: argparse.ArgumentParser, default: str | None,
                   overwrite: bool = True) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=default, required=default is None, help="output folder")
    if overwrite:
        g.add_argument("--overwrite", action="store_true",
                       help="reuse a non-empty --out, replacing the files advfast wrote there")


def add_attack_command_options(parser: argparse.ArgumentParser, overwrite: bool) -> None:
    """The options of the commands that run one attack over inputs (attack, generate)."""
    add_model_options(parser)
    add_input_options(parser, n_default=None)
    add_attack_options(parser)
    add_run_options(parser)
    add_out_option(parser, default=None, overwrite=overwrite)


# ---- commands ----------------------------------------------------------------------------

def _attack_params(args: argparse.Namespace) -> dict:
    """The chosen attack's full parameters (defaults filled in), checked before any work."""
    given = {name: getattr(args, name) for name in OPTIONS if name != "attack"}
    digits = getattr(args, "data", None) is None and args.model == "digits"
    return attacks.resolve(args.attack, given, digits)


def _setup(args: argparse.Namespace):
    """Device, model and inputs of table1/attack; the folder is claimed first by the caller."""
    if args.data is None and args.model != "digits":
        raise ValueError(f"--model {args.model} needs --data DIR (only the digits model has "
                         "built-in inputs)")
    device = resolve_device(args.device)
    model = models.load(args.model, weights=args.weights, device=device,
                        num_classes=args.num_classes)
    source = inputs.source_for(model, args.data, split=args.split, labels_csv=args.labels_csv,
                               image_size=args.image_size, device=device)
    chosen, skipped = inputs.prepare(model, source, args.n, seed=args.seed,
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


def _arguments(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command")}


def cmd_table1(args: argparse.Namespace) -> int:
    out = OutputFolder(args.out, [*table1.FILES, *figures.FILES], args.overwrite)
    out.claim()
    device, model, chosen = _setup(args)
    alpha, beta = inputs.step_sizes(args.data is None, args.alpha, args.beta)
    if not args.quiet:
        print(f"Table I: {args.model} on {device}, {len(chosen.labels)} images, "
              f"{args.iterations} iterations, alpha={alpha:g}, beta={beta:g}, "
              f"kernels={ops.backend()}, {torch.get_num_threads()} threads", file=sys.stderr)
    cells = table1.run(model, chosen, iterations=args.iterations, alpha=alpha, beta=beta,
                       batch_size=args.batch_size, device=device, amp=args.amp,
                       kappa=args.kappa, quiet=args.quiet, compile=args.compile)
    print(table1.format_table(cells, alpha, beta))
    config = {**_arguments(args), "alpha": alpha, "beta": beta, "device": str(device),
              "n_images": len(chosen.labels), "backend": ops.backend(),
              "torch": torch.__version__, "advfast": __version__,
              "threads": torch.get_num_threads()}
    table1.write(cells, out, config)
    if not args.no_figures:
        figures.draw_all(cells, out)
        k = min(FIG5_INPUTS, len(chosen.labels))
        figures.figure5(model, chosen.images[:k].to(device), chosen.targets[:k].to(device),
                        chosen.labels[:k].to(device), beta, args.iterations, out)
    out.record()
    print(f"wrote {', '.join(out.written)} in {args.out}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from safetensors.torch import save
    from tqdm.auto import tqdm

    params = _attack_params(args)
    out = OutputFolder(args.out, ["adversarial.safetensors", "metrics.csv", "summary.json",
                                  "png/", "saliency.png"], args.overwrite)
    out.claim()
    device, model, chosen = _setup(args)
    attack = attacks.build(args.attack, model, params, amp=args.amp, compile=args.compile)
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
               {"config": {**_arguments(args), "params": params, "device": str(device),
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


def cmd_generate(args: argparse.Namespace) -> int:
    params = _attack_params(args)
    given = _arguments(args)
    config = GenerateConfig(params=params, **{k: v for k, v in given.items()
                                              if k in GenerateConfig.__dataclass_fields__})
    return run_generate(config)


def cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    from . import bench

    if args.nsys:
        report = os.path.abspath(args.nsys_report)
        command = bench.nsys_command(sys.argv[1:] if args.argv is None else args.argv, report)
        print("running under Nsight Systems:", " ".join(command), file=sys.stderr)
        done = subprocess.run(command)
        if done.returncode == 0:
            print(f"Nsight Systems report: {report}.nsys-rep (NVTX ranges iter N/forward, "
                  "iter N/head, iter N/backward, iter N/update)")
        return done.returncode
    fixed = [o for o in ("stop", "binary_search_steps", "abort_early") if getattr(args, o) is not None]
    if fixed:
        raise ValueError(f"bench runs every sample for all iterations with one constant; "
                         f"{', '.join('--' + o.replace('_', '-') for o in fixed)} would change "
                         "nothing, so leave it out")
    params = _attack_params(args)
    params.pop("iterations", None)
    device = resolve_device(args.device)
    config = bench.BenchConfig(
        model=args.model, weights=args.weights, num_classes=args.num_classes,
        input_size=args.input_size, batch_sizes=tuple(args.batch_size), amp=args.amp,
        channels_last=args.channels_last, compile=tuple(args.compile), attack=args.attack,
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


def cmd_toy(args: argparse.Namespace) -> int:
    from . import toy

    out = OutputFolder(args.out, toy.FILES, args.overwrite)
    out.claim()
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


def cmd_detect(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import detect

    out = args.out
    present = check_resumable(out, args.resume, "detect.json", "detect")
    config_path = os.path.join(out, "detect.json")
    digits = args.data is None and args.model == "digits"
    detectors = tuple(args.detectors or (detect.LADDER if digits else detect.PAPER_DETECTORS))
    for name in detectors:  # before hours of generation, not after
        detect.check_detector(name, 1 if args.model == "digits" else 3)
    sources = dict(args.sources or {})
    losses = args.losses or ([] if sources else list(ops.LOSSES))
    for loss in losses:
        sources[loss] = os.path.join(out, "adversarial", loss)
    config = detect.DetectConfig(
        out=out, sources=sources, detectors=detectors, weights=args.detector_weights,
        lrs=tuple(args.lr), epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        device=str(resolve_device(args.device)), quiet=args.quiet)
    identity = {k: v for k, v in asdict(config).items() if k not in ("quiet", "device")}
    if present:
        try:
            with open(config_path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{config_path} is damaged ({err}); the run in {out} cannot be "
                             "resumed") from err
        for key, value in json.loads(json.dumps(identity)).items():
            if saved.get(key) != value:
                raise ValueError(f"--resume with a different {key}: the run in {out} used "
                                 f"{saved.get(key)!r}, this one {value!r}")
    else:
        os.makedirs(out, exist_ok=True)
        write_json(config_path, identity)
    for loss in losses:  # the paper's four losses on the fly, on the same inputs and targets
        params = attacks.resolve("eq11", {**{n: getattr(args, n) for n in EQ11_OPTIONS},
                                          "loss": loss}, digits)
        folder = sources[loss]
        generated = GenerateConfig(
            out=folder, model=args.model, weights=args.weights, num_classes=args.num_classes,
            data=args.data, labels_csv=args.labels_csv, image_size=args.image_size,
            split=args.split, n=args.n, targets=args.targets, seed=args.seed, params=params,
            batch_size=args.batch_size, device=args.device, quiet=args.quiet,
            resume=os.path.isdir(folder))
        if not args.quiet:
            print(f"adversarial examples, {loss}: {folder}", file=sys.stderr)
        run_generate(generated)
    bar = None if args.quiet else (lambda total: tqdm(total=total, unit="epoch",
                                                      desc="detectors"))
    results = detect.run(config, bar)
    print(detect.format_tables(results))
    folder = OutputFolder(out, detect.FILES, overwrite=True)
    detect.write(results, folder)
    print(f"wrote {', '.join(folder.written)} in {out}")
    return 0


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
    from .bench import PEERS

    names = [n for n in text.split(",") if n] if text not in ("", "none") else []
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {unknown[0]!r}; choose from "
                                         f"{','.join(PEERS)} or none")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="advfast", description="Fast, instrumented targeted adversarial "
                    "attacks (Ozbulak et al.'s perturbation analysis).")
    parser.add_argument("--version", action="version", version=f"advfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    t1 = sub.add_parser("table1", help="the paper's Table I and Figs. 1-5: four losses under "
                                       "both step rules")
    add_model_options(t1)
    add_input_options(t1, n_default=1000)
    g = t1.add_argument_group("the paper's scheme (Eq. 11), both step rules")
    add(g, "alpha", help="equal multiplier step (None: 5e-4, digits 2e-3)")
    add(g, "beta", help="equal perturbation L1 per step (None: 5, digits 0.1)")
    add(g, "kappa", default=20.0, help="M-logit margin (Eq. 16)")
    add(g, "iterations", default=250, help="iterations per attack")
    add_run_options(t1)
    add_out_option(t1, default=os.path.join("runs", "table1"))
    t1.add_argument("--no-figures", action="store_true", help="write the table only")
    t1.set_defaults(func=cmd_table1)

    at = sub.add_parser("attack", help="one attack; saves adversarial images and per-sample "
                                       "metrics")
    add_attack_command_options(at, overwrite=True)
    at.add_argument("--png", action="store_true", help="also write 8-bit PNGs and Fig. 5's "
                                                       "panel")
    at.set_defaults(func=cmd_attack)

    gen = sub.add_parser("generate", help="a large adversarial dataset: continuous batching, "
                                          "durable shards, --resume, torchrun")
    add_attack_command_options(gen, overwrite=False)
    g = gen.add_argument_group("dataset")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--compact-every", type=int_at_least(1), default=4,
                   help="refill finished slots every this many iterations")
    g.add_argument("--shard-size", type=int_at_least(1), default=1024, help="samples per shard")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="stored precision")
    g.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="png: also 8-bit PNGs, attacking until the 8-bit image holds")
    gen.set_defaults(func=cmd_generate)

    be = sub.add_parser("bench", help="per-iteration time of an attack against the floor "
                                      "(bare forward + backward) and installed peers")
    add_model_options(be)
    add_attack_options(be, iterations={"default": 20, "help": "iterations per timed run"})
    g = be.add_argument_group("benchmark")
    g.add_argument("--input-size", type=input_size,
                   help="C,H,W of the random inputs (None: 1,8,8 for digits, else 3,224,224)")
    g.add_argument("--batch-size", type=int_at_least(1), nargs="+", default=[64],
                   help="one table row group per batch size")
    g.add_argument("--channels-last", action="store_true", help="model and inputs NHWC")
    g.add_argument("--compile", nargs="+", default=["none"],
                   choices=["none", *[m for m in COMPILE_MODES if m]],
                   help="eager (none) and/or torch.compile modes to measure")
    g.add_argument("--amp", choices=["bf16", "fp16"], help="autocast forward and backward")
    g.add_argument("--repeats", type=int_at_least(1), default=5,
                   help="round-robin repeats; cells are medians")
    g.add_argument("--peers", type=peer_list, default=["torchattacks", "foolbox", "art"],
                   help="comma-separated peers to time where installed, or none")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int_at_least(1), help="CPU threads")
    g.add_argument("--json", help="also write everything measured here")
    g.add_argument("--nsys", action="store_true",
                   help="run under Nsight Systems (nsys profile -t cuda,nvtx)")
    g.add_argument("--nsys-report", default="advfast-bench",
                   help="report name for --nsys (.nsys-rep is added)")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    be.set_defaults(func=cmd_bench, argv=None)

    de = sub.add_parser("detect", help="adversarial retraining as a detector: the paper's "
                                       "Tables II and III")
    add_model_options(de)
    add_input_options(de, n_default=None)
    de.set_defaults(split="all")
    g = de.add_argument_group("adversarial examples: --from existing folders, or --losses "
                              "generated on the fly (the paper's scheme)")
    g.add_argument("--from", dest="sources", type=named_folder, nargs="+",
                   help="NAME=DIR for each advfast generate output (same inputs)")
    g.add_argument("--losses", type=loss_list,
                   help="generate these (comma-separated) into OUT/adversarial/ (None: all four "
                        "losses unless --from)")
    for name in EQ11_OPTIONS:
        add(g, name)
    g = de.add_argument_group("detectors")
    g.add_argument("--detectors", nargs="+",
                   help="cnn-s, cnn-m, cnn-l (the digits ladder) or torchvision names such as "
                        "alexnet resnet18 vgg16 resnet34 resnet152 (None: the ladder for the "
                        "digits, else the paper's five)")
    g.add_argument("--detector-weights", help="torchvision weights name or file for the "
                                               "detectors (None: trained from scratch)")
    g.add_argument("--lr", type=number(positive=True), nargs="+", default=[1e-5, 1e-4, 1e-3],
                   help="Adam learning rates tried; the best on validation is kept")
    g.add_argument("--epochs", type=int_at_least(1), default=20, help="epochs per detector")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--batch-size", type=int_at_least(1), default=64, help="batch size")
    g.add_argument("--threads", type=int_at_least(1), help="CPU threads")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--out", default=os.path.join("runs", "detect"), help="output folder")
    de.set_defaults(func=cmd_detect)

    toy = sub.add_parser("toy", help="the 2-D experiment (Fig. 6) and a check of Theorem IV.2")
    toy.add_argument("--grid", type=int_at_least(11), default=201, help="grid points per axis")
    toy.add_argument("--seed", type=int, default=0, help="data and training seed")
    add_out_option(toy, default=os.path.join("runs", "toy"))
    toy.set_defaults(func=cmd_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        args.argv = argv
    try:
        set_threads(getattr(args, "threads", None))
        return args.func(args)
    except KeyboardInterrupt:
        print(f"advfast {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"advfast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

