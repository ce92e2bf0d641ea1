"""advfast's fused operators: the loss head on the logits and the perturbation step.

Both run as registered PyTorch operators (``torch.ops.advfast.*``, C++ on CPU and CUDA on GPU)
when the compiled library ``advfast._C`` is present, and fall back to the pure-PyTorch
reference in :mod:`advfast.ops.reference` (with one warning) when it is not.

The compiled ops check their arguments themselves, once (``csrc/checks.h``): a wrong dtype
raises TypeError, a wrong shape, device, range or aliasing ValueError, a class out of range
IndexError; the wrappers here only add what C++ cannot say.  Without the compiled library the
same contract is checked here, on the fallback path only.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Literal

import torch

from advfast.errors import ClassOutOfRange, InvalidType, InvalidValue, UserError
from advfast.ops import reference
from advfast.ops.reference import (CE_SEEDS, HEAD_STATS, NONFINITE_LOGITS, STEP_STATS,
                                   STOP_RULES, tanh_image)

__all__ = ["LOSSES", "KAPPA_MODES", "CE_SEEDS", "HEAD_STATS", "STEP_STATS", "STOP_RULES",
           "NONFINITE_LOGITS", "backend", "loss_head", "perturb_step_", "adam_tanh_step_",
           "observe_", "advance_", "cw_observe_", "tanh_image"]

LOSSES: tuple[str, ...] = ("ce", "ce-sign", "logit", "m-logit")
KAPPA_MODES: tuple[str, ...] = ("clamp", "balance")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# The hot loop's wrappers (*_unchecked) call advfast._C's direct bindings, which enter the
# dispatcher through each op's typed handle (csrc/python_calls.cpp): in the loop they cost
# 10-20 us a call less than torch.ops' boxed path.  While torch.compile traces they call the
# op's overload (torch.ops.advfast.NAME.default; its packet's overload resolution costs more).
try:
    from advfast import _C  # loading it registers torch.ops.advfast.*

    _COMPILED = True
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    _COMPILED = False
    warnings.warn(f"advfast: compiled kernels unavailable ({err}); using the pure-PyTorch "
                  "reference, which is correct but slower. Reinstall with "
                  "`pip install --no-build-isolation -e .` to build them.", RuntimeWarning,
                  stacklevel=2)


# True while dynamo traces (it folds the call to a constant there): then the wrappers keep the
# schema path, which dynamo can put in a graph; a direct binding would break it.
_tracing = torch.compiler.is_compiling


def backend() -> Literal["cpu+cuda", "cpu", "reference"]:
    """Which implementation the ops use: compiled with CUDA kernels, compiled CPU only, or the
    pure-PyTorch reference."""
    if not _COMPILED:
        return "reference"
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("advfast::loss_head", "CUDA")
    return "cpu+cuda" if has_cuda else "cpu"


# ---- Tensor metadata (dtype, shape, device): the fake kernels' half of the contract ---------
# csrc/checks.h checks every argument of the compiled ops.  These checks are what a fake kernel
# must say itself: torch.compile traces and meta or mixed-device calls reach the fake kernel,
# never C++.  The reference fallback runs them too (with _check_scalars and _check_written).


def _check_head_meta(logits, target, source) -> None:
    torch._check_type(logits.dtype in _FLOATS,
                      lambda: f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    torch._check_value(logits.dim() == 2, lambda: f"logits must be [B, M], got {logits.shape}")
    torch._check_value(logits.shape[1] >= 2, lambda: "need at least 2 classes")
    for t in (target, source):
        torch._check_type(t.dtype == torch.int64, lambda: "target and source must be int64")
        _check_per_sample(t, logits, "target and source")


def _check_per_sample(t, like, name: str) -> None:
    torch._check_value(t.dim() == 1 and t.shape[0] == like.shape[0] and t.device == like.device,
                       lambda: f"{name} must be [B] with B = {like.shape[0]} on {like.device}")


def _check_images_meta(images, grad, per_sample, active, owner: str) -> None:
    """images: the float32 [B, ...] tensors of one shape and device; per_sample: ([B] tensor,
    dtype, name) pairs."""
    for name, t in images:
        torch._check_type(t.dtype == torch.float32, lambda: f"{name} must be float32")
        torch._check_value(t.shape == images[0][1].shape and t.device == images[0][1].device,
                           lambda: f"{name} must have the shape and device of {owner}")
    like = images[0][1]
    torch._check_value(like.dim() >= 1, lambda: f"{owner} must be [B, ...]")
    torch._check_type(grad.dtype in _FLOATS,
                      lambda: f"grad must be float32, float16 or bfloat16, got {grad.dtype}")
    torch._check_value(grad.shape == like.shape and grad.device == like.device,
                       lambda: f"grad must have the shape and device of {owner}")
    for t, dtype, name in (*per_sample, (active, torch.bool, "active")):
        if t is not None:
            torch._check_value(t.dtype == dtype, lambda: f"{name} must be {dtype}")
            _check_per_sample(t, like, name)


if _COMPILED:

    @torch.library.register_fake("advfast::loss_head")
    def _loss_head_fake(logits, target, source, loss, kappa, kappa_mode, threshold,
                        ce_seed="exact"):
        _check_head_meta(logits, target, source)
        batch, classes = logits.shape
        return (logits.new_empty((batch, classes), dtype=torch.float32),
                logits.new_empty((batch, len(HEAD_STATS)), dtype=torch.float32))

    @torch.library.register_fake("advfast::perturb_step_")
    def _perturb_step_fake(x, grad, x0, active, sign, alpha, beta, lo, hi, eps,
                           exact_l1=False):
        _check_images_meta((("x", x), ("x0", x0)), grad, (), active, "x")
        return x.new_empty((x.shape[0], len(STEP_STATS)))

    @torch.library.register_fake("advfast::adam_tanh_step_")
    def _adam_tanh_step_fake(w, m, v, x, grad, x0, c, step, active, lr, beta1, beta2, eps):
        _check_images_meta(tuple(zip("w m v x x0".split(), (w, m, v, x, x0))), grad,
                           ((c, torch.float32, "c"), (step, torch.int64, "step")), active, "w")
        return w.new_empty((w.shape[0], len(STEP_STATS)))

    @torch.library.register_fake("advfast::observe_")
    def _observe_fake(head, norms, age, paused, first_flip, flip_norms, failure, done,
                      trajectory, key, columns, iterations, stop, controlled):
        _check_bookkeeping_meta(head, len(HEAD_STATS), "head",
                                (norms, torch.float32, 3, "norms"), (age, torch.int64, 0, "age"),
                                (paused, torch.bool, 0, "paused"),
                                (first_flip, torch.int64, 0, "first_flip"),
                                (flip_norms, torch.float32, 3, "flip_norms"),
                                (failure, torch.int64, 0, "failure"),
                                (done, torch.bool, 0, "done"))
        return paused.new_empty(paused.shape)

    @torch.library.register_fake("advfast::advance_")
    def _advance_fake(stats, active, age, norms, trajectory, key, columns):
        _check_bookkeeping_meta(stats, len(STEP_STATS), "stats",
                                (active, torch.bool, 0, "active"), (age, torch.int64, 0, "age"),
                                (norms, torch.float32, 3, "norms"))

    @torch.library.register_fake("advfast::cw_observe_")
    def _cw_observe_fake(head, norms, constant, active, inner_age, previous_loss, best_l2,
                         best_constant, succeeded, paused, kappa, steps, check_every,
                         abort_early):
        _check_cw_meta(head, norms, constant, active, inner_age, previous_loss, best_l2,
                       best_constant, succeeded, paused)
        return active.new_empty(active.shape), active.new_empty(active.shape)


def _check_cw_meta(head, norms, constant, active, inner_age, previous_loss, best_l2,
                   best_constant, succeeded, paused) -> None:
    floats = zip(("constant", "previous_loss", "best_l2", "best_constant"),
                 (constant, previous_loss, best_l2, best_constant))
    flags = zip(("active", "succeeded", "paused"), (active, succeeded, paused))
    _check_bookkeeping_meta(head, len(HEAD_STATS), "head", (norms, torch.float32, 3, "norms"),
                            (inner_age, torch.int64, 0, "inner_age"),
                            *((t, torch.float32, 0, n) for n, t in floats),
                            *((t, torch.bool, 0, n) for n, t in flags))


def _check_bookkeeping_meta(stats, width: int, name: str, *rows) -> None:
    """stats: [B, width] float32; rows: (tensor, dtype, width (0: [B]), name)."""
    torch._check_type(stats.dtype == torch.float32, lambda: f"{name} must be float32")
    torch._check_value(stats.dim() == 2 and stats.shape[1] == width,
                       lambda: f"{name} must be [B, {width}], got {tuple(stats.shape)}")
    for t, dtype, k, what in rows:
        shape = (stats.shape[0], k) if k else (stats.shape[0],)
        torch._check_value(t.dtype == dtype and tuple(t.shape) == shape
                           and t.device == stats.device,
                           lambda: f"{what} must be {dtype} {list(shape)} on {stats.device}")


# ---- The reference fallback's checks (without the compiled library only) -------------------
# What csrc/checks.h checks beyond metadata, so the fallback refuses what the ops refuse.
# Smallest Adam eps (csrc/checks.h kMinAdamEps): the smallest normal float32.
MIN_ADAM_EPS = torch.finfo(torch.float32).tiny


FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_scalars(finite: dict, *rules: tuple[bool, str]) -> None:
    # the kernels take every scalar as float32 (1e39 is a finite double but +inf there)
    for name, value in finite.items():
        if value is not None and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise InvalidValue(f"{name} must be a finite float32 number, got {value!r}")
    for ok, message in rules:
        if not ok:
            raise InvalidValue(message)


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi + t.element_size()


def _check_written(written: dict, read: dict) -> None:
    """Each written tensor must not share memory with another written one or an input: the
    reference would read what it just wrote (and the kernels read through restrict pointers)."""
    names = list(written)
    for i, name in enumerate(names):
        for other_name, other in (*((n, written[n]) for n in names[i + 1:]), *read.items()):
            x = written[name]
            if x.numel() and other.numel() and (x.untyped_storage().data_ptr()
                                                == other.untyped_storage().data_ptr()):
                (a0, a1), (b0, b1) = _byte_span(x), _byte_span(other)
                if a0 < b1 and b0 < a1:
                    raise InvalidValue(f"{name} is updated in place and must not share memory "
                                       f"with {other_name}")


def _user_errors(op: Callable) -> Callable:
    """The checked wrapper ``op`` raising advfast's user-error types: csrc/checks.h raises
    torch's ValueError, TypeError and IndexError, which say nothing of who is to blame."""

    @functools.wraps(op)
    def checked(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except UserError:
            raise
        except (ValueError, TypeError, IndexError) as err:
            kind = {ValueError: InvalidValue, TypeError: InvalidType}.get(type(err),
                                                                           ClassOutOfRange)
            raise kind(str(err).splitlines()[0] if str(err) else type(err).__name__) from err

    return checked


def _require_tensors(**values: object) -> None:
    # What C++ cannot say: torch.ops raises RuntimeError for a non-tensor argument.
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidType(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_indices(index: torch.Tensor, classes: int, name: str) -> None:
    # A data-dependent check: it synchronises on a GPU, so the attack engine validates once
    # and then passes validate_indices=False inside its loop.
    if index.numel() and bool(((index < 0) | (index >= classes)).any()):
        bad = index[(index < 0) | (index >= classes)][0].item()
        raise ClassOutOfRange(f"{name} holds class {bad}, outside [0, {classes})")


@_user_errors
def loss_head(logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor, loss: str,
              kappa: float = 20.0, kappa_mode: str = "clamp", threshold: float = 0.9, *,
              validate_indices: bool = True,
              ce_seed: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Seed and statistics of the objective O an attack maximises, from the logits g.

    Args:
        logits: [B, M] float32/float16/bfloat16, any strides.
        target: [B] int64, the class c the attack drives towards.
        source: [B] int64, the initial class (recorded only).
        loss: ``ce`` / ``ce-sign``: O = log softmax(g)_c, seed = onehot(c) - softmax(g);
            ``logit``: O = g_c, seed = onehot(c) (Eq. 14);
            ``m-logit``: CW's margin m = g_c - g_c*, c* = argmax_{i != c} g_i (Eqs. 4, 15),
            seed = w * (onehot(c) - onehot(c*)).
        kappa: the M-logit margin target (paper: 20).
        kappa_mode: ``clamp``: w = 1 while m < kappa, else 0 (the sample stops moving);
            ``balance``: w = 1 below kappa, 0 at kappa, -1 above (Eq. 16 read literally).
        threshold: the confidence that separates D1/D3 from D2 (Definition IV.1).
        validate_indices: check target/source lie in [0, M) (a host sync on GPUs).
        ce_seed: how CE's target element 1 - p_c is computed: ``exact`` (default) as the sum
            of the other classes' probabilities, so it stays positive where p_c rounds to 1
            in float32; ``eager`` as 1 - p_c in float32 (eager PyTorch's onehot - softmax,
            exactly 0 there).

    Returns:
        seed: [B, M] float32, dO/dlogits.
        stats: [B, 12] float32 with columns :data:`HEAD_STATS`: pred, max_prob, target_prob,
            target_logit, source_prob, source_logit, runner_up (c*), margin (g_c - g_c*),
            subspace (1/2/3), hit (pred == c), target_logprob (log softmax(g)_c) and finite
            (0 for a row with a NaN or +inf logit or only -inf ones; its probabilities and
            target_logprob are NaN).  ``-inf`` logits are masked classes with probability 0.
    """
    _require_tensors(logits=logits, target=target, source=source)
    # The CPU op checks the indices itself; on a GPU that is a device-side assert, so check
    # here first (after the metadata, so that a wrong shape is reported as such).
    if validate_indices and logits.device.type != "cpu" and not torch.compiler.is_compiling():
        _check_head_meta(logits, target, source)
        _check_indices(target, logits.shape[1], "target")
        _check_indices(source, logits.shape[1], "source")
    return loss_head_unchecked(logits, target, source, loss, kappa, kappa_mode, threshold,
                               ce_seed)


def loss_head_unchecked(logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor,
                        loss: str, kappa: float, kappa_mode: str, threshold: float,
                        ce_seed: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`loss_head` without the Python-side checks, for the engine's hot loop, whose
    operands are checked once when an attack starts (the C++ checks still run)."""
    if _COMPILED:
        call = torch.ops.advfast.loss_head.default if _tracing() else _C.loss_head
        return call(logits, target, source, loss, kappa, kappa_mode, threshold, ce_seed)
    _check_head_meta(logits, target, source)
    _check_scalars({"kappa": kappa, "threshold": threshold},
                   (loss in LOSSES, f"unknown loss {loss!r} (expected {', '.join(LOSSES)})"),
                   (kappa_mode in KAPPA_MODES, f"unknown kappa_mode {kappa_mode!r}"),
                   (ce_seed in CE_SEEDS, f"unknown ce_seed {ce_seed!r} (expected exact or "
                                         "eager)"))
    if not torch.compiler.is_compiling():
        _check_indices(target, logits.shape[1], "target")
        _check_indices(source, logits.shape[1], "source")
    return reference.loss_head(logits, target, source, loss, kappa, kappa_mode, threshold,
                               ce_seed)


@_user_errors
def perturb_step_(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, *, sign: bool,
                  alpha: float | None = None, beta: float | None = None, lo: float = 0.0,
                  hi: float = 1.0, eps: float | None = None,
                  active: torch.Tensor | None = None, exact_l1: bool = False) -> torch.Tensor:
    """One fused attack step X <- clip_[lo,hi](X + a * P), in place (paper Eq. 11).

    Args:
        x: [B, ...] float32, the current images; updated in place.
        grad: [B, ...] float32/float16/bfloat16, dO/dx.
        x0: [B, ...] float32, the clean images.
        sign: P = sign(grad) (IFGS, Eq. 13; sign(0) = 0) instead of P = grad.
        alpha: equal multiplier rule, a = alpha.
        beta: equal perturbation rule, a = beta / sum|P| per sample, so each step adds beta in
            L1 before clipping; a sample with sum|P| = 0 takes no step.  Exactly one of alpha
            and beta.
        lo, hi: the box the images live in.
        eps: optional Linf radius around x0 (IFGS's Clip_{X,eps}, Eq. 2).
        active: [B] bool, None = all; inactive samples are neither stepped nor written.
        exact_l1: (beta only) add exactly beta in L1 wherever the box (and the eps ball) leave
            that much room: the per-sample a with sum_i min(a |P_i|, room_i) = beta, room_i
            the distance to the bound in P_i's direction; with less room in all, all of it.
            Found by Newton's method on that concave piecewise-linear sum in read-only passes
            (usually one or two; the last step is checked by the update pass itself, and a
            shortfall beyond 2e-6 of beta starts another round), no sort: about 2-4x the
            paper's rule on a CPU.  The default is the paper's rule, whose clip loses the part
            of the step that points out of the box.

    Returns:
        [B, 5] float32 with columns :data:`STEP_STATS`: sum|P| (0 for inactive samples), the
        L1, L2 and Linf norms of x - x0 after the step, and step_l1, the L1 the step actually
        added, sum |x_new - x_old| (0 for inactive samples).

    A non-finite gradient element (NaN, +-inf) contributes no step and nothing to sum|P|, so a
    finite image never becomes NaN.  x must not share memory with grad or x0 (ValueError).
    Autograd sees the in-place update: x's version counter moves, as with ``x.add_``.
    """
    _require_tensors(x=x, grad=grad, x0=x0, **({} if active is None else {"active": active}))
    return perturb_step_unchecked(x, grad, x0, bool(sign), alpha, beta, lo, hi, eps, active,
                                  bool(exact_l1))


def perturb_step_unchecked(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, sign: bool,
                           alpha: float | None, beta: float | None, lo: float, hi: float,
                           eps: float | None, active: torch.Tensor | None,
                           exact_l1: bool = False) -> torch.Tensor:
    """:func:`perturb_step_` without the Python-side checks (see
    :func:`loss_head_unchecked`)."""
    if _COMPILED:
        call = torch.ops.advfast.perturb_step_.default if _tracing() else _C.perturb_step_
        return call(x, grad, x0, active, sign, alpha, beta, lo, hi, eps, exact_l1)
    _check_images_meta((("x", x), ("x0", x0)), grad, (), active, "x")
    _check_scalars({"alpha": alpha, "beta": beta, "lo": lo, "hi": hi, "eps": eps},
                   ((alpha is None) != (beta is None), "give exactly one of alpha or beta"),
                   (not exact_l1 or beta is not None,
                    "exact_l1 is for the equal perturbation rule (beta), not alpha"),
                   (lo <= hi, "lo must not exceed hi"),
                   (eps is None or eps >= 0, "eps must be non-negative"))
    _check_written({"x": x}, {"grad": grad, "x0": x0})
    return reference.perturb_step_(x, grad, x0, sign=sign, alpha=alpha, beta=beta, lo=lo,
                                   hi=hi, eps=eps, active=active, exact_l1=exact_l1)


@_user_errors
def adam_tanh_step_(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                    grad: torch.Tensor, x0: torch.Tensor, c: torch.Tensor, step: torch.Tensor, *,
                    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                    active: torch.Tensor | None = None) -> torch.Tensor:
    """One fused Adam step of Carlini-Wagner L2 in tanh space (paper Eqs. 3-4), in place.

    The attack minimises L = ||X' - X0||^2 - c * O over w, with X' = (tanh(w) + 1) / 2 (always
    inside the box [0, 1]) and O the head's objective (for CW, min(margin, kappa), so that -O
    is CW's max(max_{i != t} g_i - g_t, -kappa)).  Per element: dL/dw = (2 (X' - X0) -
    c * grad) (1 - tanh(w)^2) / 2, then torch.optim.Adam's update of w (bias-corrected with
    each sample's own step count), then X' from the new w.

    Args:
        w, m, v: [B, ...] float32: the variable and Adam's first and second moments.
        x: [B, ...] float32, X' = (tanh(w) + 1) / 2 of the current w (what the model saw).
        grad: [B, ...] float32/float16/bfloat16, dO/dX' at x.
        x0: [B, ...] float32, the clean images.
        c: [B] float32, each sample's constant, finite.
        step: [B] int64 >= 1, each sample's Adam step count including this step.
        lr, beta1, beta2, eps: Adam's (torch.optim.Adam's defaults but lr): finite, lr > 0,
            betas in [0, 1), eps >= :data:`MIN_ADAM_EPS` (the smallest normal float32; a
            smaller eps rounds to 0 in float32 and 0 / 0 makes NaN where m = v = 0).
        active: [B] bool, None = all; inactive samples are neither stepped nor written.

    Returns:
        [B, 5] float32 with columns :data:`STEP_STATS`: sum|dL/dw| (0 for inactive samples),
        the L1, L2 and Linf norms of the new X' - X0, and step_l1 = sum |X'_new - X'_old|
        (0 for inactive samples).

    A non-finite element of grad counts as 0.  w, m, v and x must not share memory with each
    other or with grad and x0.  Arguments that would make NaN raise ValueError, the tensors'
    contents included on the CPU (a step < 1 or a non-finite c of an active sample).  On CUDA
    the contents are not checked (that would synchronise with the device): such a sample is
    left as it is there, not stepped, with p_l1 = 0.
    """
    _require_tensors(w=w, m=m, v=v, x=x, grad=grad, x0=x0, c=c, step=step,
                     **({} if active is None else {"active": active}))
    return adam_tanh_step_unchecked(w, m, v, x, grad, x0, c, step, lr, beta1, beta2, eps, active)


def adam_tanh_step_unchecked(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                             x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor,
                             c: torch.Tensor, step: torch.Tensor, lr: float, beta1: float,
                             beta2: float, eps: float,
                             active: torch.Tensor | None) -> torch.Tensor:
    """:func:`adam_tanh_step_` without the Python-side checks (see
    :func:`loss_head_unchecked`)."""
    if _COMPILED:
        call = torch.ops.advfast.adam_tanh_step_.default if _tracing() else _C.adam_tanh_step_
        return call(w, m, v, x, grad, x0, c, step, active, lr, beta1, beta2, eps)
    _check_images_meta(tuple(zip("w m v x x0".split(), (w, m, v, x, x0))), grad,
                       ((c, torch.float32, "c"), (step, torch.int64, "step")), active, "w")
    _check_scalars({"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps},
                   (lr > 0, "lr must be positive"),
                   (0 <= beta1 < 1 and 0 <= beta2 < 1, "beta1 and beta2 must lie in [0, 1)"),
                   (eps >= MIN_ADAM_EPS, f"eps must be at least {MIN_ADAM_EPS}"))
    if not torch.compiler.is_compiling():  # active samples only, as csrc/checks.h
        used = torch.ones_like(step, dtype=torch.bool) if active is None else active
        _check_scalars({}, (bool((step >= 1)[used].all()), "step must be at least 1"),
                       (bool(torch.isfinite(c)[used].all()), "c must be finite"))
    _check_written({"w": w, "m": m, "v": v, "x": x}, {"grad": grad, "x0": x0})
    return reference.adam_tanh_step_(w, m, v, x, grad, x0, c, step, lr=lr, beta1=beta1,
                                     beta2=beta2, eps=eps, active=active)


def observe_(head: torch.Tensor, norms: torch.Tensor, age: torch.Tensor, paused: torch.Tensor,
             first_flip: torch.Tensor, flip_norms: torch.Tensor, failure: torch.Tensor,
             done: torch.Tensor, *, trajectory: torch.Tensor | None = None,
             key: torch.Tensor | None = None, columns: tuple[int, ...] = (),
             iterations: int = 2**62, stop: str = "never",
             controlled: bool = True) -> torch.Tensor:
    """The attack engine's bookkeeping after :func:`loss_head`, one fused pass over the rows.

    Per row, from loss_head's stats of the images X_age: a row whose logits are not finite
    gets failure code :data:`NONFINITE_LOGITS` (where it had none); a row predicted as its
    target (``hit``) for the first time, with finite logits, gets ``first_flip = age`` and
    ``flip_norms = norms``.  With ``controlled``, ``done`` also takes in rows that failed,
    that reached ``iterations`` steps, or that meet ``stop`` (:data:`STOP_RULES`: "flip" is
    hit, "confidence" is subspace D3, Definition IV.1).  With a trajectory,
    ``trajectory[age, key, j] = head[:, columns[j]]``.

    Args:
        head: [B, 12] float32, loss_head's stats.
        norms: [B, 3] float32, the L1/L2/Linf of X_age - X0.
        age: [B] int64, steps taken; paused: [B] bool, rows that wait (take no step).
        first_flip, failure: [B] int64; flip_norms: [B, 3] float32; done: [B] bool; updated
            in place.
        trajectory: [T, Bt, W] float32, updated in place, with key [B] int64: every (age, key)
            must lie inside [T, Bt] (IndexError on the CPU, a device assert on CUDA).
        columns: the head's columns the trajectory row takes, at most 16.

    Returns:
        active: [B] bool, the rows that take a step: not done and not paused (controlled),
        else not failed.
    """
    _require_tensors(head=head, norms=norms, age=age, paused=paused, first_flip=first_flip,
                     flip_norms=flip_norms, failure=failure, done=done)
    return _user_errors(observe_unchecked)(head, norms, age, paused, first_flip, flip_norms,
                                           failure, done, trajectory, key, list(columns),
                                           int(iterations), stop, bool(controlled))


def observe_unchecked(head, norms, age, paused, first_flip, flip_norms, failure, done,
                      trajectory, key, columns: list[int], iterations: int, stop: str,
                      controlled: bool) -> torch.Tensor:
    """:func:`observe_` without the Python-side checks, for the engine's hot loop."""
    args = (head, norms, age, paused, first_flip, flip_norms, failure, done, trajectory, key,
            columns, iterations, stop, controlled)
    if _COMPILED:
        return (torch.ops.advfast.observe_.default if _tracing() else _C.observe_)(*args)
    _check_bookkeeping_meta(head, len(HEAD_STATS), "head", (norms, torch.float32, 3, "norms"),
                            (age, torch.int64, 0, "age"), (paused, torch.bool, 0, "paused"),
                            (first_flip, torch.int64, 0, "first_flip"),
                            (flip_norms, torch.float32, 3, "flip_norms"),
                            (failure, torch.int64, 0, "failure"), (done, torch.bool, 0, "done"))
    _check_columns(columns, len(HEAD_STATS), trajectory, key)
    _check_scalars({}, (stop in STOP_RULES, f"unknown stop {stop!r} (expected never, flip or "
                                            "confidence)"))
    _check_written({"first_flip": first_flip, "flip_norms": flip_norms, "failure": failure,
                    "done": done, **({} if trajectory is None else {"trajectory": trajectory})},
                   {"head": head, "norms": norms, "age": age, "paused": paused,
                    **({} if key is None else {"key": key})})
    return reference.observe_(*args)


def advance_(stats: torch.Tensor, active: torch.Tensor, age: torch.Tensor, norms: torch.Tensor,
             *, trajectory: torch.Tensor | None = None, key: torch.Tensor | None = None,
             columns: tuple[int, ...] = ()) -> None:
    """The attack engine's bookkeeping after a step, one fused pass over the rows:
    ``norms = stats[:, delta_l1:delta_linf + 1]``; with a trajectory, its last len(columns)
    columns of row (age, key) take ``stats[:, columns]`` (NaN where ``active`` is False);
    then ``age += active``.

    Args:
        stats: [B, 5] float32, a step's :data:`STEP_STATS`; active: [B] bool.
        age: [B] int64 and norms: [B, 3] float32, updated in place.
        trajectory, key, columns: as for :func:`observe_` (the step's columns, at most 16).
    """
    _require_tensors(stats=stats, active=active, age=age, norms=norms)
    _user_errors(advance_unchecked)(stats, active, age, norms, trajectory, key, list(columns))


def advance_unchecked(stats, active, age, norms, trajectory, key, columns: list[int]) -> None:
    """:func:`advance_` without the Python-side checks, for the engine's hot loop."""
    if _COMPILED:
        call = torch.ops.advfast.advance_.default if _tracing() else _C.advance_
        return call(stats, active, age, norms, trajectory, key, columns)
    _check_bookkeeping_meta(stats, len(STEP_STATS), "stats", (active, torch.bool, 0, "active"),
                            (age, torch.int64, 0, "age"), (norms, torch.float32, 3, "norms"))
    _check_columns(columns, len(STEP_STATS), trajectory, key)
    _check_written({"age": age, "norms": norms,
                    **({} if trajectory is None else {"trajectory": trajectory})},
                   {"stats": stats, "active": active, **({} if key is None else {"key": key})})
    return reference.advance_(stats, active, age, norms, trajectory, key, columns)


def _check_columns(columns: list[int], width: int, trajectory, key) -> None:
    _check_scalars({}, (len(columns) <= 16, "at most 16 columns"),
                   (all(0 <= c < width for c in columns), f"columns must lie in [0, {width})"),
                   ((trajectory is None) == (key is None),
                    "give trajectory and key together, or neither"))
    if trajectory is not None:
        torch._check_type(trajectory.dtype == torch.float32, lambda: "trajectory must be float32")
        _check_scalars({}, (trajectory.dim() == 3 and trajectory.shape[2] >= len(columns),
                            f"trajectory must be [T, B, W] with W >= {len(columns)}"))


def cw_observe_(head: torch.Tensor, norms: torch.Tensor, constant: torch.Tensor,
                active: torch.Tensor, inner_age: torch.Tensor,
                previous_loss: torch.Tensor, best_l2: torch.Tensor, best_constant: torch.Tensor,
                succeeded: torch.Tensor, paused: torch.Tensor, *, kappa: float, steps: int,
                check_every: int, abort_early: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Carlini and Wagner's per-iteration rules (their L2 attack's inner loop, Eqs. 3-4), one
    fused pass over the rows that would step (``active``), as the original computes them in
    float32: the loss ||X' - X0||^2 + c max(kappa - margin, 0) (``norms[:, 1]`` the L2, whose
    square serves the loss and the best alike, as the original's one L2; ``constant`` c, the
    margin from loss_head's stats); at an abort check (``inner_age``
    divisible by ``check_every``, with ``abort_early``) the run has stalled when its loss
    exceeds 0.9999 times ``previous_loss``, which then takes the loss; an image whose margin
    exceeds kappa in a run that has not stalled is a success (``succeeded``), and the new best
    where its squared L2 is below ``best_l2`` (``best_l2``, ``best_constant`` updated); the
    run ends (``paused``) when it stalled or after ``steps`` iterations, else ``inner_age``
    moves on.

    Args:
        head: [B, 12] float32; norms: [B, 3] float32 (of the images the head saw); constant:
            [B] float32; active: [B] bool.
        inner_age: [B] int64; previous_loss, best_l2, best_constant: [B] float32;
            succeeded, paused: [B] bool; updated in place.
        kappa: the margin a success needs; steps, check_every: positive.

    Returns:
        (stepping, better): [B] bool, the rows that take a step, and those whose image became
        their best (the caller copies those images).
    """
    _require_tensors(head=head, norms=norms, constant=constant, active=active,
                     inner_age=inner_age, previous_loss=previous_loss, best_l2=best_l2,
                     best_constant=best_constant, succeeded=succeeded, paused=paused)
    return _user_errors(cw_observe_unchecked)(
        head, norms, constant, active, inner_age, previous_loss, best_l2, best_constant,
        succeeded, paused, float(kappa), int(steps), int(check_every), bool(abort_early))


def cw_observe_unchecked(head, norms, constant, active, inner_age, previous_loss, best_l2,
                         best_constant, succeeded, paused, kappa: float, steps: int,
                         check_every: int, abort_early: bool):
    """:func:`cw_observe_` without the Python-side checks, for the engine's hot loop."""
    args = (head, norms, constant, active, inner_age, previous_loss, best_l2, best_constant,
            succeeded, paused, kappa, steps, check_every, abort_early)
    if _COMPILED:
        return (torch.ops.advfast.cw_observe_.default if _tracing() else _C.cw_observe_)(*args)
    _check_cw_meta(*args[:10])
    _check_scalars({"kappa": kappa}, (steps >= 1 and check_every >= 1,
                                      "steps and check_every must be positive"))
    _check_written({"inner_age": inner_age, "previous_loss": previous_loss, "best_l2": best_l2,
                    "best_constant": best_constant, "succeeded": succeeded, "paused": paused},
                   {"head": head, "norms": norms, "constant": constant, "active": active})
    return reference.cw_observe_(*args)
