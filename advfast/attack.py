"""The attack engine: the optimiser of the paper's Section V (Eqs. 11-16).

    X_{n+1} = clip_[0,1](X_n + a_n * P_n)                                   (Eq. 11)

P_n comes from the CE gradient (Eq. 12), its sign (IFGS, Eq. 13), the target logit (Eq. 14)
or the Carlini-Wagner M-logit margin with kappa (Eqs. 15-16); a_n = alpha ("equal multiplier")
or beta / sum|P_n| per sample ("equal perturbation").  Each iteration is forward ->
``ops.loss_head`` -> gradient w.r.t. the input only -> ``ops.perturb_step_``; everything the
paper plots is written into preallocated device buffers, so the loop never waits on the host
unless a stop rule asks it to (and then once every ``compact_every`` iterations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .timing import PhaseTimer, Timing

STEPS = ("equal-multiplier", "equal-perturbation")
STOPS = ("never", "flip", "confidence")
AMPS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Per-iteration records: the first seven come from loss_head's stats, p_l1 from the step.
TRAJECTORY = ("source_prob", "target_prob", "source_logit", "target_logit", "max_prob",
              "subspace", "margin", "p_l1")
_HEAD_COLUMNS = [ops.HEAD_STATS.index(name) for name in TRAJECTORY[:-1]]
_HIT = ops.HEAD_STATS.index("hit")
_SUBSPACE = ops.HEAD_STATS.index("subspace")
_TARGET_PROB = ops.HEAD_STATS.index("target_prob")
NORMS = ("l1", "l2", "linf")


@dataclass
class PerSample:
    """Per-sample outcome of an attack; tensors on the attack's device.

    adversarial: [B, C, H, W] float32, the final images (for stop rules: where each stopped).
    first_flip: [B] int64, steps applied when the prediction first equalled the target
        (0 if it already did, -1 if never).
    at_flip: {"l1", "l2", "linf"} -> [B] float32 norms of X_flip - X_0 (NaN where no flip).
    final: {"l1", "l2", "linf", "target_prob"} -> [B] float32 for the final images.
    steps: [B] int64, steps applied to each sample.
    """

    adversarial: torch.Tensor
    first_flip: torch.Tensor
    at_flip: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    steps: torch.Tensor

    @classmethod
    def build(cls, adversarial: torch.Tensor, first_flip: torch.Tensor, flip_norms: torch.Tensor,
              norms: torch.Tensor, target_prob: torch.Tensor, steps: torch.Tensor, **extra):
        """From [B, 3] norm tensors (L1, L2, Linf) and the rest, plus a subclass's fields."""
        return cls(adversarial=adversarial, first_flip=first_flip,
                   at_flip=dict(zip(NORMS, flip_norms.unbind(1))),
                   final={**dict(zip(NORMS, norms.unbind(1))), "target_prob": target_prob},
                   steps=steps, **extra)

    def records(self) -> list[dict]:
        """One plain dict per sample, on the host: first_flip, steps, ``{l1,l2,linf}_at_flip``,
        ``{l1,l2,linf,target_prob}_final`` and flipped (first_flip >= 0)."""
        columns = {"first_flip": self.first_flip, "steps": self.steps,
                   **{f"{k}_at_flip": v for k, v in self.at_flip.items()},
                   **{f"{k}_final": v for k, v in self.final.items()}}
        host = {name: values.tolist() for name, values in columns.items()}
        rows = [dict(zip(host, values)) for values in zip(*host.values())]
        for row in rows:
            row["flipped"] = row["first_flip"] >= 0
        return rows


@dataclass
class AttackResult(PerSample):
    """What one attack call produced, in batch order: the :class:`PerSample` fields, plus

    source, target: [B] int64 as used.
    trajectory: {name: [iterations + 1, B] float32} for the names in TRAJECTORY (row n is X_n;
        NaN after a sample stopped, and p_l1 is NaN in the last row); None when record=False.
    timing: see :class:`advfast.timing.Timing`.
    """

    source: torch.Tensor
    target: torch.Tensor
    trajectory: dict[str, torch.Tensor] | None
    timing: Timing


@dataclass
class Finished(PerSample):
    """Samples that left the device batch together (see :meth:`Attack.stream`): the
    :class:`PerSample` fields plus ``key``, the caller's id of each sample."""

    key: torch.Tensor


@contextmanager
def frozen(model: nn.Module, channels_last: bool = False) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the attack; the model's mode, requires_grad
    flags and memory format are restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class Attack:
    """A targeted attack on ``model`` (images in [0, 1] -> logits).

    Args:
        loss: "ce" (Eq. 12), "ce-sign" (IFGS, Eq. 13), "logit" (Eq. 14), "m-logit" (CW, Eq. 15).
        step: "equal-multiplier" (a_n = alpha) or "equal-perturbation" (a_n = beta / sum|P_n|).
        beta, alpha: the step parameters (paper, ImageNet: beta = 5, alpha = 5e-4).
        iterations: steps to run (paper: 250).
        kappa, kappa_mode: the M-logit margin (paper: 20) and what happens beyond it, see
            :func:`advfast.ops.loss_head`.
        eps: optional Linf radius around the clean image (IFGS's Clip_{X,eps}, Eq. 2).
        stop: "never" (all iterations, as the paper's trajectories), "flip" (a sample stops once
            predicted as the target) or "confidence" (once in D3).
        threshold: the D1/D2/D3 confidence threshold (Definition IV.1, 0.9).
        record: keep the per-iteration trajectory (cheap: device buffers, no host sync).
        amp: None, "bf16" or "fp16": forward and backward under autocast; image and step stay
            float32.
        channels_last: run model and images in channels_last memory format.
        compact_every: with a stop rule, drop finished samples every this many iterations (the
            only host synchronisation in the loop).
        time_phases: time forward / backward / update separately (costs events on CUDA).
    """

    def __init__(self, model: nn.Module, loss: str = "ce", step: str = "equal-perturbation",
                 beta: float = 5.0, alpha: float = 5e-4, iterations: int = 250,
                 kappa: float = 20.0, kappa_mode: str = "clamp", eps: float | None = None,
                 stop: str = "never", threshold: float = 0.9, record: bool = True,
                 amp: str | None = None, channels_last: bool = False, compact_every: int = 8,
                 time_phases: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _choice("loss", loss, ops.LOSSES)
        _choice("kappa_mode", kappa_mode, ops.KAPPA_MODES)
        _choice("step", step, STEPS)
        _choice("stop", stop, STOPS)
        _choice("amp", amp, tuple(AMPS))
        for name, value in (("beta", beta), ("alpha", alpha)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not math.isfinite(kappa):
            raise ValueError(f"kappa must be finite, got {kappa!r}")
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        if not (isinstance(iterations, int) and iterations >= 0):
            raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
        if not (isinstance(compact_every, int) and compact_every >= 1):
            raise ValueError(f"compact_every must be a positive integer, got {compact_every!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold!r}")
        self.model = model
        self.loss, self.step, self.stop = loss, step, stop
        self.alpha, self.beta = float(alpha), float(beta)
        self.iterations, self.kappa, self.kappa_mode = iterations, float(kappa), kappa_mode
        self.eps = None if eps is None else float(eps)
        self.threshold, self.record, self.amp = float(threshold), record, amp
        self.channels_last, self.compact_every = channels_last, compact_every
        self.time_phases = time_phases
        self.last_timing: Timing | None = None  # of the latest call or finished stream

    def _step_rule(self) -> dict[str, float]:
        return {"alpha": self.alpha} if self.step == "equal-multiplier" else {"beta": self.beta}

    def __call__(self, images: torch.Tensor, target: torch.Tensor,
                 source: torch.Tensor | None = None) -> AttackResult:
        device = model_device(self.model)
        x0 = _check_images(images).to(device, torch.float32)
        target = _check_labels(target, "target", len(x0)).to(device)
        if source is not None:
            source = _check_labels(source, "source", len(x0)).to(device)
        with frozen(self.model, self.channels_last):
            if self.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), self._autocast(device):
                logits = self.model(x0)
            if source is None:
                source = logits.argmax(dim=1)
            classes = logits.shape[1]
            ops._check_indices(target, classes, "target")
            ops._check_indices(source, classes, "source")
            return self._run(x0, target, source)

    def stream(self, feed: Feed, capacity: int,
               accept: Accept | None = None) -> Iterator[Finished]:
        """Continuous batching: keeps up to ``capacity`` samples on the device, and every
        ``compact_every`` iterations hands back the finished ones and refills their slots.

        Args:
            feed: ``feed(k)`` returns up to k new samples as (images [k, C, H, W] in [0, 1],
                target [k], source [k], key [k] int64: the caller's id), or None when there
                are no more.
            capacity: the device batch size.
            accept: optional ``accept(images, target) -> bool [k]`` applied, at each
                compaction, to samples that meet the stop rule; a sample it rejects keeps
                going (up to ``iterations``).  Used to demand that the 8-bit image holds.

        Yields :class:`Finished` groups in completion order.  The same per-sample results as
        calling the attack on each sample alone (eval mode: samples do not interact).
        """
        if not (isinstance(capacity, int) and capacity >= 1):
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        device = model_device(self.model)
        classes: list[int] = []

        def rows_from_feed(k: int) -> _Rows | None:
            fed = feed(k)
            if fed is None or len(fed[0]) == 0:
                return None
            images, target, source, key = fed
            x0 = _check_images(images).to(device, torch.float32, non_blocking=True)
            if self.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            target, source, key = (t.to(device, non_blocking=True) for t in (target, source, key))
            if not classes:
                with torch.no_grad(), self._autocast(device):
                    classes.append(self.model(x0[:1]).shape[1])
            ops._check_indices(target, classes[0], "target")
            ops._check_indices(source, classes[0], "source")
            return _Rows.start(key, x0, target, source)

        with frozen(self.model, self.channels_last):
            rows = rows_from_feed(capacity)
            if rows is None:
                return
            loop = self._loop(rows, refill=rows_from_feed, capacity=capacity, accept=accept)
            for done in self._drain(loop):
                yield _finished(done)

    def _drain(self, loop: Generator[_Rows, None, Timing]) -> Iterator[_Rows]:
        """Yields the rows ``loop`` finishes and keeps its timing in ``last_timing``."""
        self.last_timing = yield from loop

    def _autocast(self, device: torch.device):
        return (torch.autocast(device.type, dtype=AMPS[self.amp]) if self.amp
                else nullcontext())

    def _run(self, x0: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> AttackResult:
        batch, device = len(x0), x0.device
        adversarial = torch.empty_like(x0)
        first_flip = torch.empty((batch,), dtype=torch.int64, device=device)
        flip_norms = torch.empty((batch, 3), device=device)
        norms = torch.empty((batch, 3), device=device)
        target_prob = torch.empty((batch,), device=device)
        steps = torch.empty((batch,), dtype=torch.int64, device=device)
        trajectory = (torch.full((self.iterations + 1, len(TRAJECTORY), batch), float("nan"),
                                 device=device) if self.record else None)
        rows = _Rows.start(torch.arange(batch, device=device), x0, target, source)
        for done in self._drain(self._loop(rows, trajectory=trajectory)):
            adversarial.index_copy_(0, done.key, done.x.detach())
            first_flip.index_copy_(0, done.key, done.first_flip)
            flip_norms.index_copy_(0, done.key, done.flip_norms)
            norms.index_copy_(0, done.key, done.norms)
            target_prob.index_copy_(0, done.key, done.target_prob)
            steps.index_copy_(0, done.key, done.age)
        return AttackResult.build(
            adversarial.contiguous(), first_flip, flip_norms, norms, target_prob, steps,
            source=source, target=target, timing=self.last_timing,
            trajectory=(None if trajectory is None
                        else dict(zip(TRAJECTORY, trajectory.unbind(1)))))

    def _loop(self, rows: _Rows, refill: Callable[[int], _Rows | None] | None = None,
              capacity: int = 0, accept: Accept | None = None,
              trajectory: torch.Tensor | None = None) -> Generator[_Rows, None, Timing]:
        """The attack loop over the rows on the device; yields rows as they finish and returns
        the timing.  Without refill or accept every row starts together, so the loop knows
        statically when it ends: with stop="never" it never synchronises with the host."""
        device, iterations = rows.x.device, self.iterations
        sign, rule = self.loss == "ce-sign", self._step_rule()
        ends_together = refill is None and accept is None
        syncs = self.stop != "never" or not ends_together
        stop_now = accept is None and self.stop != "never"  # else stops wait for accept()
        autocast = self._autocast(device)
        timer = PhaseTimer(device, per_phase=self.time_phases)
        timer.restart()
        samples, n = len(rows), 0
        while True:
            last = ends_together and n == iterations
            timer.begin(n, check=last)
            with autocast:
                logits = self.model(rows.x)
            timer.end("forward")
            seed, head = ops.loss_head(logits.detach(), rows.target, rows.source, self.loss,
                                       self.kappa, self.kappa_mode, self.threshold,
                                       validate_indices=False)
            rows.observe(head)
            if trajectory is not None:
                trajectory[n, :-1].index_copy_(1, rows.key, head[:, _HEAD_COLUMNS].t())
            if last:
                timer.end("check")
                yield rows
                break
            finished = rows.age >= iterations
            if stop_now:
                finished = finished | rows.meets(self.stop)
            rows.done = rows.done | finished
            timer.end("head")
            (grad,) = torch.autograd.grad(logits, rows.x, seed.to(logits.dtype))
            timer.end("backward")
            active = ~rows.done if syncs else None
            with torch.no_grad():
                step_stats = ops.perturb_step_(rows.x, grad, rows.x0, sign=sign, eps=self.eps,
                                               active=active, **rule)
            rows.norms = step_stats[:, 1:]
            rows.age = rows.age + (1 if active is None else active.long())
            if trajectory is not None:
                trajectory[n, -1].index_copy_(0, rows.key, step_stats[:, 0])
            timer.end("update")
            n += 1
            if syncs and n % self.compact_every == 0:
                if accept is not None and self.stop != "never":
                    waiting = rows.meets(self.stop) & ~rows.done
                    if bool(waiting.any()):  # host sync, every K steps
                        rows.done = rows.done.clone()
                        rows.done[waiting] = accept(rows.x.detach()[waiting], rows.target[waiting])
                if bool(rows.done.any()):  # host sync, every K steps
                    yield rows.select(rows.done)
                    rows = rows.select(~rows.done)
                if refill is not None and len(rows) < capacity:
                    new = refill(capacity - len(rows))
                    if new is not None:
                        samples += len(new)
                        rows = _Rows.cat(rows, new)
                if len(rows) == 0:
                    break
        return timer.finish(n, samples)


Feed = Callable[[int], "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None"]
Accept = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _finished(rows: _Rows) -> Finished:
    return Finished.build(rows.x.detach(), rows.first_flip, rows.flip_norms, rows.norms,
                          rows.target_prob, rows.age, key=rows.key)


class _Rows:
    """The samples on the device, one row each, and their running state."""

    FIELDS = ("key", "x", "x0", "target", "source", "age", "first_flip", "flip_norms", "norms",
              "target_prob", "hit", "subspace", "done")

    def __init__(self, **fields: torch.Tensor) -> None:
        for name in self.FIELDS:
            setattr(self, name, fields[name])

    @classmethod
    def start(cls, key: torch.Tensor, x0: torch.Tensor, target: torch.Tensor,
              source: torch.Tensor) -> _Rows:
        b, device = len(key), x0.device
        nan = torch.full((b,), float("nan"), device=device)
        return cls(key=key, x=x0.clone().requires_grad_(True), x0=x0, target=target,
                   source=source, age=torch.zeros(b, dtype=torch.int64, device=device),
                   first_flip=torch.full((b,), -1, dtype=torch.int64, device=device),
                   flip_norms=torch.full((b, 3), float("nan"), device=device),
                   norms=torch.zeros((b, 3), device=device), target_prob=nan,
                   hit=torch.zeros(b, dtype=torch.bool, device=device), subspace=nan.clone(),
                   done=torch.zeros(b, dtype=torch.bool, device=device))

    def __len__(self) -> int:
        return len(self.key)

    def observe(self, head: torch.Tensor) -> None:
        """Takes in loss_head's stats of the current images (X_age)."""
        self.hit = head[:, _HIT] > 0.5
        self.subspace = head[:, _SUBSPACE]
        self.target_prob = head[:, _TARGET_PROB]
        newly = self.hit & (self.first_flip < 0)
        self.first_flip = torch.where(newly, self.age, self.first_flip)
        self.flip_norms = torch.where(newly[:, None], self.norms, self.flip_norms)

    def meets(self, stop: str) -> torch.Tensor:
        """Whether each row meets the stop rule ("flip" or "confidence": in D3)."""
        return self.hit if stop == "flip" else self.subspace == 3

    def select(self, mask: torch.Tensor) -> _Rows:
        picked = {name: getattr(self, name)[mask] for name in self.FIELDS if name != "x"}
        return _Rows(x=self.x.detach()[mask].requires_grad_(True), **picked)

    @staticmethod
    def cat(a: _Rows, b: _Rows) -> _Rows:
        joined = {name: torch.cat([getattr(a, name), getattr(b, name)])
                  for name in _Rows.FIELDS if name != "x"}
        x = torch.cat([a.x.detach(), b.x.detach()]).requires_grad_(True)
        return _Rows(x=x, **joined)


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"unknown {name} {value!r}; choose one of {shown}")


def _check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise ValueError(f"images must lie in [0, 1], got values in [{lo.item():.4g}, "
                             f"{hi.item():.4g}]; attacks work on unnormalised images (the "
                             "models from advfast.models.load normalise internally)")
    return images.detach()


def _check_labels(labels: object, name: str, batch: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (batch,):
        raise ValueError(f"{name} must be int64 of shape [{batch}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return labels
