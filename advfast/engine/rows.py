"""The engine's per-sample state: one row per sample on the device, every field typed.

:class:`Rows` declares the engine's own fields in one place.  An optimiser and a control each
keep their per-sample state in their own :class:`State` record (``rows.optim``,
``rows.control``).  Every record is a slotted dataclass, so assigning a field it does not
declare raises AttributeError instead of silently creating one; and every field, nested
records included, is gathered with the same single index when samples leave or join the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from advfast.ops import HEAD_STATS


class State:
    """Base of a typed per-sample record: a slotted dataclass whose fields are tensors with the
    row as their first dimension (or nested records, or None)."""

    __slots__ = ()

    def take(self, index: torch.Tensor, like: torch.Tensor):
        """The record of the rows at ``index`` [K] int64; image-shaped fields (the shape of
        ``like`` past the batch) in ``like``'s memory format."""
        layout = memory_format_of(like)
        return type(self)(**{f.name: _take(getattr(self, f.name), index, like, layout)
                             for f in dataclasses.fields(self)})

    def cat(self, other, like: torch.Tensor):
        """This record's rows followed by ``other``'s (the same type)."""
        layout = memory_format_of(like)
        return type(self)(**{f.name: _cat(getattr(self, f.name), getattr(other, f.name), like,
                                          layout) for f in dataclasses.fields(self)})


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so (and not also contiguous), else contiguous."""
    channels_last = t.dim() == 4 and not t.is_contiguous() \
        and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _shaped(value: torch.Tensor, like: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    # image-shaped fields keep the images' memory format, so the fused ops need no copies
    if value.dim() == like.dim() and value.shape[1:] == like.shape[1:]:
        return value.detach().contiguous(memory_format=layout)
    return value


def _take(value, index: torch.Tensor, like: torch.Tensor, layout: torch.memory_format):
    if value is None:
        return None
    if isinstance(value, State):
        return value.take(index, like)
    return _shaped(value.index_select(0, index), like, layout)


def _cat(a, b, like: torch.Tensor, layout: torch.memory_format):
    if a is None:
        return None
    if isinstance(a, State):
        return a.cat(b, like)
    return _shaped(torch.cat([a, b]), like, layout)


@dataclass(slots=True, eq=False)
class Rows(State):
    """The samples on the device, one row each (B rows).

    key: [B] int64, the caller's id of each sample.
    x: [B, C, H, W] float32, the image the model sees: a leaf that requires grad.
    x0: [B, C, H, W] float32, the clean image.
    target, source: [B] int64, the class the attack drives towards and the initial one.
    constant: [B] float32, the objective's constant (CW's c, L-BFGS's b), set by the control and
        read by the optimiser; NaN for attacks without one.
    age: [B] int64, steps applied.
    first_flip: [B] int64, ``age`` when the prediction first equalled the target (-1: never).
    flip_norms: [B, 3] float32, L1/L2/Linf of x - x0 at the first flip (NaN: no flip).
    norms: [B, 3] float32, L1/L2/Linf of x - x0 now.
    head: [B, 12] float32, ``ops.loss_head``'s stats of the last observed image (NaN: none
        yet); ``hit``, ``target_prob`` and ``subspace`` read it.
    failure: [B] int64, why a sample stopped early (0: it did not; see ``engine.FAILURES``).
    done: [B] bool, finished: the sample leaves the batch at the next compaction.
    paused: [B] bool, its inner run is over (decided by the control): it takes no step and
        waits for the next boundary.
    ghost: [B] bool, padding of a compiled stream (never reported).
    optim, control: the optimiser's and the control's own records (None: they keep none).
    """

    key: torch.Tensor
    x: torch.Tensor
    x0: torch.Tensor
    target: torch.Tensor
    source: torch.Tensor
    constant: torch.Tensor
    age: torch.Tensor
    first_flip: torch.Tensor
    flip_norms: torch.Tensor
    norms: torch.Tensor
    head: torch.Tensor
    failure: torch.Tensor
    done: torch.Tensor
    paused: torch.Tensor
    ghost: torch.Tensor
    optim: State | None = None
    control: State | None = None

    def __len__(self) -> int:
        return len(self.key)

    @property
    def hit(self) -> torch.Tensor:
        """[B] bool: the last observed image is predicted as the target."""
        return self.head[:, HEAD_STATS.index("hit")] > 0.5

    @property
    def target_prob(self) -> torch.Tensor:
        """[B] float32: the target's probability at the last observed image."""
        return self.head[:, HEAD_STATS.index("target_prob")]

    @property
    def subspace(self) -> torch.Tensor:
        """[B] float32: the last observed image's subspace 1/2/3 (Definition IV.1)."""
        return self.head[:, HEAD_STATS.index("subspace")]

    def take(self, index: torch.Tensor, like: torch.Tensor | None = None) -> Rows:
        """The rows at ``index``, every field (nested records too) gathered with that one
        index; x a fresh leaf that requires grad."""
        rows = State.take(self, index, self.x if like is None else like)
        rows.x.requires_grad_(True)
        return rows

    def cat(self, other: Rows, like: torch.Tensor | None = None) -> Rows:
        rows = State.cat(self, other, self.x if like is None else like)
        rows.x.requires_grad_(True)
        return rows


def start_rows(key: torch.Tensor, x0: torch.Tensor, target: torch.Tensor,
               source: torch.Tensor) -> Rows:
    """New rows at their clean images, no optimiser or control record yet."""
    b, device = len(key), x0.device
    nan = torch.full((b,), float("nan"), device=device)
    zeros = torch.zeros(b, dtype=torch.int64, device=device)
    false = torch.zeros(b, dtype=torch.bool, device=device)
    return Rows(
        key=key, x=x0.clone().requires_grad_(True), x0=x0, target=target, source=source,
        constant=nan, age=zeros, first_flip=torch.full((b,), -1, dtype=torch.int64,
                                                        device=device),
        flip_norms=torch.full((b, 3), float("nan"), device=device),
        norms=torch.zeros((b, 3), device=device),
        head=torch.full((b, len(HEAD_STATS)), float("nan"), device=device),
        failure=zeros.clone(), done=false.clone(),
        paused=false.clone(), ghost=false.clone())


def per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] mask shaped to broadcast over ``like`` [B, ...]."""
    return mask.view(-1, *[1] * (like.dim() - 1))
