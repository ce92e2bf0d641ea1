"""Durable output of ``advfast generate``: safetensors shards and an append-only manifest.

Layout of an output folder::

    config.json                 written first: advfast's version and every argument that
                                shapes the result (weights by content hash)
    selection.json              the inputs to attack, in order, with their targets
    .lock                       an advisory lock held by every process of a running run
    shards/shard-rRRR-SSSSSS.safetensors   "adversarial" [k, C, H, W], "index" [k]
    parts/manifest-rRRR.jsonl   one JSON row per sample, appended after its shard is durable;
                                each row names its shard, offset, and the shard's size and
                                SHA-256
    parts/skipped-rRRR.jsonl    inputs that could not be attacked, with the reason
    png/IIIIIIII.png            8-bit images (--format png)
    manifest.jsonl, manifest.parquet, skipped.jsonl   merged at the end, sorted by index

A shard is written under a temporary name, fsynced and renamed; only then are its rows
appended (and fsynced) to the manifest part.  Whatever instant a run is killed at, the
manifest names only complete shards; ``--resume`` verifies each shard against its recorded
size and checksum and redoes exactly the samples it lacks.  Cleaning up touches only files
whose names advfast itself uses, inside the folders it made.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import threading
from collections.abc import Iterable

import torch

from advfast.errors import InvalidValue
from advfast.io.files import (LOCK, dumps, inside, is_tmp_name, refuse_link,
                              write_durably)

SHARD_RE = re.compile(r"^shard-r(\d{3})-(\d{6})\.safetensors$")
PART_RE = re.compile(r"^(manifest|skipped)-r(\d{3})\.jsonl$")
PNG_RE = re.compile(r"^\d{8}\.png$")
OWN_FOLDERS = ("shards", "parts", "png")


def read_jsonl(path: str, repair: bool = False) -> list[dict]:
    """Rows of a JSON-lines file advfast appends to.  Without ``repair`` (readers) a torn last
    line or a line that is not a valid row is an error (InvalidValue naming the line).  With
    ``repair`` (a resume) they are cut from the file, durably, so that their inputs are made
    again and appends continue cleanly."""
    refuse_link(path)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows, bad = [], []
    for number, line in enumerate(lines[:-1], start=1):
        row = _parse_row(line)
        (rows if row is not None else bad).append(row if row is not None else number)
    torn = lines[-1] != b""
    if (bad or torn) and not repair:
        where = f"line {bad[0]} is not a valid row" if bad else "its last line is torn"
        raise InvalidValue(f"{path}: {where}; the file was edited or damaged (advfast "
                           "generate, resumed, repairs it)")
    if bad or torn:
        write_durably(path, lambda tmp: _write_rows(tmp, rows))
    return rows


def _parse_row(line: bytes) -> dict | None:
    """The row a manifest or skipped line holds, or None when it is not one: a JSON object
    with an integer index and, for a manifest row, a shard named as advfast names them and
    a non-negative integer offset."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not _is_int(row.get("index")):
        return None
    if "shard" in row and not (valid_shard_name(row["shard"]) and _is_int(row.get("offset"))
                               and row["offset"] >= 0):
        return None
    return row


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def valid_shard_name(name: object) -> bool:
    """Whether ``name`` is a shard's name as advfast writes it: shards/shard-rRRR-SSSSSS...."""
    return isinstance(name, str) and name.startswith("shards/") \
        and SHARD_RE.match(name[len("shards/"):]) is not None


def parts(out: str, kind: str = "manifest") -> list[str]:
    folder = inside(out, "parts")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if PART_RE.match(n) and n.startswith(kind))


def recorded_rows(out: str, repair: bool = False) -> list[dict]:
    """Every manifest row written so far, by any rank."""
    return [row for part in parts(out) for row in read_jsonl(part, repair)]


def shard_problems(out: str, rows: Iterable[dict], full: bool = True) -> dict[str, str]:
    """{shard: what is wrong} for the shards the rows name: missing, another size, or (with
    ``full``) another SHA-256 than recorded."""
    expected: dict[str, tuple] = {}
    for row in rows:
        expected.setdefault(row["shard"], (row.get("shard_bytes"), row.get("shard_sha256")))
    problems = {}
    for name, (size, digest) in expected.items():
        path = inside(out, name)
        if not os.path.isfile(path):
            problems[name] = "missing"
        elif os.path.getsize(path) != size:
            problems[name] = f"{os.path.getsize(path)} bytes instead of {size}"
        elif full and sha256_of(path) != digest:
            problems[name] = "checksum differs"
    return problems


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def drop_shards(out: str, damaged: Iterable[str]) -> int:
    """Removes the rows of the ``damaged`` shards from the manifest parts (durably) and the
    shards themselves (advfast wrote them); returns the number of rows dropped."""
    damaged = set(damaged)
    dropped = 0
    for part in parts(out):
        rows = read_jsonl(part)
        kept = [r for r in rows if r["shard"] not in damaged]
        if len(kept) != len(rows):
            dropped += len(rows) - len(kept)
            write_durably(part, lambda tmp, kept=kept: _write_rows(tmp, kept))
    for name in damaged:
        path = inside(out, name)
        if valid_shard_name(name) and os.path.isfile(path):
            os.remove(path)
    return dropped


def _write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(dumps(r) + "\n" for r in rows)


def clean_incomplete(out: str, rows: Iterable[dict]) -> list[str]:
    """Removes advfast's own temporary files and the shards no manifest row names (a run killed
    between a shard's rename and its manifest append); returns what it removed.  Only names
    advfast uses, inside the folders it made, are touched."""
    named = {row["shard"] for row in rows}
    removed = []
    for folder in ("", *OWN_FOLDERS):
        full = inside(out, folder) if folder else out
        if not os.path.isdir(full):
            continue
        for name in os.listdir(full):
            path = os.path.join(full, name)
            stray_shard = folder == "shards" and SHARD_RE.match(name) and \
                os.path.join("shards", name) not in named
            if ((is_tmp_name(name) and os.path.isfile(path)) or stray_shard) \
                    and not os.path.islink(path):
                os.remove(path)
                removed.append(path)
    return removed


class ShardWriter:
    """Writes finished samples in shards of ``shard_size`` on a background thread.

    ``put(images, rows)`` queues samples ([k, C, H, W] float32 on the CPU and one manifest
    row per sample); ``close()`` writes the last partial shard, stops the thread and raises
    its error, if any (a full disk, say) as OSError.  Neither ever blocks on a dead thread.
    """

    def __init__(self, out: str, rank: int, shard_size: int, dtype: torch.dtype,
                 png: bool = False) -> None:
        self.out, self.rank, self.shard_size, self.dtype, self.png = out, rank, shard_size, dtype, png
        for folder in ("shards", "parts", *(("png",) if png else ())):
            os.makedirs(inside(out, folder), exist_ok=True)
        existing = [int(m.group(2)) for p in os.listdir(os.path.join(out, "shards"))
                    if (m := SHARD_RE.match(p)) and int(m.group(1)) == rank]
        self.next_shard = max(existing, default=-1) + 1
        self.part = inside(out, f"parts/manifest-r{rank:03d}.jsonl")
        self._images: list[torch.Tensor] = []
        self._rows: list[dict] = []
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="advfast-shard-writer",
                                        daemon=True)
        self._thread.start()

    def put(self, images: torch.Tensor, rows: list[dict]) -> None:
        self._send((images, rows))

    def close(self) -> None:
        if self._thread.is_alive():
            self._send(None)
            self._thread.join()
        self._raise_if_failed()

    def _send(self, item: object) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_if_failed()
                    raise RuntimeError("the shard writer stopped")

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise OSError(f"writing to {self.out} failed: {self.error}") from self.error

    def _work(self) -> None:
        """Runs until the None sentinel; on an error it records it and exits at once (the
        producer sees the error at its next put or at close, and never waits on a dead
        thread)."""
        try:
            while (item := self._queue.get()) is not None:
                images, rows = item
                self._images.extend(images.unbind(0))
                self._rows.extend(rows)
                while len(self._rows) >= self.shard_size:
                    self._flush(self.shard_size)
            if self._rows:
                self._flush(len(self._rows))
        except BaseException as err:  # handed to the main thread by put/close
            self.error = err

    def _flush(self, count: int) -> None:
        from safetensors.torch import save

        images = torch.stack(self._images[:count]).to(self.dtype).contiguous()
        rows = self._rows[:count]
        name = f"shards/shard-r{self.rank:03d}-{self.next_shard:06d}.safetensors"
        index = torch.tensor([r["index"] for r in rows], dtype=torch.int64)
        payload = save({"adversarial": images, "index": index})
        write_durably(inside(self.out, name), lambda tmp: write_bytes(tmp, payload))
        if self.png:
            self._write_pngs(images, rows)
        digest = hashlib.sha256(payload).hexdigest()
        with open(self.part, "a") as f:
            for offset, row in enumerate(rows):
                f.write(dumps({**row, "shard": name, "offset": offset,
                               "shard_bytes": len(payload), "shard_sha256": digest}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        del self._images[:count], self._rows[:count]
        self.next_shard += 1

    def _write_pngs(self, images: torch.Tensor, rows: list[dict]) -> None:
        for image, row in zip(images, rows):
            path = inside(self.out, row["png"])
            write_durably(path, lambda tmp, image=image: save_png(image, tmp))


def write_bytes(path: str, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)


def save_png(image: torch.Tensor, path: str) -> None:
    """An 8-bit PNG of image [C, H, W] in [0, 1]: grey for one channel (so it reads back as
    the model's input), RGB for three."""
    from PIL import Image

    pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    Image.fromarray(array, mode="L" if pixels.shape[0] == 1 else "RGB").save(path, format="png")


def append_skipped(out: str, rank: int, rows: list[dict]) -> None:
    """Records inputs that could not be attacked (durably appended to the rank's part)."""
    if not rows:
        return
    os.makedirs(inside(out, "parts"), exist_ok=True)
    with open(inside(out, f"parts/skipped-r{rank:03d}.jsonl"), "a") as f:
        f.writelines(dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())


def finalize(out: str, skipped_at_selection: list[dict]) -> tuple[list[dict], list[dict]]:
    """Merges the parts into manifest.jsonl, manifest.parquet and skipped.jsonl, sorted by
    input index; returns (manifest rows, skipped rows)."""
    rows = sorted(recorded_rows(out), key=lambda r: r["index"])
    done = {r["index"] for r in rows}
    later = [r for part in parts(out, "skipped") for r in read_jsonl(part)
             if r["index"] not in done]
    skipped = sorted({r["index"]: r for r in skipped_at_selection + later}.values(),
                     key=lambda r: r["index"])
    write_durably(inside(out, "manifest.jsonl"), lambda tmp: _write_rows(tmp, rows))
    write_durably(inside(out, "skipped.jsonl"), lambda tmp: _write_rows(tmp, skipped))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    write_durably(inside(out, "manifest.parquet"), lambda tmp: pq.write_table(table, tmp))
    return rows, skipped


def undo_new_run(out: str, created: bool) -> None:
    """After a new run failed on a user error before any result: removes what it wrote
    (config.json, selection.json, the lock, empty parts/ and shards/), and the folder if
    the run created it, so the corrected command finds the folder as it was."""
    if recorded_rows(out):
        return
    for name in ("config.json", "selection.json", LOCK):
        path = inside(out, name)
        if os.path.isfile(path):
            os.remove(path)
    for folder in OWN_FOLDERS:
        path = inside(out, folder)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    if created and os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
