"""``advfast generate``: large adversarial datasets, fast and durable, on one device or many.

* Inputs: :func:`advfast.io.selection.select`: the first N correctly classified inputs in index
  order, each with a target keyed by its index; so a rerun or a resume asks for the same work.
* Speed: continuous batching (:meth:`advfast.attacks.BaseAttack.stream`): finished samples
  leave the device batch and new ones take their slots every few iterations; loading
  (DataLoader workers, pinned memory) and writing (a thread) overlap the attack.
* Durability: see :mod:`advfast.io.shards`.  ``--resume`` continues a killed run; a lock keeps
  two runs out of one folder.
* Scale: under ``torchrun`` each rank attacks a disjoint share of the inputs and writes its own
  shards; rank 0 merges one manifest.  NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from advfast import __version__, ops
from advfast.attacks.base import Finished
from advfast.engine.runtime import resolve_device
from advfast.io import models, selection, shards
from advfast.errors import FolderRefused, InvalidValue, UserError
from advfast.io.files import (FolderLock, check_resumable, first_difference, read_json_object,
                              write_json)
from advfast.tools import specs

DTYPES = {"float32": torch.float32, "float16": torch.float16}
CONFIDENCE = 0.9  # the D3 threshold of Definition IV.1, for --stop confidence
FORMATS = ("safetensors", "png")
# Arguments that do not change what a run produces: a resume may differ in them.
NOT_IDENTITY = ("out", "resume", "quiet", "device", "workers", "batch_size", "compact_every",
                "compile", "channels_last")


@dataclass(frozen=True)
class GenerateConfig:
    """Everything ``advfast generate`` needs; see ``advfast generate --help`` for each."""

    out: str
    model: str = "digits"
    weights: str | None = None
    num_classes: int | None = None
    data: str | None = None
    labels_csv: str | None = None
    image_size: int = 224
    split: str = "test"
    n: int | None = None
    targets: str = "random"
    seed: int = 0
    attack: str = "eq11"
    params: dict = field(default_factory=dict)  # the attack's, see advfast.tools.specs.resolve
    batch_size: int = 64
    compact_every: int = 4
    shard_size: int = 1024
    dtype: str = "float32"
    format: str = "safetensors"
    amp: str | None = None
    channels_last: bool = False
    pack_weights: bool = False
    compile: str | None = None
    device: str = "auto"
    workers: int = 0
    resume: bool = False
    quiet: bool = False

    def validate(self) -> None:
        """ValueError for an impossible combination, before anything is written; fills in the
        attack's defaults."""
        for name in ("batch_size", "compact_every", "shard_size", "image_size"):
            if getattr(self, name) < 1:
                raise InvalidValue(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n is not None and self.n < 1:
            raise InvalidValue(f"n must be at least 1, got {self.n}")
        if self.workers < 0:
            raise InvalidValue("workers must not be negative")
        for name, value in self.params.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidValue(f"{name} must be a finite number, got {value}")
        if self.data is None and self.model not in models.BUILTIN:
            raise InvalidValue(f"model {self.model} needs an image folder (data); only the "
                             "digits and mnist models have built-in inputs")
        choices = {"dtype": tuple(DTYPES), "format": FORMATS, "targets": selection.TARGET_RULES,
                   "split": selection.DIGITS_SPLITS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InvalidValue(f"unknown {name} {getattr(self, name)!r}; choose one of "
                                 f"{', '.join(allowed)}")
        builtin = self.model if self.data is None and self.model in models.BUILTIN else None
        self.params.update(specs.resolve(self.attack, self.params, builtin))
        specs.build(self.attack, torch.nn.Identity(), self.params)  # its own checks, now

    def identity(self) -> dict:
        """What a resumed run must repeat exactly (weights by content)."""
        ident = {k: v for k, v in asdict(self).items() if k not in NOT_IDENTITY + ("params",)}
        ident.update(self.params)  # by option name, so a mismatch names the option
        ident["weights"] = models.fingerprint(self.weights)
        return ident


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
    use_cuda = torch.cuda.is_available() and device != "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(),
                 torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu"))


def run(config: GenerateConfig) -> int:
    """Generates (or resumes) the dataset; returns 0.  User errors raise
    :class:`advfast.errors.UserError` (or OSError) with a one-line message.  Everything that
    can be checked is checked before the folder is touched; a new run that fails on a user
    error before its first result leaves nothing behind that would refuse the corrected
    command."""
    config.validate()
    ranks = start_ranks(config.device)
    lock = FolderLock(config.out)
    created = not os.path.lexists(config.out)
    present = True
    try:
        model, source = _model_and_source(config, ranks)
        present = _everyone(ranks, lambda: _open_folder(config, lock) if ranks.main else True)
        if not ranks.main:
            lock.acquire(first=False)
        return _run(config, ranks, model, source)
    except UserError:
        if ranks.main and not present:
            shards.undo_new_run(config.out, created)
        raise
    finally:
        lock.release()
        if ranks.world > 1:
            dist.destroy_process_group()


def _model_and_source(config: GenerateConfig, ranks: Ranks):
    model = models.load(config.model, weights=config.weights, device=ranks.device,
                        num_classes=config.num_classes)
    source = selection.source_for(model, config.data, split=config.split,
                                  labels_csv=config.labels_csv, image_size=config.image_size,
                                  device=ranks.device,
                                  builtin=config.model if config.data is None else "digits")
    return model, source


def _everyone(ranks: Ranks, work) -> object:
    """Runs ``work`` (on rank 0: folder checks) and re-raises its error on every rank."""
    error = None
    try:
        result = work()
    except (UserError, OSError) as err:
        error, result = f"{err}", None
    error = ranks.broadcast(error)
    if error:
        raise InvalidValue(error)
    return result


def _open_folder(config: GenerateConfig, lock: FolderLock) -> bool:
    """Refuses a busy, foreign or mismatched folder; writes config.json first for a new run;
    on a resume, repairs what a killed run left and drops damaged shards.  Returns whether the
    folder held a run."""
    out = config.out
    present = check_resumable(out, config.resume, "config.json", "generate")
    config_path = os.path.join(out, "config.json")
    os.makedirs(out, exist_ok=True)
    lock.acquire(first=True)
    if not present:
        write_json(config_path, {"advfast": __version__, "arguments": asdict(config),
                                 "identity": config.identity(), "torch": torch.__version__,
                                 "backend": ops.backend()})
        return False
    _check_identity(config, config_path)
    rows = shards.recorded_rows(out, repair=True)
    damaged = shards.shard_problems(out, rows)
    if damaged:
        dropped = shards.drop_shards(out, damaged)
        print(f"note: {len(damaged)} damaged or missing shard(s) "
              f"({', '.join(f'{k}: {v}' for k, v in sorted(damaged.items()))}); their {dropped} "
              "inputs are made again", file=sys.stderr)
        rows = shards.recorded_rows(out)
    shards.clean_incomplete(out, rows)
    return True


def _check_identity(config: GenerateConfig, path: str) -> None:
    saved = read_json_object(path, "the run in that folder cannot be resumed")
    identity = saved.get("identity")
    if not isinstance(identity, dict) or "advfast" not in saved:
        raise FolderRefused(f"{path} is damaged or not advfast's (no identity); the run in "
                            "that folder cannot be resumed")
    # A parameter advfast gained after that run was written takes its default there: a new
    # parameter's default is the behaviour before it existed.
    added = {k: v for k, v in specs.PARAMETERS[config.attack].items() if k not in identity}
    differs = first_difference({**added, **identity}, config.identity())
    if differs is not None:
        key, before, now = differs
        raise FolderRefused(f"--resume with a different --{key.replace('_', '-')}: the run in "
                            f"{config.out} used {before!r}, this one {now!r}")


def _run(config: GenerateConfig, ranks: Ranks, model, source: selection.Source) -> int:
    chosen = _selection(config, model, source, ranks)
    if ranks.main and config.n is not None and len(chosen.work) < config.n and not config.quiet:
        print(f"note: only {len(chosen.work)} correctly classified inputs exist (asked for "
              f"{config.n})", file=sys.stderr)
    done = {r["index"] for r in shards.recorded_rows(config.out)}
    mine = [r for pos, r in enumerate(chosen.work) if pos % ranks.world == ranks.rank
            and r["index"] not in done]
    made = _attack(model, source, mine, config, ranks)
    ranks.barrier()
    if ranks.main:
        rows, skipped = shards.finalize(config.out, chosen.skipped)
        flipped = sum(r["flipped"] for r in rows)
        print(f"{len(rows)} adversarial examples in {config.out} ({flipped} flipped to their "
              f"target; {made} made now by rank 0; {len(skipped)} inputs skipped, see "
              "skipped.jsonl)")
    return 0


def _selection(config: GenerateConfig, model, source: selection.Source,
               ranks: Ranks) -> selection.Selection:
    """The saved selection, checked, or a new one (saved by rank 0)."""
    path = os.path.join(config.out, "selection.json")
    if os.path.exists(path):
        return _everyone(ranks, lambda: _read_selection(path, source))
    chosen = selection.select(model, source, config.n, seed=config.seed, targets=config.targets,
                              device=ranks.device, batch_size=config.batch_size,
                              workers=config.workers, rank=ranks.rank, world=ranks.world,
                              gather=ranks.gather)
    if not chosen.work:
        raise InvalidValue(f"none of the {len(source)} inputs of {source.name} is classified "
                         "correctly by the model, so there is nothing to attack (random "
                         "weights? wrong labels or class order?)")
    if ranks.main:
        write_json(path, {"work": chosen.work, "skipped": chosen.skipped})
    ranks.barrier()
    return chosen


def _read_selection(path: str, source: selection.Source) -> selection.Selection:
    try:
        with open(path) as f:
            saved = json.load(f)
        work, skipped = saved["work"], saved["skipped"]
        for row in work:
            source.position(row["index"])  # KeyError for an index the source lacks
            if not (isinstance(row["label"], int) and isinstance(row["target"], int)
                    and row["target"] >= 0 and row["label"] >= 0):
                raise InvalidValue(f"bad row {row}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InvalidValue(f"{path} is damaged or was edited ({type(err).__name__}: {err}); "
                         "the run in that folder cannot be resumed") from err
    return selection.Selection(work, skipped)


class Feeder:
    """``feed(k)`` for :meth:`advfast.attacks.BaseAttack.stream`: the next k samples of this
    rank's work,
    loaded ahead by DataLoader workers into pinned memory.  Inputs that cannot be read any
    more are recorded in the rank's skipped part."""

    def __init__(self, source: selection.Source, work: list[dict], config: GenerateConfig,
                 rank: int, pin: bool) -> None:
        self.rows = {r["index"]: r for r in work}
        self.out, self.rank, self.pin = config.out, rank, pin
        positions = [source.position(r["index"]) for r in work]
        self._items = itertools.chain.from_iterable(
            selection.load(source, positions, config.batch_size, config.workers))

    def __call__(self, k: int):
        got, lost = [], []
        for sample in self._items:
            if sample.image is None:
                lost.append({"index": sample.index, "path": sample.path,
                             "reason": f"unreadable when attacked: {sample.reason}"})
                continue
            got.append(sample)
            if len(got) == k:
                break
        shards.append_skipped(self.out, self.rank, lost)
        if not got:
            return None
        images = torch.stack([s.image for s in got])
        if self.pin:
            images = images.pin_memory()
        rows = [self.rows[s.index] for s in got]
        as_tensor = lambda key: torch.tensor([r[key] for r in rows])  # noqa: E731
        return images, as_tensor("target"), as_tensor("label"), as_tensor("index")


def quantized(images: torch.Tensor) -> torch.Tensor:
    """The 8-bit image an adversarial example becomes when saved as PNG."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def _attack(model, source: selection.Source, work: list[dict], config: GenerateConfig,
            ranks: Ranks) -> int:
    from tqdm.auto import tqdm

    attack = specs.build(config.attack, model, config.params, amp=config.amp,
                           channels_last=config.channels_last,
                           pack_weights=config.pack_weights,
                           compact_every=config.compact_every, time_phases=False,
                           compile=config.compile)
    png = config.format == "png"
    stop = config.params.get("stop")

    def holds(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probs = torch.softmax(model(quantized(images)).float(), dim=1)
        hit = probs.argmax(1) == target
        if stop == "confidence":
            hit &= probs.max(1).values >= CONFIDENCE
        return hit

    # Stop rules wait for the 8-bit image to hold; searches keep their best float image.
    accept = holds if png and stop is not None else None

    writer = shards.ShardWriter(config.out, ranks.rank, config.shard_size, DTYPES[config.dtype],
                                png)
    by_index = {r["index"]: r for r in work}
    bar = tqdm(total=len(work), unit="ex", desc=f"rank {ranks.rank}" if ranks.world > 1
               else "generate", disable=config.quiet or not work, position=ranks.rank)
    feeder = Feeder(source, work, config, ranks.rank, pin=ranks.device.type == "cuda")
    status: dict[str, object] = {}  # shown beside the bar: the stream's iteration, successes
    attack.progress = lambda n, _: (status.update(iteration=n), bar.set_postfix(status))
    made = flipped = 0
    try:
        for finished in attack.stream(feeder, config.batch_size, accept=accept):
            ok = holds(finished.adversarial, finished.key.new_tensor(
                [by_index[k]["target"] for k in finished.key.tolist()])) if png else None
            rows = _manifest_rows(finished, by_index, config, ok)
            writer.put(finished.adversarial.cpu(), rows)
            made += len(rows)
            flipped += sum(r["flipped"] for r in rows)
            status["success"] = f"{flipped / made:.0%}"
            bar.set_postfix(status)
            bar.update(len(rows))
    finally:
        bar.close()
        writer.close()
    return made


def _manifest_rows(done: Finished, by_index: dict, config: GenerateConfig,
                   png_holds: torch.Tensor | None) -> list[dict]:
    rows = []
    for j, (key, record) in enumerate(zip(done.key.tolist(), done.records())):
        src = by_index[key]
        row = {"index": key, "path": src["path"], "label": src["label"], "target": src["target"],
               "attack": config.attack, **config.params, **record}
        if png_holds is not None:
            row["png"] = os.path.join("png", f"{key:08d}.png")
            row["png_holds"] = bool(png_holds[j])
        rows.append(row)
    return rows

