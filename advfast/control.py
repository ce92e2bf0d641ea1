"""Controls of the attack engine: when each sample stops, and outer searches over a constant.

Each implements :class:`advfast.engine.Control`.
"""

from __future__ import annotations

import torch

from .engine import Optimizer, Rows

STOPS = ("never", "flip", "confidence")


class StopRule:
    """A sample stops after ``iterations`` steps, or earlier once it meets the stop rule:
    "flip" (predicted as the target) or "confidence" (in D3, Definition IV.1); "never" runs
    every sample for all iterations.  With ``deferred`` a sample that meets the rule stops
    only once the stream's ``accept`` takes it (checked every ``compact_every`` iterations)."""

    def __init__(self, iterations: int, stop: str = "never", deferred: bool = False) -> None:
        self.iterations, self.stop, self.deferred = iterations, stop, deferred

    def begin(self, rows: Rows) -> None:
        pass

    def meets(self, rows: Rows) -> torch.Tensor:
        """Whether each row meets the stop rule now."""
        if self.stop == "flip":
            return rows.hit
        if self.stop == "confidence":
            return rows.subspace == 3
        return torch.zeros_like(rows.hit)

    def waiting(self, rows: Rows) -> torch.Tensor:
        """Rows that meet a deferred stop rule and wait for ``accept``."""
        return self.meets(rows) & ~rows.done

    def after_head(self, rows: Rows, head: torch.Tensor) -> None:
        finished = rows.age >= self.iterations
        if self.stop != "never" and not self.deferred:
            finished = finished | self.meets(rows)
        rows.done = rows.done | finished

    def after_step(self, rows: Rows, optimizer: Optimizer) -> None:
        pass

    def report(self, rows: Rows) -> torch.Tensor:
        return rows.x.detach()
