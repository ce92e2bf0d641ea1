"""``advfast detect``: adversarial retraining as a detector, the paper's Tables II and III (see
:mod:`advfast.experiments.detect`)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from tqdm.auto import tqdm

from advfast import ops
from advfast.cli.options import (EQ11_OPTIONS, add_attack_options, add_input_options,
                                 add_model_options, add_out_options, add_run_options,
                                 int_at_least, loss_list, named_folder, number)
from advfast.engine.runtime import resolve_device
from advfast.errors import FolderRefused
from advfast.experiments import detect
from advfast.io import models
from advfast.io.files import (FolderLock, OutputFolder, check_resumable, first_difference,
                              read_json_object, write_json)
from advfast.io.reader import AdversarialDataset
from advfast.tools import specs
from advfast.tools.generate import GenerateConfig
from advfast.tools.generate import run as run_generate


def register(sub) -> None:
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
    add_attack_options(de, names=EQ11_OPTIONS, title="the paper's scheme for --losses")
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
    g.add_argument("--seeds", type=int_at_least(1), default=1,
                   help="train each detector with seeds SEED .. SEED+N-1; report the mean and "
                        "per-seed values")
    g.add_argument("--no-lattice", dest="lattice", action="store_false",
                   help="skip the lattice control (adversarial examples rounded to the genuine "
                        "images' value lattice, as saved images would be)")
    add_run_options(de, names=("device", "batch_size", "threads", "quiet"))
    add_out_options(de, default=os.path.join("runs", "detect"), reuse="resume")
    de.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    builtin = args.model if args.data is None and args.model in models.BUILTIN else None
    detectors = tuple(args.detectors or (detect.LADDER if builtin else detect.PAPER_DETECTORS))
    for name in detectors:  # before hours of generation, not after
        detect.check_detector(name, 1 if args.model in models.BUILTIN else 3)
    for folder in dict(args.sources or {}).values():  # before anything is written
        AdversarialDataset(folder)
    present = check_resumable(args.out, args.resume, "detect.json", "detect")
    sources = dict(args.sources or {})
    losses = args.losses or ([] if sources else list(ops.LOSSES))
    for loss in losses:
        sources[loss] = os.path.join(args.out, "adversarial", loss)
    config = detect.DetectConfig(
        out=args.out, sources=sources, detectors=detectors, weights=args.detector_weights,
        lrs=tuple(args.lr), epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        seeds=args.seeds, lattice=args.lattice, device=str(resolve_device(args.device)),
        quiet=args.quiet)
    lock = FolderLock(args.out)
    try:
        _claim(config, present, lock)
        return _detect(args, config, losses, builtin)
    finally:
        lock.release()


def _detect(args: argparse.Namespace, config: detect.DetectConfig, losses: list[str],
            builtin: str | None) -> int:
    for loss in losses:  # the paper's four losses on the fly, on the same inputs and targets
        _generate(args, loss, config.sources[loss], builtin)
    bar = None if args.quiet else (lambda total: tqdm(total=total, unit="epoch",
                                                      desc="detectors"))
    results = detect.run(config, bar)
    print(detect.format_tables(results))
    folder = OutputFolder(args.out, detect.FILES, overwrite=True)
    detect.write(results, folder)
    print(f"wrote {', '.join(folder.written)} in {args.out}")
    return 0


def _claim(config: detect.DetectConfig, present: bool, lock: FolderLock) -> None:
    """Locks the folder; writes detect.json for a new run, or checks that a resumed one asks
    for the same."""
    path = os.path.join(config.out, "detect.json")
    identity = _identity(config)
    os.makedirs(config.out, exist_ok=True)
    lock.acquire(first=True)
    if not present:
        write_json(path, identity)
        return
    saved = read_json_object(path, f"the run in {config.out} cannot be resumed")
    differs = first_difference(saved, identity)
    if differs is not None:
        key, before, now = differs
        raise FolderRefused(f"--resume with a different {key}: the run in {config.out} used "
                            f"{before!r}, this one {now!r}")


def _identity(config: detect.DetectConfig) -> dict:
    """What a resumed run must repeat; folders inside --out by their relative name, so a
    copied or moved run folder resumes where it is."""
    identity = {k: v for k, v in asdict(config).items() if k not in ("quiet", "device", "out")}
    out = os.path.abspath(config.out)
    identity["sources"] = {name: os.path.relpath(os.path.abspath(folder), out)
                           if os.path.abspath(folder).startswith(out + os.sep)
                           else os.path.abspath(folder)
                           for name, folder in config.sources.items()}
    return identity


def _generate(args: argparse.Namespace, loss: str, folder: str, builtin: str | None) -> None:
    params = specs.resolve("eq11", {**{n: getattr(args, n) for n in EQ11_OPTIONS},
                                    "loss": loss}, builtin)
    config = GenerateConfig(
        out=folder, model=args.model, weights=args.weights, num_classes=args.num_classes,
        data=args.data, labels_csv=args.labels_csv, image_size=args.image_size,
        split=args.split, n=args.n, targets=args.targets, seed=args.seed, params=params,
        batch_size=args.batch_size, device=args.device, quiet=args.quiet,
        resume=os.path.isdir(folder))
    if not args.quiet:
        print(f"adversarial examples, {loss}: {folder}", file=sys.stderr)
    run_generate(config)
