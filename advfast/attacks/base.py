"""The base of every attack: :class:`BaseAttack` holds what they share (input checks, the
frozen model, the two drivers of :mod:`advfast.engine.drivers`, the results and their timing);
an attack is a subclass that names its head, optimiser and control (:meth:`BaseAttack.parts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from advfast import ops
from advfast.engine.core import (AMPS, COMPILE_MODES, FAILURES, TRAJECTORY, Control, Engine,
                                 Head, Optimizer, autocast, compiled_forward_head, frozen,
                                 model_device, trajectory_buffer, weights_cast_once)
from advfast.engine.packing import check_packable, weights_packed
from advfast.engine.drivers import Progress, Stream, buckets, run_fixed
from advfast.engine.rows import Rows, start_rows
from advfast.engine.timing import PhaseTimer, Timing
from advfast.errors import InvalidType, InvalidValue

NORMS = ("l1", "l2", "linf")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
__all__ = ["AttackResult", "AttackStream", "BaseAttack", "Finished", "PerSample", "NORMS",
           "TRAJECTORY", "FAILURES"]


@dataclass
class PerSample:
    """Per-sample outcome of an attack; tensors on the attack's device.

    adversarial: [B, C, H, W] float32, the images each sample returns (for stop rules: where it
        stopped; for searches: its best success, or its clean image when none).
    first_flip: [B] int64, steps applied when the prediction first equalled the target
        (0 if it already did, -1 if never).
    at_flip: {"l1", "l2", "linf"} -> [B] float32 norms of X_flip - X_0 (NaN where no flip).
    final: {"l1", "l2", "linf", "target_prob"} -> [B] float32 for the returned images.
    steps: [B] int64, steps applied to each sample.
    failure: [B] int64, why a sample stopped early: 0 (it did not) or an index into
        ``engine.FAILURES`` (1: the model's logits were not finite; the sample stopped at the
        last image it reached, which stays finite).
    constant: [B] float32, for attacks with a search over a constant (CW's c, L-BFGS's b):
        the constant of the returned image (the last one tried where none succeeded); else
        None.
    """

    adversarial: torch.Tensor
    first_flip: torch.Tensor
    at_flip: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    steps: torch.Tensor
    failure: torch.Tensor
    constant: torch.Tensor | None

    def records(self) -> list[dict]:
        """One plain dict per sample, on the host: first_flip, steps, ``{l1,l2,linf}_at_flip``,
        ``{l1,l2,linf,target_prob}_final``, flipped (first_flip >= 0), failure (None or the
        reason) and, for searches, constant.  Non-finite numbers become None (strict JSON)."""
        columns = {"first_flip": self.first_flip, "steps": self.steps,
                   **{f"{k}_at_flip": v for k, v in self.at_flip.items()},
                   **{f"{k}_final": v for k, v in self.final.items()}}
        if self.constant is not None:
            columns["constant"] = self.constant
        host = {name: values.tolist() for name, values in columns.items()}
        rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in zip(host, values)} for values in zip(*host.values())]
        for row, code in zip(rows, self.failure.tolist()):
            row["flipped"] = row["first_flip"] >= 0
            row["failure"] = FAILURES[code] or None
        return rows


@dataclass
class AttackResult(PerSample):
    """What one attack call produced, in batch order: the :class:`PerSample` fields, plus

    source, target: [B] int64 as used.
    trajectory: {name: [iterations + 1, B] float32} for the names in TRAJECTORY (row n is X_n;
        NaN from the row after a sample's last observed image, and p_l1 is NaN where no step
        was taken from X_n, so in the last row); None when record=False.
    timing: see :class:`advfast.engine.timing.Timing`.
    """

    source: torch.Tensor
    target: torch.Tensor
    trajectory: dict[str, torch.Tensor] | None
    timing: Timing


@dataclass
class Finished(PerSample):
    """Samples that left the device batch together (see :meth:`BaseAttack.stream`): the
    :class:`PerSample` fields plus ``key``, the caller's id of each sample."""

    key: torch.Tensor


# feed(k) -> up to k new samples (images [k, C, H, W] in [0, 1], target [k], source [k],
# key [k] int64), or None when there are no more.
Feed = Callable[[int], "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None"]
Accept = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_compact_every(device: torch.device) -> int:
    """``compact_every`` where none is given: 1 on the CPU, where the host synchronisation
    costs nothing (the kernels ran on the calling thread), so that a search's ended runs
    restart and finished samples leave at once (CW-L2 on ResNet-18 3x32x32: 11 % fewer rows
    through the model, the same images; docs/benchmarks.md); 8 elsewhere, where each
    synchronisation drains the device's queue of launches."""
    return 1 if device.type == "cpu" else 8


class BaseAttack:
    """What every attack on the engine shares.  A subclass says what its head, optimiser and
    control are (:meth:`parts`), how many iterations a sample can take at most
    (:attr:`horizon`) and whether every sample runs exactly that many (:attr:`fixed`).

    Args (shared by every attack):
        record: keep the per-iteration trajectory (device buffers, no host sync; refused when
            it would exceed ``engine.MAX_TRAJECTORY_BYTES``).
        amp: None, "bf16" or "fp16": forward and backward under autocast; images and the update
            stay float32.  A call (not a stream, not under ``compile``) casts the model's conv
            and linear weights to amp's dtype once, for its duration
            (:func:`advfast.engine.core.weights_cast_once`: the bits autocast would cast them
            to on every model call).
        channels_last: run model and images in channels_last memory format.
        pack_weights: CPU, eager, float32 or bf16 only: lay each ``nn.Conv2d`` weight out for
            oneDNN once per call (or stream) instead of on every model call
            (:func:`advfast.engine.packing.weights_packed`): ResNet-18 3x32x32 at batch 16,
            one thread, 1.3-1.5x a call.  The same convolutions to float32 rounding (with
            channels_last the same bits where tested), not bit for bit the plain model's.
        compact_every: with stop rules or searches, restart the samples whose run of the
            search ended and drop the finished ones every this many iterations (the only host
            synchronisation in the loop; until then they go through the model for nothing).
            Default (None): :func:`default_compact_every` of the model's device when the
            attack is made, 1 on the CPU and 8 on a GPU.
        time_phases: time forward / head / backward / update separately (CUDA events).
        compile: None (eager), or a torch.compile mode for the model's forward with the loss
            head ("default", "max-autotune", "reduce-overhead": CUDA graphs on GPUs;
            "aot_eager": traced, not code-generated, for debugging).  Shapes are static: a
            fixed batch compiles once; a stream pads its batch to ``engine.buckets(capacity)``
            (capacity and the powers of two below it), at most one compilation each.

    ``progress`` (an attribute, None by default): ``progress(iterations, finished)``, called
    at each compaction of a call that stops samples early or searches (never in the
    fixed-iteration loop, which does not synchronise with the host).
    """

    horizon: int = 0
    fixed: bool = False
    searches: bool = False

    def __init__(self, model: nn.Module, *, record: bool = False, amp: str | None = None,
                 channels_last: bool = False, compact_every: int | None = None,
                 time_phases: bool = True, compile: str | None = None,
                 pack_weights: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidType(f"model must be a torch.nn.Module, got {type(model).__name__}")
        choice("amp", amp, tuple(AMPS))
        choice("compile", compile, COMPILE_MODES)
        self.compile = compile
        self._compiled: dict[torch.device, object] = {}  # one compiled forward per device
        if pack_weights:
            check_packable(model_device(model), amp, compile)
        self.pack_weights = pack_weights
        if compact_every is None:
            compact_every = default_compact_every(model_device(model))
        if not (isinstance(compact_every, int) and compact_every >= 1):
            raise InvalidValue(f"compact_every must be a positive integer, got {compact_every!r}")
        self.model, self.record, self.amp = model, record, amp
        self.channels_last, self.compact_every = channels_last, compact_every
        self.time_phases = time_phases
        self.progress: Progress | None = None

    def parts(self, deferred: bool) -> tuple[Head, Optimizer, Control]:
        raise NotImplementedError

    def _engine(self, device: torch.device, parts: tuple[Head, Optimizer, Control],
                batch: int | None = None) -> Engine:
        """The engine with ``parts`` for a call on ``batch`` samples, or for a stream (batch
        None).  A trajectory has one more column than samples: where ghost rows write
        (compiled streams)."""
        head, optimizer, control = parts
        trajectory = (trajectory_buffer(self.horizon, batch + 1, device)
                      if self.record and batch is not None else None)
        if self.compile is not None and device not in self._compiled:
            self._compiled[device] = compiled_forward_head(self.model, head, device, self.amp,
                                                           self.compile)
        return Engine(self.model, head, optimizer, control,
                      PhaseTimer(device, per_phase=self.time_phases), self.amp, trajectory,
                      self._compiled.get(device))

    def _pad_to(self, capacity: int) -> list[int] | None:
        return buckets(capacity) if self.compile else None

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, images: torch.Tensor, target: torch.Tensor,
                 source: torch.Tensor | None = None) -> AttackResult:
        """Attacks a batch: images [B, C, H, W] in [0, 1], target [B] int64, source [B] int64
        (default: the model's prediction on the clean images)."""
        return self._run(images, target, source, self.parts(deferred=False))

    def _run(self, images: torch.Tensor, target: torch.Tensor, source: torch.Tensor | None,
             parts: tuple[Head, Optimizer, Control]) -> AttackResult:
        """One call with the given head, optimiser and control (new for every call, so an
        attack object keeps no state between calls)."""
        device = model_device(self.model)
        x0 = check_images(images).to(device, torch.float32)
        target = check_labels(target, "target", len(x0)).to(device)
        if source is not None:
            source = check_labels(source, "source", len(x0)).to(device)
        # weights cast once (not under torch.compile, whose graphs guard on the dtypes; not in
        # streams, which hand control back to the caller while the model is frozen)
        cast_once = self.amp if self.compile is None else None
        # rows that start at x0 take the source from their first forward, eager only (a
        # compiled graph has the head inside); else the source costs a forward of its own
        _, optimizer, _ = parts
        derive = source is None and self.compile is None and optimizer.starts_at_x0
        with frozen(self.model, self.channels_last), weights_cast_once(self.model, cast_once), \
                weights_packed(self.model, self.pack_weights):
            x0 = self._layout(x0)
            with torch.no_grad(), self._autocast(device):  # one probe row: the class count
                logits = self.model(x0 if source is None and not derive else x0[:1])
            ops._check_indices(target, logits.shape[1], "target")
            if derive:
                source = torch.zeros_like(target)  # written by the first forward
            elif source is None:
                source = logits.argmax(dim=1)
            else:
                ops._check_indices(source, logits.shape[1], "source")
            engine = self._engine(device, parts, batch=len(x0))
            engine.source_pending = derive
            rows = start_rows(torch.arange(len(x0), device=device), x0, target, source)
            engine.timer.start()
            if len(rows) == 0:
                groups, iterations = [engine.begin(rows)], 0
            elif self.fixed:
                groups = [engine.begin(rows)]
                iterations = run_fixed(engine, rows, self.horizon)
            else:
                stream = Stream(engine, _once(rows), len(x0), self.compact_every, self.horizon,
                                pad_to=self._pad_to(len(x0)), ghost_key=len(x0),
                                progress=self.progress)
                groups, iterations = list(stream), stream.iterations
            timing = engine.timer.finish(iterations, len(x0))
            finished = [self._finished(engine, g) for g in groups]
        return self._result(finished, source, target, engine.trajectory, timing)

    def stream(self, feed: Feed, capacity: int, accept: Accept | None = None) -> AttackStream:
        """Continuous batching: keeps up to ``capacity`` samples on the device, and every
        ``compact_every`` iterations hands back the finished ones and refills their slots.

        Args:
            feed: ``feed(k)`` returns up to k new samples as (images [k, C, H, W] in [0, 1],
                target [k], source [k], key [k] int64: the caller's id), or None when there
                are no more.
            capacity: the device batch size.
            accept: optional ``accept(images, target) -> bool [k]`` applied, at each
                compaction, to samples that meet the stop rule; a sample it rejects keeps
                going.  Used to demand that the 8-bit image holds.

        Returns an iterable of :class:`Finished` groups in completion order; its ``timing``
        is set once it is exhausted.  A stream keeps no trajectory (``record`` applies to
        calls).  The same per-sample results as calling the attack on
        each sample alone (eval mode: samples do not interact).
        """
        if not (isinstance(capacity, int) and capacity >= 1):
            raise InvalidValue(f"capacity must be a positive integer, got {capacity!r}")
        return AttackStream(self, feed, capacity, accept)

    def _autocast(self, device: torch.device):
        return autocast(device, self.amp)

    def _finished(self, engine: Engine, rows: Rows, measure: bool = False) -> Finished:
        """The finished rows' results; ``measure`` (or a search) measures the returned images
        afresh (a deferred stop may have stepped past the image it last observed)."""
        images = engine.control.report(rows)
        norms, target_prob = rows.norms, rows.target_prob
        if self.searches or measure:
            norms, target_prob = engine.measure(images, rows)
        return Finished(adversarial=images, first_flip=rows.first_flip,
                        at_flip=dict(zip(NORMS, rows.flip_norms.unbind(1))),
                        final={**dict(zip(NORMS, norms.unbind(1))), "target_prob": target_prob},
                        steps=rows.age, failure=rows.failure,
                        constant=engine.control.constant(rows) if self.searches else None,
                        key=rows.key)

    def _result(self, groups: list[Finished], source: torch.Tensor, target: torch.Tensor,
                trajectory: torch.Tensor | None, timing: Timing) -> AttackResult:
        """Scatters the finished groups (at least one, maybe empty) back into batch order."""
        order = torch.argsort(torch.cat([g.key for g in groups]))

        def gather(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(values).index_select(0, order)

        return AttackResult(
            adversarial=gather([g.adversarial for g in groups]).contiguous(),
            first_flip=gather([g.first_flip for g in groups]),
            at_flip={k: gather([g.at_flip[k] for g in groups]) for k in NORMS},
            final={k: gather([g.final[k] for g in groups]) for k in (*NORMS, "target_prob")},
            steps=gather([g.steps for g in groups]),
            failure=gather([g.failure for g in groups]),
            constant=gather([g.constant for g in groups]) if self.searches else None,
            source=source, target=target, timing=timing,
            trajectory=(None if trajectory is None
                        else dict(zip(TRAJECTORY, trajectory[:, :-1].unbind(2)))))


class AttackStream:
    """The finished groups of :meth:`BaseAttack.stream`, in completion order; ``timing``
    once exhausted."""

    def __init__(self, attack: BaseAttack, feed: Feed, capacity: int,
                 accept: Accept | None) -> None:
        self.attack, self.feed, self.capacity, self.accept = attack, feed, capacity, accept
        self.timing: Timing | None = None

    def __iter__(self) -> Iterator[Finished]:
        attack = self.attack
        device = model_device(attack.model)
        engine = attack._engine(device, attack.parts(deferred=self.accept is not None))
        classes: list[int] = []

        def rows_from_feed(k: int) -> Rows | None:
            fed = self.feed(k)
            if fed is None or len(fed[0]) == 0:
                return None
            images, target, source, key = fed
            x0 = attack._layout(check_images(images).to(device, torch.float32, non_blocking=True))
            target, source, key = (t.to(device, non_blocking=True) for t in (target, source, key))
            if not classes:
                with torch.no_grad(), attack._autocast(device):
                    classes.append(attack.model(x0[:1]).shape[1])
            ops._check_indices(target, classes[0], "target")
            ops._check_indices(source, classes[0], "source")
            return start_rows(key, x0, target, source)

        accept = None
        if self.accept is not None:
            accept = (self.accept, engine.control.waiting)
        with frozen(attack.model, attack.channels_last), \
                weights_packed(attack.model, attack.pack_weights):
            stream = Stream(engine, rows_from_feed, self.capacity, attack.compact_every,
                            attack.horizon, accept, pad_to=attack._pad_to(self.capacity),
                            progress=attack.progress)
            engine.timer.start()
            for rows in stream:
                yield attack._finished(engine, rows, measure=self.accept is not None)
            self.timing = engine.timer.finish(stream.iterations, stream.samples)


def _once(rows: Rows) -> Callable[[int], Rows | None]:
    given = [rows]
    return lambda k: given.pop() if given else None


def choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise InvalidValue(f"unknown {name} {value!r}; choose one of {shown}")


def positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and value > 0):
        raise InvalidValue(f"{name} must be a positive number, got {value!r}")
    if value > FLOAT32_MAX:  # the engine keeps its constants in float32
        raise InvalidValue(f"{name} must be at most {FLOAT32_MAX:.3g} (float32), got {value!r}")
    return float(value)


def count(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidValue(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise InvalidType(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise InvalidType(f"images must be floating point in [0, 1], got {images.dtype}")
    if images.dim() != 4:
        raise InvalidValue(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise InvalidValue(f"images must lie in [0, 1], got values in [{lo.item():.4g}, "
                               f"{hi.item():.4g}]; attacks work on unnormalised images (the "
                               "models from advfast.models.load normalise internally)")
    return images.detach()


def check_labels(labels: object, name: str, batch: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise InvalidType(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (batch,):
        raise InvalidValue(f"{name} must be int64 of shape [{batch}], got {labels.dtype} "
                           f"{tuple(labels.shape)}")
    return labels
