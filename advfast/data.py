"""Inputs for attacks: scikit-learn's digits (the built-in default) and image folders.

Images are float32 in [0, 1], shape [C, H, W]; labels int64.  The paper attacks only images
the model classifies correctly (they start in D1), with a random target different from the
true class; :func:`correctly_classified` and :func:`random_targets` do that, deterministically.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

DIGITS_SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits: images [N, 1, 8, 8] float32 in [0, 1], labels [N].

    A fixed, seeded 80/20 split: ``train`` (1437 images), ``test`` (360) or ``all`` (1797).
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(DIGITS_SPLITS)}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    chosen = {"train": order[:cut], "test": order[cut:], "all": torch.arange(len(labels))}[split]
    return images[chosen].contiguous(), labels[chosen].contiguous()


def imagenet_eval_transform(size: int = 224) -> Callable:
    """The usual ImageNet evaluation transform, without normalisation (the models carry it):
    resize the short side to size * 256 / 224, centre-crop to size, to a [0, 1] tensor."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size * 256 // 224),
                               transforms.CenterCrop(size), transforms.ToTensor()])


@dataclass(frozen=True)
class Sample:
    """One input image: [C, H, W] float32 in [0, 1] (None if unreadable), label, index, path."""

    image: torch.Tensor | None
    label: int
    index: int
    path: str


class ImageFiles(Dataset):
    """Images on disk, either in torchvision's ImageFolder layout (``root/<class>/<file>``,
    classes indexed in sorted order) or flat with a labels CSV (``filename,label`` rows, an
    optional header).  Unreadable images come back with ``image=None`` instead of raising, so a
    long run can skip and record them."""

    def __init__(self, root: str, labels_csv: str | None = None,
                 transform: Callable | None = None) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = root
        self.transform = transform or imagenet_eval_transform()
        csv_path = labels_csv or os.path.join(root, "labels.csv")
        if labels_csv is not None or os.path.isfile(csv_path):
            self.items = _read_labels_csv(root, csv_path)
        else:
            self.items = _scan_class_folders(root)
        if not self.items:
            raise ValueError(f"no images found in {root!r} (ImageFolder layout or labels.csv)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.items[index]
        try:
            from PIL import Image

            with Image.open(path) as img:
                image = self.transform(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError):
            image = None
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
        raise FileNotFoundError(f"labels file {csv_path!r} does not exist")
    items = []
    with open(csv_path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or (line_no == 1 and not row[-1].strip().lstrip("-").isdigit()):
                continue  # blank line or header
            if len(row) < 2 or not row[1].strip().lstrip("-").isdigit():
                raise ValueError(f"{csv_path}:{line_no}: expected 'filename,label', got {row}")
            items.append((os.path.join(root, row[0].strip()), int(row[1])))
    return items


def _collate(samples: Sequence[Sample]) -> list[Sample]:
    return list(samples)


def correctly_classified(model: torch.nn.Module, images: torch.Tensor | Dataset,
                         labels: torch.Tensor | None = None, n: int | None = None,
                         batch_size: int = 64, device: str | torch.device = "cpu",
                         num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` inputs (in order) that ``model`` classifies correctly.

    Takes either tensors (images [N, C, H, W], labels [N]) or an :class:`ImageFiles` dataset
    (unreadable images are skipped).  Returns (images, labels, input indices) on the CPU.
    """
    model_mode = model.training
    model.eval()
    kept_x, kept_y, kept_i = [], [], []
    count = 0
    if isinstance(images, torch.Tensor):
        if labels is None or len(labels) != len(images):
            raise ValueError("labels must be given, one per image")
        batches = ((images[s:s + batch_size], labels[s:s + batch_size],
                    torch.arange(s, min(s + batch_size, len(images))))
                   for s in range(0, len(images), batch_size))
    else:
        loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers,
                            collate_fn=_collate)
        batches = _readable_batches(loader)
    try:
        with torch.no_grad():
            for x, y, idx in batches:
                pred = model(x.to(device)).argmax(1).cpu()
                ok = pred == y
                kept_x.append(x[ok])
                kept_y.append(y[ok])
                kept_i.append(idx[ok])
                count += int(ok.sum())
                if n is not None and count >= n:
                    break
    finally:
        model.train(model_mode)
    if not kept_x:
        raise ValueError("no inputs to classify")
    x, y, i = torch.cat(kept_x), torch.cat(kept_y), torch.cat(kept_i)
    return (x[:n], y[:n], i[:n]) if n is not None else (x, y, i)


def _readable_batches(loader: DataLoader):
    for samples in loader:
        good = [s for s in samples if s.image is not None]
        if good:
            yield (torch.stack([s.image for s in good]), torch.tensor([s.label for s in good]),
                   torch.tensor([s.index for s in good]))


def random_targets(labels: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A seeded random target class per label, never equal to it: (label + U{1..M-1}) mod M."""
    if num_classes < 2:
        raise ValueError("targets need at least 2 classes")
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randint(1, num_classes, labels.shape, generator=gen)
    return (labels + offset) % num_classes


class AdversarialDataset(Dataset):
    """The output of ``advfast generate`` as a torch Dataset, in input-index order.

    Item i is a dict with ``adversarial`` (float32 tensor [C, H, W]), ``index`` (input index),
    ``label``, ``target``, ``flipped`` and the other manifest fields (norms, steps, ...).
    Reads the merged manifest.jsonl, or the per-rank parts of a run that is not finished.
    """

    def __init__(self, root: str) -> None:
        import json

        from . import shards

        self.root = root
        merged = os.path.join(root, "manifest.jsonl")
        if os.path.exists(merged):
            with open(merged) as f:
                self.rows = [json.loads(line) for line in f]
        else:
            self.rows = sorted(shards.recorded_rows(root), key=lambda r: r["index"])
        if not self.rows and not os.path.isdir(root):
            raise FileNotFoundError(f"{root} is not an advfast generate output folder")
        self._shard_name: str | None = None
        self._shard: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        if row["shard"] != self._shard_name:  # consecutive items mostly share a shard
            from safetensors.torch import load_file

            self._shard = load_file(os.path.join(self.root, row["shard"]))["adversarial"]
            self._shard_name = row["shard"]
        return {**row, "adversarial": self._shard[row["offset"]].float()}
