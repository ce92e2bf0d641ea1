"""The output of ``advfast generate`` read back as a torch Dataset (the reader beside the
writer, :mod:`advfast.io.shards`)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from advfast.errors import FolderRefused, InvalidValue, MissingFile
from advfast.io import shards
from advfast.io.files import inside, read_json_object


# Manifest fields that hold text; a missing one reads as "" (numbers read as NaN), so that
# items collate with torch's default DataLoader.
TEXT_FIELDS = ("path", "failure", "png", "shard", "attack", "reason")
IMAGE_DTYPES = (torch.float32, torch.float16)


class AdversarialDataset(Dataset):
    """The output of ``advfast generate`` as a torch Dataset, in input-index order.

    Item i is a dict with ``adversarial`` (float32 tensor [C, H, W]), ``index`` (input index),
    ``label``, ``target``, ``flipped`` and the other manifest fields (norms, steps, ...; a
    missing number is NaN, a missing text ""), so ``DataLoader(dataset, batch_size=...)``
    collates it.  Reads the merged manifest.jsonl, or the per-rank parts of a run that is not
    finished.

    Damage is refused, not trusted (FolderRefused naming the file; ``advfast generate ...
    --resume`` makes the lost inputs again): on open, a torn or edited manifest, a finished
    manifest with fewer rows than selection.json asks for, and a shard of another size than
    recorded (``verify=True``: another SHA-256); on reading a shard, missing tensors, another
    dtype or shape (images of another shape than the other
    shards'), values outside [0, 1], an offset out of range, and a shard whose own
    ``index`` tensor disagrees with the manifest row.
    """

    def __init__(self, root: str, verify: bool = False) -> None:
        if not os.path.isfile(os.path.join(root, "config.json")):
            raise MissingFile(f"{root} is not an advfast generate output folder "
                              "(no config.json)")
        self.root = root
        merged = os.path.join(root, "manifest.jsonl")
        try:
            if os.path.exists(merged):
                self.rows = shards.read_jsonl(merged)
                self._check_complete()
            else:
                self.rows = sorted(shards.recorded_rows(root), key=lambda r: r["index"])
        except InvalidValue as err:
            raise FolderRefused(str(err)) from err
        problems = shards.shard_problems(root, self.rows, full=verify)
        if problems:
            shown = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())[:3])
            raise FolderRefused(f"{len(problems)} shard(s) of {root} are damaged or missing "
                                f"({shown}); resume the run to make their inputs again")
        self._shard_name: str | None = None
        self._shard: dict[str, torch.Tensor] = {}
        self._image_shape: tuple[int, ...] | None = None

    def _check_complete(self) -> None:
        """A finished run's manifest holds every selected input that was not skipped."""
        selected = read_json_object(os.path.join(self.root, "selection.json"),
                                    "the dataset cannot be read").get("work")
        skipped = {r["index"] for r in shards.read_jsonl(os.path.join(self.root,
                                                                      "skipped.jsonl"))}
        if not isinstance(selected, list):
            raise InvalidValue(f"{self.root}/selection.json has no list of work")
        wanted = {r.get("index") for r in selected if isinstance(r, dict)} - skipped
        have = {r["index"] for r in self.rows}
        if have != wanted or len(self.rows) != len(have):
            raise InvalidValue(f"{self.root}/manifest.jsonl has {len(self.rows)} rows for "
                               f"{len(wanted)} selected inputs; it was cut or edited")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        if row["shard"] != self._shard_name:  # consecutive items mostly share a shard
            self._shard = self._load(row["shard"])
            self._shard_name = row["shard"]
        images, index = self._shard["adversarial"], self._shard["index"]
        offset = row["offset"]
        if not 0 <= offset < len(images) or int(index[offset]) != row["index"]:
            raise FolderRefused(f"{row['shard']} in {self.root} does not hold input "
                                f"{row['index']} at offset {offset}; the shard was swapped or "
                                "edited")
        fields = {k: ("" if k in TEXT_FIELDS else float("nan")) if v is None else v
                  for k, v in row.items()}
        return {**fields, "adversarial": images[offset].float()}

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = inside(self.root, name)
        try:
            tensors = load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise FolderRefused(f"{path} cannot be read ({type(err).__name__})") from err
        images, index = tensors.get("adversarial"), tensors.get("index")
        if images is None or index is None or images.dtype not in IMAGE_DTYPES \
                or images.dim() != 4 or index.dtype != torch.int64 \
                or tuple(index.shape) != (len(images),):
            raise FolderRefused(f"{path} does not hold advfast's tensors (adversarial "
                                "[k, C, H, W] float, index [k] int64)")
        if images.numel() and not (images.isfinite().all() and images.min() >= 0
                                   and images.max() <= 1):
            raise FolderRefused(f"{path} holds values outside [0, 1]; it was edited")
        shape = tuple(images.shape[1:])
        if self._image_shape not in (None, shape):
            raise FolderRefused(f"{path} holds images of shape {shape}, the dataset's other "
                                f"shards {self._image_shape}; it was edited")
        self._image_shape = shape
        return tensors
