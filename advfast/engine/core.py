"""The attack engine: one iteration, written once (:class:`Engine`).

An iteration (:meth:`Engine.iterate`) is

    forward -> ops.loss_head -> gradient w.r.t. the input only -> optimiser update (-> record)

over :class:`advfast.engine.rows.Rows`, the samples on the device.  Three pluggable parts
decide the rest:

* the **optimiser** (:mod:`advfast.engine.optim`) owns the iterate ``x`` and its own typed
  per-sample record ``rows.optim`` (Adam moments, an L-BFGS history), gathered with every
  other field when samples leave or join the batch; it reports when its run has converged;
* the **control** (:mod:`advfast.engine.control`) alone decides, per sample, when it stops
  (iteration cap, stop rule) or, for attacks with an outer search over a constant (CW's c,
  L-BFGS's b), when its inner run ends and it restarts from its clean image with a new
  constant, keeping its best result;
* the **head** (loss, kappa, kappa_mode, threshold) of :func:`advfast.ops.loss_head`.

The drivers that repeat the iteration are in :mod:`advfast.engine.drivers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from advfast import ops
from advfast.engine.rows import Rows, memory_format_of
from advfast.engine.timing import PhaseTimer
from advfast.errors import InvalidValue

AMPS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Per-iteration records: the first seven come from loss_head's stats, p_l1 and step_l1 (the
# L1 the step added) from the step; ops.observe_ and ops.advance_ write them.
TRAJECTORY = ("source_prob", "target_prob", "source_logit", "target_logit", "max_prob",
              "subspace", "margin", "p_l1", "step_l1")
HEAD_COLUMNS = [ops.HEAD_STATS.index(name) for name in TRAJECTORY[:-2]]
COLUMN = {name: i for i, name in enumerate(ops.HEAD_STATS)}
STEP_STATS = ops.STEP_STATS
STEP_COLUMNS = [STEP_STATS.index(name) for name in TRAJECTORY[-2:]]
# Why a sample stopped early, as a code per row (0: it did not; ops.observe_ sets code
# ops.NONFINITE_LOGITS = 1).
FAILURES = ("", "non-finite logits")
# The iteration cap of a control that has none of its own (ops.observe_ compares age with it).
NO_CAP = 2**62
# A trajectory buffer larger than this is refused (it is preallocated on the device).
MAX_TRAJECTORY_BYTES = 2 << 30


@dataclass(frozen=True)
class Head:
    """What ``ops.loss_head`` computes on the logits (see it for the meanings)."""

    loss: str
    kappa: float = 20.0
    kappa_mode: str = "clamp"
    threshold: float = 0.9
    ce_seed: str = "exact"


class Optimizer(Protocol):
    """The per-sample update rule (see :mod:`advfast.engine.optim`).  ``starts_at_x0``: its
    ``begin`` puts every row exactly at its clean image, so that the first forward is the
    clean images' own (a call then takes the source class from it)."""

    starts_at_x0: bool

    def begin(self, rows: Rows) -> None:
        """Sets ``rows.x`` to each new row's starting point and ``rows.optim`` to its record."""

    def step(self, rows: Rows, grad: torch.Tensor, head: torch.Tensor,
             active: torch.Tensor | None) -> torch.Tensor:
        """Updates ``rows.x`` in place from grad = dO/dx (O the head's objective, maximised);
        rows where ``active`` is False are left as they are.  Returns [B, 5] float32
        ``ops.STEP_STATS`` of the updated images."""

    def converged(self, rows: Rows) -> torch.Tensor | None:
        """[B] bool: the rows whose run the last step ended by the optimiser's own criteria
        (None: it has none).  The control decides what follows."""

    def restart(self, rows: Rows, mask: torch.Tensor) -> None:
        """Restarts the rows in ``mask`` with a fresh record: back at their starting point (and
        their ``norms`` to those of that point), or, for an optimiser that warm-starts, where
        they are."""


class Control(Protocol):
    """When each sample stops or restarts (see :mod:`advfast.engine.control`): the one party
    that sets ``rows.done`` and ``rows.paused``.  A paused row takes no step and waits for the
    next ``boundary``."""

    def begin(self, rows: Rows) -> None:
        """Sets ``rows.control`` (and ``rows.constant``) of new rows."""

    def stopping(self) -> tuple[int, str]:
        """(iteration cap, stop rule of ``ops.STOP_RULES``) that the engine's fused observation
        (``ops.observe_``) applies to every row after the head, marking ``rows.done``."""

    def after_head(self, rows: Rows, head: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Given the rows that would step from the images just observed (``active``: not done,
        not paused), marks in ``rows.done`` or ``rows.paused`` those that take no step and
        returns the rows that do."""

    def after_step(self, rows: Rows, optimizer: Optimizer) -> None:
        """Takes in what the optimiser reports after its step (its converged rows)."""

    def boundary(self, rows: Rows, optimizer: Optimizer) -> None:
        """Every ``compact_every`` iterations, before finished rows leave: restarts paused
        rows with a new constant, or marks them done."""

    def report(self, rows: Rows) -> torch.Tensor:
        """The images the finished ``rows`` return."""

    def constant(self, rows: Rows) -> torch.Tensor:
        """For a search: the constant of each returned image [B] float32."""


COMPILE_MODES = (None, "default", "max-autotune", "reduce-overhead", "aot_eager")
# torch.compile keeps this many graphs per function (one per batch size and attack setting).
RECOMPILE_LIMIT = 64

ForwardHead = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                       "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


def compiled_forward_head(model: nn.Module, head: Head, device: torch.device, amp: str | None,
                          mode: str) -> ForwardHead:
    """The model's forward and the loss head as one torch.compile'd function (x, target,
    source) -> (logits, seed, head stats); autograd then runs its compiled backward.  Shapes
    are static (``dynamic=False``): each batch size compiles once.  ``mode`` is a
    torch.compile mode, or "aot_eager" (traced, no code generated: for debugging).  Raises
    torch._dynamo's limit on graphs per function to RECOMPILE_LIMIT."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    if device.type == "cpu":  # inductor's CPU code needs no CUDA: its "no CUDA runtime" warning
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # misleads
    cast = autocast(device, amp)

    def forward_head(x: torch.Tensor, target: torch.Tensor, source: torch.Tensor):
        with cast:
            logits = model(x)
        seed, stats = ops.loss_head_unchecked(logits.detach(), target, source, head.loss,
                                              head.kappa, head.kappa_mode, head.threshold,
                                              head.ce_seed)
        return logits, seed, stats

    options = {"backend": "aot_eager"} if mode == "aot_eager" else {"mode": mode}
    return torch.compile(forward_head, dynamic=False, **options)


class Engine:
    """One attack iteration on a frozen model, with its optimiser, control and head; with
    ``compiled`` (see :func:`compiled_forward_head`), the forward and head run compiled."""

    def __init__(self, model: nn.Module, head: Head, optimizer: Optimizer, control: Control,
                 timer: PhaseTimer, amp: str | None = None,
                 trajectory: torch.Tensor | None = None,
                 compiled: ForwardHead | None = None) -> None:
        self.model, self.head, self.optimizer, self.control = model, head, optimizer, control
        self.timer, self.trajectory, self.compiled = timer, trajectory, compiled
        self.autocast = autocast(timer.device, amp)
        # set by a call whose rows start at x0 with no source given: the first forward's
        # argmax is the clean images' prediction, written into rows.source before the head
        self.source_pending = False

    def begin(self, rows: Rows) -> Rows:
        self.optimizer.begin(rows)
        self.control.begin(rows)
        return rows

    def forward_head(self, rows: Rows, n: int, phase: str,
                     controlled: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward, loss head and the fused observation (:meth:`observe`) of the current
        images; returns (logits, seed, active).  (Compiled, the forward and the head are one
        graph and their time counts as the forward's.)"""
        if self.compiled is not None:
            with self.timer.phase(n, phase):
                logits, seed, head = self.compiled(rows.x, rows.target, rows.source)
        else:
            with self.timer.phase(n, phase), self.autocast:
                logits = self.model(rows.x)
            if self.source_pending:
                rows.source.copy_(logits.detach().argmax(dim=1))
                self.source_pending = False
        with self.timer.phase(n, "head" if phase == "forward" else phase):
            if self.compiled is None:
                h = self.head
                seed, head = ops.loss_head_unchecked(logits.detach(), rows.target, rows.source,
                                                     h.loss, h.kappa, h.kappa_mode, h.threshold,
                                                     h.ce_seed)
            active = self.observe(rows, head, controlled)
        return logits, seed, active

    def observe(self, rows: Rows, head: torch.Tensor, controlled: bool) -> torch.Tensor:
        """Takes in loss_head's stats of the images X_age, in one op (``ops.observe_``): the
        first flip and the norms there, a failure code for non-finite logits, the control's
        iteration cap and stop rule (``controlled``), the trajectory row.  Returns the rows
        that step: not done and not paused (controlled), else not failed."""
        rows.head = head
        cap, stop = self.control.stopping() if controlled else (NO_CAP, "never")
        return ops.observe_unchecked(head, rows.norms, rows.age, rows.paused, rows.first_flip,
                                     rows.flip_norms, rows.failure, rows.done, self.trajectory,
                                     rows.key if self.trajectory is not None else None,
                                     HEAD_COLUMNS, cap, stop, controlled)

    def measure(self, images: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The L1/L2/Linf of images - x0 [B, 3] and the target probability [B] of ``images``
        (one forward, no gradient): for controls that return other images than the last
        observed ones."""
        with torch.no_grad(), self.autocast:
            logits = self.model(images)
        h = self.head
        _, head = ops.loss_head(logits, rows.target, rows.source, h.loss, h.kappa,
                                h.kappa_mode, h.threshold, validate_indices=False,
                                ce_seed=h.ce_seed)
        return norms_of(images - rows.x0), head[:, COLUMN["target_prob"]]

    def iterate(self, rows: Rows, n: int, controlled: bool = True) -> None:
        """Iteration n over ``rows``.  With ``controlled`` the control stops and restarts
        rows (and stopped rows take no step); without it every row steps (run_fixed).  Beside
        the model, its ops are loss_head, observe_, the optimiser's step and advance_ (with a
        control of its own in after_head, that control's)."""
        logits, seed, active = self.forward_head(rows, n, "forward", controlled)
        if controlled:
            with self.timer.phase(n, "head"):
                active = self.control.after_head(rows, rows.head, active)
        with self.timer.phase(n, "backward"):
            if seed.dtype != logits.dtype:  # autocast's logits take the seed in their own dtype
                seed = seed.to(logits.dtype)
            (grad,) = torch.autograd.grad(logits, rows.x, seed)
        with self.timer.phase(n, "update"), torch.no_grad():
            stats = self.optimizer.step(rows, grad, rows.head, active)
            if controlled:
                self.control.after_step(rows, self.optimizer)
            ops.advance_unchecked(stats, active, rows.age, rows.norms, self.trajectory,
                                  rows.key if self.trajectory is not None else None,
                                  STEP_COLUMNS)


@contextmanager
def frozen(model: nn.Module, channels_last: bool = False) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the attack; the model's mode, requires_grad
    flags and the memory format of its parameters are restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    layouts = [(t, memory_format_of(t)) for t in (*model.parameters(), *model.buffers())]
    model.eval()
    model.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if channels_last:
            for t, layout in layouts:
                if t.dim() == 4 and not t.is_contiguous(memory_format=layout):
                    t.data = t.data.contiguous(memory_format=layout)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


# Modules whose floating parameters autocast casts to its lower precision on every call (they
# reach only conv and linear ops): exactly these types, not subclasses, whose forward may differ.
CAST_ONCE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@contextmanager
def weights_cast_once(model: nn.Module, amp: str | None) -> Iterator[nn.Module]:
    """Under amp, the float32 weights and biases of the model's conv and linear modules
    (:data:`CAST_ONCE_MODULES`, and only parameters no other module holds) hold amp's dtype
    for the attack and their own data again afterwards.  Autocast would cast each of them on
    every call to the same bits (a conv or linear op casts all its inputs; one already in the
    dtype passes as is), so the attack's results do not change; it saves the casts: a bf16
    call of ResNet-18 at 3x32x32 on one CPU thread is 1.28-1.88x faster, 1.01-1.23x with
    channels_last (bench/batch_cost.py --amp bf16).  Every model call inside must run under
    autocast."""
    dtype = AMPS[amp]
    kept: list[tuple[nn.Parameter, torch.Tensor]] = []
    if dtype is not None:
        owners: dict[int, list[nn.Module]] = {}
        params: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(module)
                params[id(p)] = p
        for key, p in params.items():
            if p.dtype == torch.float32 and all(type(m) in CAST_ONCE_MODULES
                                                for m in owners[key]):
                kept.append((p, p.data))
                p.data = p.data.to(dtype)
    try:
        yield model
    finally:
        for p, data in kept:
            p.data = data


def norms_of(delta: torch.Tensor) -> torch.Tensor:
    """[B, 3] L1, L2 and Linf of delta [B, ...]."""
    flat = delta.flatten(1)
    return torch.stack([flat.abs().sum(1), flat.norm(dim=1), flat.abs().amax(1)], dim=1)


def autocast(device: torch.device, amp: str | None):
    """Autocast to amp's precision on device, or nothing."""
    return torch.autocast(device.type, dtype=AMPS[amp]) if amp else nullcontext()


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def trajectory_buffer(iterations: int, batch: int, device: torch.device) -> torch.Tensor:
    """[iterations + 1, batch, len(TRAJECTORY)] of NaN on the device, refused (ValueError) when
    larger than MAX_TRAJECTORY_BYTES."""
    shape = (iterations + 1, batch, len(TRAJECTORY))
    size = 4 * shape[0] * shape[1] * shape[2]
    if size > MAX_TRAJECTORY_BYTES:
        raise InvalidValue(f"recording the trajectory of {batch} samples over {iterations} "
                         f"iterations needs {size / 2**30:.1f} GiB on {device}; record=False, "
                         "fewer iterations or smaller batches")
    return torch.full(shape, float("nan"), device=device)
