"""The output of ``advfast generate`` read back as a torch Dataset (the reader beside the
writer, :mod:`advfast.io.shards`)."""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from advfast.errors import FolderRefused, MissingFile
from advfast.io import shards


class AdversarialDataset(Dataset):
    """The output of ``advfast generate`` as a torch Dataset, in input-index order.

    Item i is a dict with ``adversarial`` (float32 tensor [C, H, W]), ``index`` (input index),
    ``label``, ``target``, ``flipped`` and the other manifest fields (norms, steps, ...).
    Reads the merged manifest.jsonl, or the per-rank parts of a run that is not finished.

    On open, every shard's size is checked against the manifest (cheap); ``verify=True`` also
    checks each shard's SHA-256.  A missing or damaged shard raises ValueError naming it (run
    ``advfast generate ... --resume`` to make its inputs again).
    """

    def __init__(self, root: str, verify: bool = False) -> None:
        if not os.path.isfile(os.path.join(root, "config.json")):
            raise MissingFile(f"{root} is not an advfast generate output folder "
                                    "(no config.json)")
        self.root = root
        merged = os.path.join(root, "manifest.jsonl")
        if os.path.exists(merged):
            self.rows = shards.read_jsonl(merged)
        else:
            self.rows = sorted(shards.recorded_rows(root), key=lambda r: r["index"])
        problems = shards.shard_problems(root, self.rows, full=verify)
        if problems:
            shown = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())[:3])
            raise FolderRefused(f"{len(problems)} shard(s) of {root} are damaged or missing "
                             f"({shown}); resume the run to make their inputs again")
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
