"""Controls of the attack engine: when each sample stops, and outer searches over a constant.

Each implements :class:`advfast.engine.core.Control`, the one party that decides when a
sample's run ends (``rows.done``, ``rows.paused``), from the head's statistics and from what
the optimiser reports.  A search keeps its per-sample state in its own typed record
(``rows.control``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advfast import ops
from advfast.engine.core import NO_CAP, Optimizer
from advfast.engine.rows import Rows, State, per_sample

STOPS = ops.STOP_RULES
PREVIOUS_LOSS = 1e6  # the loss the abort check of every CW run starts from (the original's)


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

    def stopping(self) -> tuple[int, str]:
        # the engine's fused observation applies the cap and the rule (a deferred one waits)
        return self.iterations, "never" if self.deferred else self.stop

    def after_head(self, rows: Rows, head: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return active

    def after_step(self, rows: Rows, optimizer: Optimizer) -> None:
        pass

    def boundary(self, rows: Rows, optimizer: Optimizer) -> None:
        pass

    def report(self, rows: Rows) -> torch.Tensor:
        return rows.x.detach()

    def constant(self, rows: Rows) -> None:
        return None


@dataclass(slots=True, eq=False)
class SearchState(State):
    """Per-sample state of a :class:`ConstantSearch`: the best success so far (best_l2 [B]
    squared L2, inf: none; best_x [B, C, H, W]; best_constant [B]), the runs done
    (search_step [B] int64) and whether this run succeeded (succeeded [B] bool)."""

    best_l2: torch.Tensor
    best_x: torch.Tensor
    best_constant: torch.Tensor
    search_step: torch.Tensor
    succeeded: torch.Tensor


@dataclass(slots=True, eq=False)
class CWState(SearchState):
    """:class:`SearchState` plus Carlini and Wagner's bracket on c (lower, upper [B]), the
    iterations of this run (inner_age [B] int64) and the loss at the last abort check
    (previous_loss [B])."""

    lower: torch.Tensor
    upper: torch.Tensor
    inner_age: torch.Tensor
    previous_loss: torch.Tensor


@dataclass(slots=True, eq=False)
class BisectionState(SearchState):
    """:class:`SearchState` plus the largest successful and the smallest failed b [B] (NaN:
    none yet)."""

    b_success: torch.Tensor
    b_failure: torch.Tensor


class ConstantSearch:
    """An outer search over a per-sample constant (``rows.constant``): each sample runs the
    optimiser with one constant until its inner run ends (``rows.paused``, set here from the
    search's own rule or from what the optimiser reports), then, at the next boundary, the
    search picks its next constant and restarts it (``optimizer.restart``: from its clean
    image, or where it is for a warm start), up to
    ``search_steps`` runs.  The sample keeps its best success across runs (smallest L2;
    ``best_x`` of its :class:`SearchState`, else its clean image) and the constant that gave
    it.  While one sample restarts, the others keep going.  Subclasses say what a success is
    and how the constant moves."""

    def __init__(self, initial: float, search_steps: int) -> None:
        self.initial, self.search_steps = initial, search_steps

    def begin(self, rows: Rows) -> None:
        b, device = len(rows), rows.x0.device
        rows.constant = torch.full((b,), self.initial, device=device)
        rows.control = self.new_state(rows, dict(
            best_l2=torch.full((b,), float("inf"), device=device), best_x=rows.x0.clone(),
            best_constant=rows.constant.clone(),
            search_step=torch.zeros(b, dtype=torch.int64, device=device),
            succeeded=torch.zeros(b, dtype=torch.bool, device=device)))

    def new_state(self, rows: Rows, shared: dict[str, torch.Tensor]) -> SearchState:
        """The record of new rows from the fields every search shares."""
        return SearchState(**shared)

    def keep_best(self, rows: Rows, mask: torch.Tensor, images: torch.Tensor) -> None:
        """Takes ``images`` as the new best of the rows in ``mask`` whose L2 beats their best."""
        s = rows.control
        l2sq = (images - rows.x0).flatten(1).square().sum(1)
        better = mask & (l2sq < s.best_l2)
        s.best_l2 = torch.where(better, l2sq, s.best_l2)
        s.best_x = torch.where(per_sample(better, images), images, s.best_x)
        s.best_constant = torch.where(better, rows.constant, s.best_constant)

    def next_constant(self, rows: Rows, ended: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stopping(self) -> tuple[int, str]:
        return NO_CAP, "never"  # a run ends by the search's own rules

    def after_head(self, rows: Rows, head: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return active

    def after_step(self, rows: Rows, optimizer: Optimizer) -> None:
        converged = optimizer.converged(rows)
        if converged is not None:
            rows.paused = rows.paused | converged

    def boundary(self, rows: Rows, optimizer: Optimizer) -> None:
        s = rows.control
        ended = rows.paused & ~rows.done
        s.search_step = s.search_step + ended.long()
        exhausted = ended & (s.search_step >= self.search_steps)
        restart = ended & ~exhausted
        rows.constant = torch.where(restart, self.next_constant(rows, ended), rows.constant)
        rows.done = rows.done | exhausted
        optimizer.restart(rows, restart)
        self.restarted(rows, restart)
        rows.paused = rows.paused & ~restart

    def restarted(self, rows: Rows, mask: torch.Tensor) -> None:
        rows.control.succeeded = rows.control.succeeded & ~mask

    def report(self, rows: Rows) -> torch.Tensor:
        return rows.control.best_x

    def constant(self, rows: Rows) -> torch.Tensor:
        """The constant of each returned image; the last one tried where none succeeded."""
        s = rows.control
        return torch.where(torch.isfinite(s.best_l2), s.best_constant, rows.constant)


class CWSearch(ConstantSearch):
    """Carlini and Wagner's search over c (their L2 attack, the original algorithm).

    Every iteration, a sample whose margin g_t - max_{i != t} g_i exceeds kappa is a success
    and its image becomes its best if closer in L2.  Its inner run ends after ``steps``
    iterations, or, with ``abort_early``, when at a check (every steps // 10 iterations) its
    loss ||X' - X0||^2 + c max(kappa - margin, 0) is above 0.9999 times the loss at the previous
    check (that image is then not taken as a candidate, as in the original).  Then c moves:
    after a run with a success, upper = min(upper, c); without, lower = max(lower, c); c is
    (lower + upper) / 2 once an upper bound exists, else c * 10.  With 10 or more search steps,
    the last run uses the upper bound (the original's "repeat").

    Each run starts its abort check from a previous loss of 1e6 (:data:`PREVIOUS_LOSS`), as
    Carlini's ``l2_attack.py`` did for the paper (``prev = 1e6`` from its first commit, 2017;
    ``np.inf`` since commit e87e2d2, 2018), not from infinity: a run whose loss at
    its first check (iteration 0) exceeds 0.9999e6 -- in practice once c is large, c > 1e5 or
    so -- ends there without a success, so c keeps growing ten-fold (or moves down its
    bracket) instead of that run being carried out."""

    def __init__(self, c: float, kappa: float, steps: int, search_steps: int,
                 abort_early: bool) -> None:
        super().__init__(c, search_steps)
        self.kappa, self.steps, self.abort_early = kappa, steps, abort_early
        self.check_every = max(steps // 10, 1)

    def new_state(self, rows: Rows, shared: dict[str, torch.Tensor]) -> CWState:
        b, device = len(rows), rows.x0.device
        return CWState(**shared, lower=torch.zeros(b, device=device),
                       upper=torch.full((b,), 1e10, device=device),
                       inner_age=torch.zeros(b, dtype=torch.int64, device=device),
                       previous_loss=torch.full((b,), PREVIOUS_LOSS, device=device))

    def after_head(self, rows: Rows, head: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        s = rows.control
        # the loss, the abort check, success, best and the end of a run: one fused op (rows.norms
        # are those of the images the head just saw)
        stepping, better = ops.cw_observe_unchecked(
            head, rows.norms, rows.constant, active, s.inner_age, s.previous_loss, s.best_l2,
            s.best_constant, s.succeeded, rows.paused, self.kappa, self.steps, self.check_every,
            self.abort_early)
        images = rows.x.detach()
        s.best_x = torch.where(per_sample(better, images), images, s.best_x)
        return stepping

    def next_constant(self, rows: Rows, ended: torch.Tensor) -> torch.Tensor:
        s = rows.control
        found, c = s.succeeded, rows.constant
        s.upper = torch.where(ended & found, torch.minimum(s.upper, c), s.upper)
        s.lower = torch.where(ended & ~found, torch.maximum(s.lower, c), s.lower)
        bounded = s.upper < 1e9
        nxt = torch.where(bounded, (s.lower + s.upper) / 2, torch.where(found, c, c * 10))
        if self.search_steps >= 10:  # the original repeats its last step at the upper bound
            nxt = torch.where(s.search_step == self.search_steps - 1, s.upper, nxt)
        return nxt

    def restarted(self, rows: Rows, mask: torch.Tensor) -> None:
        super().restarted(rows, mask)
        s = rows.control
        s.inner_age = torch.where(mask, 0, s.inner_age)
        s.previous_loss = torch.where(mask, PREVIOUS_LOSS, s.previous_loss)


class BisectionSearch(ConstantSearch):
    """Szegedy et al.'s search over b for box-constrained L-BFGS (Eq. 1): the largest b (the
    smallest perturbation) whose minimiser is still predicted as the target.  A run ends when
    the optimiser reports it converged, and is judged where it ends (``optimizer.candidate``).
    After a success, b grows ten-fold until a failure brackets it; after a failure it shrinks
    ten-fold until a success; once bracketed, b is the midpoint of the largest success and the
    smallest failure."""

    def new_state(self, rows: Rows, shared: dict[str, torch.Tensor]) -> BisectionState:
        nan = torch.full((len(rows),), float("nan"), device=rows.x0.device)
        return BisectionState(**shared, b_success=nan, b_failure=nan.clone())

    def boundary(self, rows: Rows, optimizer: Optimizer) -> None:
        ended = rows.paused & ~rows.done
        images, hit = optimizer.candidate(rows)
        success = ended & hit
        self.keep_best(rows, success, images)
        rows.control.succeeded = rows.control.succeeded | success
        super().boundary(rows, optimizer)

    def next_constant(self, rows: Rows, ended: torch.Tensor) -> torch.Tensor:
        s = rows.control
        found, b = s.succeeded, rows.constant
        s.b_success = torch.where(ended & found, torch.fmax(s.b_success, b), s.b_success)
        s.b_failure = torch.where(ended & ~found, torch.fmin(s.b_failure, b), s.b_failure)
        bracketed = ~(torch.isnan(s.b_success) | torch.isnan(s.b_failure))
        return torch.where(bracketed, (s.b_success + s.b_failure) / 2,
                           torch.where(found, b * 10, b / 10))


class SingleRun(ConstantSearch):
    """One inner run per sample with a fixed constant, returning where it ends (successful
    or not): the minimiser of Eq. 1 for that b, say."""

    def __init__(self, constant: float) -> None:
        super().__init__(constant, 1)

    def boundary(self, rows: Rows, optimizer: Optimizer) -> None:
        ended = rows.paused & ~rows.done
        images, _ = optimizer.candidate(rows)
        rows.control.best_x = torch.where(per_sample(ended, images), images, rows.control.best_x)
        rows.done = rows.done | ended

    def constant(self, rows: Rows) -> torch.Tensor:
        return rows.constant
