"""The drivers that repeat the engine's iteration: :func:`run_fixed` (every sample runs the
same number of iterations; no host synchronisation at all) and :class:`Stream` (continuous
batching: every ``compact_every`` iterations the finished samples leave with one index gather
and new ones take their slots; the only host synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from advfast.engine.core import Engine
from advfast.engine.rows import Rows


def run_fixed(engine: Engine, rows: Rows, iterations: int) -> int:
    """Every row takes ``iterations`` steps, then one forward observes the final images.  No
    host synchronisation.  Returns the number of iterations."""
    for n in range(iterations):
        engine.iterate(rows, n, controlled=False)
    engine.forward_head(rows, iterations, "check")
    return iterations


# feed(k) -> up to k new rows, or None when there are no more
RowFeed = Callable[[int], "Rows | None"]
Accept = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# progress(iterations run, samples finished), at each compaction
Progress = Callable[[int, int], None]


def buckets(capacity: int) -> list[int]:
    """The batch sizes a compiled stream pads to: capacity and the powers of two below it."""
    sizes = {capacity}
    size = 1
    while size < capacity:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class Stream:
    """Continuous batching: iterates over groups of finished rows; ``iterations`` and
    ``samples`` count what ran (set once the stream is exhausted).

    Finished rows leave every ``compact_every`` iterations, and also as soon as every row is
    surely finished: a row takes at most ``horizon`` iterations after it joins.  With
    ``pad_to`` (batch sizes, for a compiled engine) the batch is topped up to the smallest
    size that holds it with ghost rows: finished copies that take no step and are never
    reported, keyed ``ghost_key``.  ``progress`` hears of the iterations run and the samples
    finished at each compaction (the stream synchronises there anyway)."""

    def __init__(self, engine: Engine, feed: RowFeed, capacity: int, compact_every: int,
                 horizon: int, accept: tuple[Accept, Callable[[Rows], torch.Tensor]] | None = None,
                 pad_to: list[int] | None = None, ghost_key: int = -1,
                 progress: Progress | None = None) -> None:
        self.engine, self.feed, self.capacity = engine, feed, capacity
        self.compact_every, self.horizon, self.accept = compact_every, horizon, accept
        self.pad_to, self.ghost_key, self.progress = pad_to, ghost_key, progress
        self.iterations = self.samples = self.finished = 0
        self._deadline = 0
        self._fed_all = False  # the feed has said it has no more

    def __iter__(self) -> Iterator[Rows]:
        n = 0
        rows = self._pad(self._refill(None, n))
        while rows is not None and len(rows):
            self.engine.iterate(rows, n)
            n += 1
            if n % self.compact_every and n < self._deadline:
                continue
            self.engine.control.boundary(rows, self.engine.optimizer)
            if self.accept is not None:
                self._ask_accept(rows)
            # 0: going on, 1: finished, 2: ghost; one host synchronisation every K iterations
            status = rows.done.long() + rows.ghost.long()
            live, finished, _ = torch.bincount(status, minlength=3).tolist()
            self.finished += finished
            if self.progress is not None:  # what that synchronisation told, at no extra cost
                self.progress(n, self.finished)
            if not finished and (self._fed_all or live == self.capacity):
                continue  # nothing leaves and nothing can join: keep the rows as they are
            order = torch.argsort(status, stable=True)
            if finished:
                yield rows.take(order[live:live + finished])
            rows = self._pad(self._refill(rows.take(order[:live]), n))
        self.iterations = n

    def _pad(self, rows: Rows | None) -> Rows | None:
        if self.pad_to is None or rows is None or len(rows) == 0:
            return rows
        size = next(s for s in self.pad_to if s >= len(rows))
        if size == len(rows):
            return rows
        ghosts = rows.take(torch.zeros(size - len(rows), dtype=torch.long,
                                       device=rows.key.device))
        ghosts.ghost = torch.ones_like(ghosts.ghost)
        ghosts.done = torch.ones_like(ghosts.done)
        ghosts.key = torch.full_like(ghosts.key, self.ghost_key)
        return rows.cat(ghosts)

    def _refill(self, rows: Rows | None, n: int) -> Rows | None:
        room = self.capacity - (0 if rows is None else len(rows))
        new = self.feed(room) if room > 0 and not self._fed_all else None
        if new is None or len(new) == 0:
            self._fed_all = self._fed_all or room > 0
            return rows
        self.samples += len(new)
        self._deadline = max(self._deadline, n + self.horizon + 1)
        new = self.engine.begin(new)
        return new if rows is None else rows.cat(new)

    def _ask_accept(self, rows: Rows) -> None:
        """Rows that meet the stop rule finish only once ``accept`` takes their images."""
        accept, waiting_of = self.accept
        index = waiting_of(rows).nonzero()[:, 0]
        if len(index):
            ok = accept(rows.x.detach().index_select(0, index), rows.target.index_select(0, index))
            rows.done = rows.done.index_put((index,), ok)
