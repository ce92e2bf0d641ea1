"""advfast's fused operators: the loss head on the logits and the perturbation step.

Both run as registered PyTorch operators (``torch.ops.advfast.*``, C++ on CPU and CUDA on GPU)
when the compiled library ``advfast._C`` is present, and fall back to the pure-PyTorch
reference in :mod:`advfast.ops.reference` (with one warning) when it is not.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

from advfast.ops import reference
from advfast.ops.reference import HEAD_STATS, STEP_STATS
from advfast.errors import ClassOutOfRange, InvalidType, InvalidValue

__all__ = ["LOSSES", "KAPPA_MODES", "HEAD_STATS", "STEP_STATS", "backend", "loss_head",
           "perturb_step_", "adam_tanh_step_"]

LOSSES: tuple[str, ...] = ("ce", "ce-sign", "logit", "m-logit")
KAPPA_MODES: tuple[str, ...] = ("clamp", "balance")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

try:
    from advfast import _C  # noqa: F401  (loading it registers torch.ops.advfast.*)

    _COMPILED = True
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    _COMPILED = False
    warnings.warn(f"advfast: compiled kernels unavailable ({err}); using the pure-PyTorch "
                  "reference, which is correct but slower. Reinstall with "
                  "`pip install --no-build-isolation -e .` to build them.", RuntimeWarning,
                  stacklevel=2)


def backend() -> Literal["cpu+cuda", "cpu", "reference"]:
    """Which implementation the ops use: compiled with CUDA kernels, compiled CPU only, or the
    pure-PyTorch reference."""
    if not _COMPILED:
        return "reference"
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("advfast::loss_head", "CUDA")
    return "cpu+cuda" if has_cuda else "cpu"


if _COMPILED:

    @torch.library.register_fake("advfast::loss_head")
    def _loss_head_fake(logits, target, source, loss, kappa, kappa_mode, threshold):
        batch, classes = logits.shape
        return (logits.new_empty((batch, classes), dtype=torch.float32),
                logits.new_empty((batch, len(HEAD_STATS)), dtype=torch.float32))

    @torch.library.register_fake("advfast::perturb_step_")
    def _perturb_step_fake(x, grad, x0, active, sign, alpha, beta, lo, hi, eps):
        return x.new_empty((x.shape[0], len(STEP_STATS)))

    @torch.library.register_fake("advfast::adam_tanh_step_")
    def _adam_tanh_step_fake(w, m, v, x, grad, x0, c, step, active, lr, beta1, beta2, eps):
        return w.new_empty((w.shape[0], len(STEP_STATS)))


def _require_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidType(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidValue(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi + t.element_size()


def _check_no_overlap(x: torch.Tensor, other: torch.Tensor, name: str,
                      written: str = "x") -> None:
    """x is written in place: it must not share memory with an input (the kernels read their
    inputs through restrict pointers, and the reference would read what it just wrote)."""
    if x.numel() == 0 or other.numel() == 0 or torch.compiler.is_compiling():
        return
    if x.untyped_storage().data_ptr() != other.untyped_storage().data_ptr():
        return
    (a0, a1), (b0, b1) = _byte_span(x), _byte_span(other)
    if a0 < b1 and b0 < a1:
        raise InvalidValue(f"{written} is updated in place and must not share memory with {name}")


def _check_indices(index: torch.Tensor, classes: int, name: str) -> None:
    # A data-dependent check: it synchronises on a GPU, so the attack engine validates once
    # and then passes validate_indices=False inside its loop.
    if index.numel() and bool(((index < 0) | (index >= classes)).any()):
        bad = index[(index < 0) | (index >= classes)][0].item()
        raise ClassOutOfRange(f"{name} holds class {bad}, outside [0, {classes})")


def loss_head(logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor, loss: str,
              kappa: float = 20.0, kappa_mode: str = "clamp", threshold: float = 0.9, *,
              validate_indices: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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

    Returns:
        seed: [B, M] float32, dO/dlogits.
        stats: [B, 12] float32 with columns :data:`HEAD_STATS`: pred, max_prob, target_prob,
            target_logit, source_prob, source_logit, runner_up (c*), margin (g_c - g_c*),
            subspace (1/2/3), hit (pred == c), target_logprob (log softmax(g)_c) and finite
            (0 for a row with a NaN or +inf logit or only -inf ones; its probabilities and
            target_logprob are NaN).  ``-inf`` logits are masked classes with probability 0.
    """
    for value, name in ((logits, "logits"), (target, "target"), (source, "source")):
        _require_tensor(value, name)
    if logits.dtype not in _FLOATS:
        raise InvalidType(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2:
        raise InvalidValue(f"logits must be [B, M], got shape {tuple(logits.shape)}")
    batch, classes = logits.shape
    if classes < 2:
        raise InvalidValue(f"logits need at least 2 classes, got M = {classes}")
    for index, name in ((target, "target"), (source, "source")):
        if index.dtype != torch.int64:
            raise InvalidType(f"{name} must be int64, got {index.dtype}")
        if tuple(index.shape) != (batch,):
            raise InvalidValue(f"{name} must have shape [{batch}] to match logits, "
                             f"got {tuple(index.shape)}")
        if index.device != logits.device:
            raise InvalidValue(f"{name} is on {index.device} but logits on {logits.device}")
    if loss not in LOSSES:
        raise InvalidValue(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if kappa_mode not in KAPPA_MODES:
        raise InvalidValue(f"unknown kappa_mode {kappa_mode!r}; choose one of "
                         f"{', '.join(KAPPA_MODES)}")
    kappa = _require_finite(kappa, "kappa")
    threshold = _require_finite(threshold, "threshold")
    if validate_indices and not torch.compiler.is_compiling():
        _check_indices(target, classes, "target")
        _check_indices(source, classes, "source")
    return loss_head_unchecked(logits, target, source, loss, kappa, kappa_mode, threshold)


def loss_head_unchecked(logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor,
                        loss: str, kappa: float, kappa_mode: str,
                        threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`loss_head` without the Python-side checks, for the engine's hot loop, whose
    operands are checked once when an attack starts (the C++ checks still run)."""
    if _COMPILED:
        return torch.ops.advfast.loss_head(logits, target, source, loss, kappa, kappa_mode,
                                           threshold)
    return reference.loss_head(logits, target, source, loss, kappa, kappa_mode, threshold)


def perturb_step_(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, *, sign: bool,
                  alpha: float | None = None, beta: float | None = None, lo: float = 0.0,
                  hi: float = 1.0, eps: float | None = None,
                  active: torch.Tensor | None = None) -> torch.Tensor:
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

    Returns:
        [B, 4] float32 with columns :data:`STEP_STATS`: sum|P| (0 for inactive samples), then the
        L1, L2 and Linf norms of x - x0 after the step.

    A non-finite gradient element (NaN, +-inf) contributes no step and nothing to sum|P|, so a
    finite image never becomes NaN.  x must not share memory with grad or x0 (ValueError).
    Autograd sees the in-place update: x's version counter moves, as with ``x.add_``.
    """
    for value, name in ((x, "x"), (grad, "grad"), (x0, "x0")):
        _require_tensor(value, name)
    if x.dtype != torch.float32 or x0.dtype != torch.float32:
        raise InvalidType(f"x and x0 must be float32, got {x.dtype} and {x0.dtype}")
    if grad.dtype not in _FLOATS:
        raise InvalidType(f"grad must be float32, float16 or bfloat16, got {grad.dtype}")
    if x.dim() < 1:
        raise InvalidValue("x must have a batch dimension [B, ...]")
    if grad.shape != x.shape or x0.shape != x.shape:
        raise InvalidValue(f"x, grad and x0 must have the same shape, got {tuple(x.shape)}, "
                         f"{tuple(grad.shape)} and {tuple(x0.shape)}")
    if grad.device != x.device or x0.device != x.device:
        raise InvalidValue(f"x, grad and x0 must be on one device, got {x.device}, {grad.device} "
                         f"and {x0.device}")
    _check_no_overlap(x, grad, "grad")
    _check_no_overlap(x, x0, "x0")
    if (alpha is None) == (beta is None):
        raise InvalidValue("give exactly one of alpha (equal multiplier) or beta (equal "
                         "perturbation)")
    alpha = None if alpha is None else _require_finite(alpha, "alpha")
    beta = None if beta is None else _require_finite(beta, "beta")
    lo, hi = _require_finite(lo, "lo"), _require_finite(hi, "hi")
    if lo > hi:
        raise InvalidValue(f"lo ({lo}) must not exceed hi ({hi})")
    if eps is not None and _require_finite(eps, "eps") < 0:
        raise InvalidValue(f"eps must be non-negative, got {eps}")
    eps = None if eps is None else float(eps)
    if active is not None:
        _require_tensor(active, "active")
        if active.dtype != torch.bool or tuple(active.shape) != (x.shape[0],):
            raise InvalidValue(f"active must be a bool tensor of shape [{x.shape[0]}], got "
                             f"{active.dtype} {tuple(active.shape)}")
        if active.device != x.device:
            raise InvalidValue(f"active is on {active.device} but x on {x.device}")
    return perturb_step_unchecked(x, grad, x0, bool(sign), alpha, beta, lo, hi, eps, active)


def perturb_step_unchecked(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, sign: bool,
                           alpha: float | None, beta: float | None, lo: float, hi: float,
                           eps: float | None, active: torch.Tensor | None) -> torch.Tensor:
    """:func:`perturb_step_` without the Python-side checks (see
    :func:`loss_head_unchecked`)."""
    if _COMPILED:
        return torch.ops.advfast.perturb_step_(x, grad, x0, active, sign, alpha, beta, lo, hi,
                                               eps)
    return reference.perturb_step_(x, grad, x0, sign=sign, alpha=alpha, beta=beta, lo=lo,
                                   hi=hi, eps=eps, active=active)


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
        c: [B] float32, each sample's constant.
        step: [B] int64 >= 1, each sample's Adam step count including this step.
        lr, beta1, beta2, eps: Adam's (torch.optim.Adam's defaults but lr).
        active: [B] bool, None = all; inactive samples are neither stepped nor written.

    Returns:
        [B, 4] float32 with columns :data:`STEP_STATS`: sum|dL/dw| (0 for inactive samples),
        then the L1, L2 and Linf norms of the new X' - X0.

    A non-finite element of grad counts as 0.  w, m, v and x must not share memory with each
    other or with grad and x0.
    """
    for value, name in ((w, "w"), (m, "m"), (v, "v"), (x, "x"), (grad, "grad"), (x0, "x0"),
                        (c, "c"), (step, "step")):
        _require_tensor(value, name)
    for value, name in ((w, "w"), (m, "m"), (v, "v"), (x, "x"), (x0, "x0")):
        if value.dtype != torch.float32:
            raise InvalidType(f"{name} must be float32, got {value.dtype}")
        if value.shape != w.shape or value.device != w.device:
            raise InvalidValue(f"{name} must have the shape and device of w, {tuple(w.shape)} on "
                             f"{w.device}; got {tuple(value.shape)} on {value.device}")
    if grad.dtype not in _FLOATS:
        raise InvalidType(f"grad must be float32, float16 or bfloat16, got {grad.dtype}")
    if grad.shape != w.shape or grad.device != w.device:
        raise InvalidValue(f"grad must have the shape and device of w, got {tuple(grad.shape)}")
    if w.dim() < 1:
        raise InvalidValue("w must have a batch dimension [B, ...]")
    for value, name, dtype in ((c, "c", torch.float32), (step, "step", torch.int64),
                               (active, "active", torch.bool)):
        if value is None:
            continue
        _require_tensor(value, name)
        if value.dtype != dtype or tuple(value.shape) != (w.shape[0],) or value.device != w.device:
            raise InvalidValue(f"{name} must be {dtype} of shape [{w.shape[0]}] on {w.device}, got "
                             f"{value.dtype} {tuple(value.shape)} on {value.device}")
    lr, eps = _require_finite(lr, "lr"), _require_finite(eps, "eps")
    beta1, beta2 = _require_finite(beta1, "beta1"), _require_finite(beta2, "beta2")
    if lr <= 0 or eps <= 0:
        raise InvalidValue(f"lr and eps must be positive, got {lr} and {eps}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise InvalidValue(f"beta1 and beta2 must lie in [0, 1), got {beta1} and {beta2}")
    written = (("w", w), ("m", m), ("v", v), ("x", x))
    for i, (name, tensor) in enumerate(written):
        for other_name, other in (*written[i + 1:], ("grad", grad), ("x0", x0)):
            _check_no_overlap(tensor, other, other_name, written=name)
    return adam_tanh_step_unchecked(w, m, v, x, grad, x0, c, step, lr, beta1, beta2, eps, active)


def adam_tanh_step_unchecked(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                             x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor,
                             c: torch.Tensor, step: torch.Tensor, lr: float, beta1: float,
                             beta2: float, eps: float,
                             active: torch.Tensor | None) -> torch.Tensor:
    """:func:`adam_tanh_step_` without the Python-side checks (see
    :func:`loss_head_unchecked`)."""
    if _COMPILED:
        return torch.ops.advfast.adam_tanh_step_(w, m, v, x, grad, x0, c, step, active, lr,
                                                 beta1, beta2, eps)
    return reference.adam_tanh_step_(w, m, v, x, grad, x0, c, step, lr=lr, beta1=beta1,
                                     beta2=beta2, eps=eps, active=active)
