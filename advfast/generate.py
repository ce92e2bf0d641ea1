"""``advfast generate``: large adversarial datasets, fast and durable, on one device or many.

* Inputs: the first N correctly classified inputs of a folder (or the digits), in a fixed
  order, each with a seeded target; so a rerun or a resume asks for exactly the same work.
* Speed: continuous batching (:meth:`advfast.Attack.stream`): finished samples leave the device
  batch and new ones take their slots every few iterations; loading (DataLoader workers, pinned
  memory) and writing (a thread) overlap the attack.
* Durability: see :mod:`advfast.shards`.  ``--resume`` continues a killed run.
* Scale: under ``torchrun`` each rank attacks a disjoint share of the inputs and writes its own
  shards; rank 0 merges one manifest.  NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from . import data, models, ops, shards
from .attack import STEPS, STOPS, Attack, Finished
from .inputs import resolve_device, step_sizes

# Arguments that shape the result: a resumed run must repeat them exactly.
IDENTITY = ("model", "weights", "data", "labels_csv", "image_size", "num_classes", "n", "loss",
            "step", "alpha", "beta", "kappa", "kappa_mode", "eps", "iterations", "stop",
            "targets", "seed", "amp", "dtype", "format")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: object) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: object) -> object:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start_ranks(device: str | None) -> Ranks:
    """One process, or the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, resolve_device(device))
    use_cuda = torch.cuda.is_available() and device not in ("cpu",)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(),
                 torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"))


class Source(Dataset):
    """Candidate inputs by index: (image [C, H, W] or None, label, path)."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.data is None:
            if args.model != "digits":
                raise ValueError("--data DIR is required for models other than the digits")
            self.images, self.labels = data.digits("all")
            self.files = None
        else:
            self.files = data.ImageFiles(args.data, args.labels_csv,
                                         data.imagenet_eval_transform(args.image_size))

    def __len__(self) -> int:
        return len(self.labels) if self.files is None else len(self.files)

    def __getitem__(self, i: int) -> tuple:
        if self.files is None:
            return self.images[i], int(self.labels[i]), ""
        sample = self.files[i]
        return sample.image, sample.label, sample.path


def _as_list(batch: list) -> list:
    return batch


def _load(source: Source, indices: list[int], workers: int, batch_size: int):
    """Batches of (index, image or None, label, path), in index order, loaded by workers."""
    loader = DataLoader(torch.utils.data.Subset(source, indices), batch_size=batch_size,
                        num_workers=workers, collate_fn=_as_list)
    position = 0
    for batch in loader:
        yield [(indices[position + j], *item) for j, item in enumerate(batch)]
        position += len(batch)


def select(model: torch.nn.Module, source: Source, args: argparse.Namespace,
           ranks: Ranks) -> tuple[list[dict], list[dict]]:
    """The first N correctly classified inputs in index order with their targets, and the
    unreadable ones; every rank classifies a share of each chunk of candidates."""
    total = len(source)
    wanted = args.n or total
    offsets = torch.randint(1, 1 << 30, (total,), generator=torch.Generator().manual_seed(args.seed))
    chosen, skipped, start = [], [], 0
    chunk = max(4 * args.batch_size * ranks.world, 256)
    while len(chosen) < wanted and start < total:
        mine = list(range(start + ranks.rank, min(start + chunk, total), ranks.world))
        found = []
        for group in _load(source, mine, args.workers, args.batch_size):
            readable = [g for g in group if g[1] is not None]
            found += [{"index": i, "path": p, "reason": "unreadable image"}
                      for i, img, _, p in group if img is None]
            if not readable:
                continue
            x = torch.stack([g[1] for g in readable]).to(ranks.device)
            with torch.no_grad():
                logits = model(x)
            for (i, _, label, path), row in zip(readable, logits.cpu()):
                if int(row.argmax()) != label:
                    continue
                classes = len(row)
                target = (int(row.argmin()) if args.targets == "least-likely"
                          else (label + 1 + int(offsets[i]) % (classes - 1)) % classes)
                found.append({"index": i, "path": path, "label": label, "target": target})
        merged = sorted((r for part in ranks.gather(found) for r in part), key=lambda r: r["index"])
        chosen += [r for r in merged if "label" in r]
        skipped += [r for r in merged if "reason" in r]
        start += chunk
    return chosen[:wanted], skipped


class Feeder:
    """``feed(k)`` for :meth:`Attack.stream`: the next k samples of this rank's work, loaded
    ahead by DataLoader workers into pinned memory."""

    def __init__(self, source: Source, work: list[dict], args: argparse.Namespace,
                 pin: bool) -> None:
        self.rows = {r["index"]: r for r in work}
        self.pin = pin
        self._items = itertools.chain.from_iterable(
            _load(source, [r["index"] for r in work], args.workers, args.batch_size))

    def __call__(self, k: int):
        got = []
        for index, image, _, _ in self._items:
            if image is None:  # readable at selection, unreadable now: recorded as failed
                continue
            got.append((index, image))
            if len(got) == k:
                break
        if not got:
            return None
        images = torch.stack([g[1] for g in got])
        if self.pin:
            images = images.pin_memory()
        rows = [self.rows[i] for i, _ in got]
        target = torch.tensor([r["target"] for r in rows])
        label = torch.tensor([r["label"] for r in rows])
        return images, target, label, torch.tensor([i for i, _ in got])


def quantized(images: torch.Tensor) -> torch.Tensor:
    """The 8-bit image an adversarial example becomes when saved as PNG."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def check_config(args: argparse.Namespace) -> dict:
    """Refuses a non-empty folder without --resume, and a resume with other arguments."""
    config = {key: getattr(args, key) for key in IDENTITY}
    path = os.path.join(args.out, "config.json")
    busy = os.path.isdir(args.out) and os.listdir(args.out)
    if busy and not args.resume:
        raise ValueError(f"output folder {args.out} is not empty; pass --resume to continue the "
                         "run in it, or choose another --out")
    if args.resume and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)["arguments"]
        for key in IDENTITY:
            if saved.get(key) != config[key]:
                raise ValueError(f"--resume with a different --{key.replace('_', '-')}: the run in "
                                 f"{args.out} used {saved.get(key)!r}, this one {config[key]!r}")
    return config


def run(args: argparse.Namespace) -> int:
    ranks = start_ranks(args.device)
    try:
        return _run(args, ranks)
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, ranks: Ranks) -> int:
    if args.n is not None and args.n < 1:
        raise ValueError("--n must be at least 1")
    alpha, beta = step_sizes(args)
    error = None
    if ranks.main:
        try:
            config = check_config(args)
            os.makedirs(args.out, exist_ok=True)
            probe = os.path.join(args.out, ".write-test.tmp")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
            done_rows = shards.recorded_rows(args.out, repair=True)
            shards.clean_incomplete(args.out, done_rows)
        except (ValueError, OSError) as err:
            error = str(err)
    error = ranks.broadcast(error)
    if error:
        raise ValueError(error)
    model = models.load(args.model, weights=args.weights, device=ranks.device,
                        num_classes=args.num_classes)
    source = Source(args)
    selection_path = os.path.join(args.out, "selection.json")
    if os.path.exists(selection_path):
        with open(selection_path) as f:
            selection = json.load(f)
        work, skipped = selection["work"], selection["skipped"]
    else:
        work, skipped = select(model, source, args, ranks)
        if ranks.main:
            shards.write_json(selection_path, {"work": work, "skipped": skipped})
            shards.write_json(os.path.join(args.out, "config.json"),
                              {"arguments": config, "torch": torch.__version__,
                               "backend": ops.backend(), "world_size": ranks.world})
            with open(os.path.join(args.out, "skipped.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in skipped)
    ranks.barrier()
    if ranks.main and args.n is not None and len(work) < args.n and not args.quiet:
        print(f"note: only {len(work)} correctly classified inputs exist (asked for {args.n})",
              file=sys.stderr)
    done = {r["index"] for r in shards.recorded_rows(args.out)}
    mine = [r for pos, r in enumerate(work) if pos % ranks.world == ranks.rank
            and r["index"] not in done]
    produced = _attack(model, source, mine, args, ranks, alpha, beta)
    ranks.barrier()
    if ranks.main:
        rows = shards.finalize(args.out)
        flipped = sum(r["flipped"] for r in rows)
        print(f"{len(rows)} adversarial examples in {args.out} ({flipped} flipped to their target; "
              f"{produced} made now by rank 0, {len(skipped)} inputs skipped as unreadable)")
    return 0


def _attack(model, source: Source, work: list[dict], args: argparse.Namespace, ranks: Ranks,
            alpha: float, beta: float) -> int:
    from tqdm.auto import tqdm

    attack = Attack(model, loss=args.loss, step=args.step, alpha=alpha, beta=beta,
                    iterations=args.iterations, kappa=args.kappa, kappa_mode=args.kappa_mode,
                    eps=args.eps, stop=args.stop, amp=args.amp, record=False,
                    compact_every=args.compact_every, time_phases=False)
    png = args.format == "png"

    def holds(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probs = torch.softmax(model(quantized(images)).float(), dim=1)
        hit = probs.argmax(1) == target
        if args.stop == "confidence":
            hit &= probs.max(1).values >= attack.threshold
        return hit

    writer = shards.ShardWriter(args.out, ranks.rank, args.shard_size, DTYPES[args.dtype], png)
    rows_by_index = {r["index"]: r for r in work}
    bar = tqdm(total=len(work), unit="ex", desc=f"rank {ranks.rank}" if ranks.world > 1 else "generate",
               disable=args.quiet or not work, position=ranks.rank)
    feeder = Feeder(source, work, args, pin=ranks.device.type == "cuda")
    started, made, flipped = time.perf_counter(), 0, 0
    try:
        for finished in attack.stream(feeder, args.batch_size, accept=holds if png else None):
            ok = holds(finished.adversarial, finished.key.new_tensor(
                [rows_by_index[int(k)]["target"] for k in finished.key])) if png else None
            rows = _manifest_rows(finished, rows_by_index, args, alpha, beta, ok)
            writer.put(finished.adversarial.cpu(), rows)
            made += len(rows)
            flipped += sum(r["flipped"] for r in rows)
            rate = made / (time.perf_counter() - started)
            bar.set_postfix(ex_s=f"{rate:.1f}", success=f"{flipped / made:.0%}")
            bar.update(len(rows))
    finally:
        writer.close()
        bar.close()
    return made


def _manifest_rows(done: Finished, by_index: dict, args: argparse.Namespace, alpha: float,
                   beta: float, png_holds: torch.Tensor | None) -> list[dict]:
    rows = []
    for j, (key, record) in enumerate(zip(done.key.tolist(), done.records())):
        src = by_index[key]
        row = {"index": key, "path": src["path"], "label": src["label"], "target": src["target"],
               "loss": args.loss, "step": args.step,
               "step_param": alpha if args.step == "equal-multiplier" else beta,
               "iterations": args.iterations, **record}
        if png_holds is not None:
            row["png"] = os.path.join("png", f"{key:08d}.png")
            row["png_holds"] = bool(png_holds[j])
        rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits")
    parser.add_argument("--weights")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--data", help="image folder; default: all scikit-learn digits")
    parser.add_argument("--labels-csv")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n", "--num-inputs", dest="n", type=int,
                        help="the first N correctly classified inputs (under torchrun write "
                             "--num-inputs: torchrun takes --n for one of its own options)")
    parser.add_argument("--loss", choices=ops.LOSSES, default="ce")
    parser.add_argument("--step", choices=STEPS, default="equal-perturbation")
    parser.add_argument("--alpha", type=float, help="equal multiplier step")
    parser.add_argument("--beta", type=float, help="equal perturbation L1 per step")
    parser.add_argument("--kappa", type=float, default=20.0)
    parser.add_argument("--kappa-mode", choices=ops.KAPPA_MODES, default="clamp")
    parser.add_argument("--eps", type=float)
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--stop", choices=STOPS, default="flip")
    parser.add_argument("--targets", choices=("random", "least-likely"), default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="device batch (slots)")
    parser.add_argument("--compact-every", type=int, default=4,
                        help="refill finished slots every this many iterations")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--format", choices=("safetensors", "png"), default="safetensors",
                        help="png: also 8-bit PNGs, attacking until the 8-bit image holds")
    parser.add_argument("--amp", choices=["bf16", "fp16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="image loading processes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quiet", action="store_true")
