"""Durable output of ``advfast generate``: safetensors shards and an append-only manifest.

Layout of an output folder::

    config.json                 the model, weights and every argument that shapes the result
    selection.json              the inputs to attack, in order, with their targets
    skipped.jsonl               inputs that could not be read
    shards/shard-rRRR-SSSSSS.safetensors   "adversarial" [k, C, H, W], "index" [k]
    parts/manifest-rRRR.jsonl   one JSON row per sample, appended after its shard is durable
    png/IIIIIIII.png            8-bit images (--format png)
    manifest.jsonl, manifest.parquet       the merged manifest, sorted by input index

A shard is written under a temporary name, flushed, fsynced and renamed; only then are its
rows appended (and fsynced) to the manifest part.  Whatever instant a run is killed at, the
manifest names only complete shards, and a resumed run redoes exactly the samples it lacks.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import threading
from collections.abc import Iterable

import torch

SHARD_RE = re.compile(r"shard-r(\d+)-(\d+)\.safetensors$")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, write) -> None:
    """Calls ``write(tmp_path)``, fsyncs the file, renames it to ``path``, fsyncs the folder.
    On any error the temporary file is removed and the error re-raised."""
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: object) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    write_durably(path, dump)


def read_jsonl(path: str, repair: bool = False) -> list[dict]:
    """Rows of a JSON-lines file.  A torn last line (a run killed mid-append) is dropped, and
    with ``repair`` cut from the file so appends continue cleanly."""
    if not os.path.exists(path):
        return []
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
            if not line.endswith(b"\n"):
                rows.pop()
                break
            good_bytes += len(line)
    if repair and good_bytes != os.path.getsize(path):
        with open(path, "rb+") as f:
            f.truncate(good_bytes)
            os.fsync(f.fileno())
    return rows


def manifest_parts(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, "parts", "manifest-r*.jsonl")))


def recorded_rows(out: str, repair: bool = False) -> list[dict]:
    """Every manifest row written so far, by any rank."""
    return [row for part in manifest_parts(out) for row in read_jsonl(part, repair)]


def clean_incomplete(out: str, rows: Iterable[dict]) -> list[str]:
    """Removes temporary files and shards that no manifest row names (a run killed between a
    shard's rename and its manifest append); returns what it removed."""
    named = {row["shard"] for row in rows}
    removed = []
    for path in glob.glob(os.path.join(out, "**", ".*.tmp"), recursive=True):
        os.remove(path)
        removed.append(path)
    for path in glob.glob(os.path.join(out, "shards", "shard-*.safetensors")):
        if os.path.relpath(path, out) not in named:
            os.remove(path)
            removed.append(path)
    return removed


class ShardWriter:
    """Writes finished samples in shards of ``shard_size`` on a background thread.

    ``put(tensors, rows)`` queues samples: tensors {"adversarial": [k, ...] float32,
    "index": [k] int64} on the CPU, and one manifest row (dict) per sample.  ``close()`` writes
    the last partial shard and re-raises any error of the thread (a full disk, say).
    """

    def __init__(self, out: str, rank: int, shard_size: int, dtype: torch.dtype,
                 png: bool = False) -> None:
        self.out, self.rank, self.shard_size, self.dtype, self.png = out, rank, shard_size, dtype, png
        os.makedirs(os.path.join(out, "shards"), exist_ok=True)
        os.makedirs(os.path.join(out, "parts"), exist_ok=True)
        if png:
            os.makedirs(os.path.join(out, "png"), exist_ok=True)
        existing = [int(m.group(2)) for p in os.listdir(os.path.join(out, "shards"))
                    if (m := SHARD_RE.search(p)) and int(m.group(1)) == rank]
        self.next_shard = max(existing, default=-1) + 1
        self.part = os.path.join(out, "parts", f"manifest-r{rank:03d}.jsonl")
        self._images: list[torch.Tensor] = []
        self._rows: list[dict] = []
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="advfast-shard-writer",
                                        daemon=True)
        self._thread.start()

    def put(self, adversarial: torch.Tensor, rows: list[dict]) -> None:
        self._raise_if_failed()
        self._queue.put((adversarial, rows))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise OSError(f"writing to {self.out} failed: {self.error}") from self.error

    def _work(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                adversarial, rows = item
                self._images.extend(adversarial.unbind(0))
                self._rows.extend(rows)
                while len(self._rows) >= self.shard_size:
                    self._flush(self.shard_size)
            if self._rows:
                self._flush(len(self._rows))
        except BaseException as err:  # handed to the main thread by put/close
            self.error = err
            while self._queue.get() is not None:  # let the producer finish without blocking
                pass

    def _flush(self, count: int) -> None:
        from safetensors.torch import save_file

        images = torch.stack(self._images[:count]).to(self.dtype).contiguous()
        rows = self._rows[:count]
        name = os.path.join("shards", f"shard-r{self.rank:03d}-{self.next_shard:06d}.safetensors")
        index = torch.tensor([r["index"] for r in rows], dtype=torch.int64)
        write_durably(os.path.join(self.out, name),
                      lambda tmp: save_file({"adversarial": images, "index": index}, tmp))
        if self.png:
            self._write_pngs(images, rows)
        with open(self.part, "a") as f:
            for offset, row in enumerate(rows):
                f.write(json.dumps({**row, "shard": name, "offset": offset}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        del self._images[:count], self._rows[:count]
        self.next_shard += 1

    def _write_pngs(self, images: torch.Tensor, rows: list[dict]) -> None:
        from torchvision.utils import save_image

        for image, row in zip(images, rows):
            path = os.path.join(self.out, row["png"])
            write_durably(path, lambda tmp, image=image: save_image(image.float(), tmp,
                                                                     format="png"))


def finalize(out: str) -> list[dict]:
    """Merges the manifest parts into manifest.jsonl and manifest.parquet, sorted by input
    index; returns the rows."""
    rows = sorted(recorded_rows(out), key=lambda r: r["index"])

    def write_jsonl(tmp: str) -> None:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    write_durably(os.path.join(out, "manifest.jsonl"), write_jsonl)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return rows
    table = pa.Table.from_pylist(rows)
    write_durably(os.path.join(out, "manifest.parquet"), lambda tmp: pq.write_table(table, tmp))
    return rows
