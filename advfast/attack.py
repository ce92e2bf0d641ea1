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
from collections.abc import Iterator
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
class AttackResult:
    """What one attack call produced; every tensor is on the attack's device, batch order kept.

    adversarial: [B, C, H, W] float32, the final images (for stop rules: where each stopped).
    first_flip: [B] int64, steps applied when the prediction first equalled the target
        (0 if it already did, -1 if never).
    at_flip: {"l1", "l2", "linf"} -> [B] float32 norms of X_flip - X_0 (NaN where no flip).
    final: {"l1", "l2", "linf", "target_prob"} -> [B] float32 for the final images.
    steps: [B] int64, steps applied to each sample.
    trajectory: {name: [iterations + 1, B] float32} for the names in TRAJECTORY (row n is X_n;
        NaN after a sample stopped, and p_l1 is NaN in the last row); None when record=False.
    """

    adversarial: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    first_flip: torch.Tensor
    at_flip: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    steps: torch.Tensor
    trajectory: dict[str, torch.Tensor] | None
    timing: Timing


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

    def _step_rule(self) -> dict[str, float]:
        return {"alpha": self.alpha} if self.step == "equal-multiplier" else {"beta": self.beta}

    def __call__(self, images: torch.Tensor, target: torch.Tensor,
                 source: torch.Tensor | None = None) -> AttackResult:
        device = model_device(self.model)
        x0 = _check_images(images).to(device, torch.float32)
        target = _check_labels(target, "target", len(x0)).to(device)
        if source is not None:
            source = _check_labels(source, "source", len(x0)).to(device)
        autocast = (torch.autocast(device.type, dtype=AMPS[self.amp]) if self.amp
                    else nullcontext())
        with frozen(self.model, self.channels_last):
            if self.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), autocast:
                logits = self.model(x0)
            if source is None:
                source = logits.argmax(dim=1)
            classes = logits.shape[1]
            ops._check_indices(target, classes, "target")
            ops._check_indices(source, classes, "source")
            return self._run(x0, target, source, autocast)

    def _run(self, x0: torch.Tensor, target: torch.Tensor, source: torch.Tensor,
             autocast) -> AttackResult:
        batch, device, iterations = len(x0), x0.device, self.iterations
        sign = self.loss == "ce-sign"
        rule = self._step_rule()
        stopping = self.stop != "never"
        # Outputs over the whole batch; the loop works on the rows still running (`rows`).
        adversarial = torch.empty_like(x0)
        first_flip = torch.full((batch,), -1, dtype=torch.int64, device=device)
        flip_norms = torch.full((batch, 3), float("nan"), device=device)
        final_stats = torch.empty((batch, 4), device=device)
        steps_out = torch.empty((batch,), dtype=torch.int64, device=device)
        trajectory = (torch.full((iterations + 1, len(TRAJECTORY), batch), float("nan"),
                                 device=device) if self.record else None)
        # State of the running rows.
        rows = torch.arange(batch, device=device)
        x = x0.clone().requires_grad_(True)
        x0_run, target_run, source_run = x0, target, source
        flip_run = first_flip.clone()
        norms_run = torch.zeros((batch, 3), device=device)  # |X_n - X_0| of each row
        flip_norms_run = flip_norms.clone()
        stopped_at = torch.full((batch,), -1, dtype=torch.int64, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device) if stopping else None
        head = None

        def retire(keep: torch.Tensor | None) -> None:
            """Writes finished rows (all rows when keep is None) to the outputs."""
            done = slice(None) if keep is None else ~keep
            idx = rows[done]
            adversarial[idx] = x.detach()[done]
            first_flip[idx] = flip_run[done]
            flip_norms[idx] = flip_norms_run[done]
            final_stats[idx] = torch.cat([norms_run, head[:, _TARGET_PROB, None]], dim=1)[done]
            steps_out[idx] = torch.where(stopped_at[done] >= 0, stopped_at[done], iterations)

        timer = PhaseTimer(device, per_phase=self.time_phases)
        timer.restart()
        steps_taken = 0
        for n in range(iterations + 1):
            timer.begin(n, check=n == iterations)
            with autocast:
                logits = self.model(x)
            timer.end("forward")
            seed, head = ops.loss_head(logits.detach(), target_run, source_run, self.loss,
                                       self.kappa, self.kappa_mode, self.threshold,
                                       validate_indices=False)
            hit = head[:, _HIT] > 0.5
            newly = hit & (flip_run < 0)
            flip_run = torch.where(newly, n, flip_run)
            flip_norms_run = torch.where(newly[:, None], norms_run, flip_norms_run)
            if trajectory is not None:
                trajectory[n, :-1].index_copy_(1, rows, head[:, _HEAD_COLUMNS].t())
            if n == iterations:
                timer.end("check")
                break
            if stopping:
                finished = hit if self.stop == "flip" else head[:, _SUBSPACE] == 3
                stopped_at = torch.where(finished & active, n, stopped_at)
                active = active & ~finished
            timer.end("head")
            (grad,) = torch.autograd.grad(logits, x, seed.to(logits.dtype))
            timer.end("backward")
            with torch.no_grad():
                step_stats = ops.perturb_step_(x, grad, x0_run, sign=sign, eps=self.eps,
                                               active=active, **rule)
            norms_run = step_stats[:, 1:]
            if trajectory is not None:
                trajectory[n, -1].index_copy_(0, rows, step_stats[:, 0])
            timer.end("update")
            steps_taken += 1
            if stopping and (n + 1) % self.compact_every == 0:
                keep = active.clone()
                if not bool(keep.all()):  # the host sync a stop rule needs, every K steps
                    retire(keep)
                    rows, x0_run, target_run, source_run = (rows[keep], x0_run[keep],
                                                            target_run[keep], source_run[keep])
                    flip_run, flip_norms_run = flip_run[keep], flip_norms_run[keep]
                    norms_run, stopped_at, active = norms_run[keep], stopped_at[keep], active[keep]
                    head = head[keep]
                    x = x.detach()[keep].requires_grad_(True)
                    if len(rows) == 0:
                        break
        if len(rows):
            retire(None)
        timing = timer.finish(steps_taken, batch)
        return AttackResult(
            adversarial=adversarial.contiguous(), source=source, target=target,
            first_flip=first_flip, at_flip=dict(zip(NORMS, flip_norms.unbind(1))),
            final=dict(zip((*NORMS, "target_prob"), final_stats.unbind(1))), steps=steps_out,
            trajectory=(None if trajectory is None else dict(zip(TRAJECTORY, trajectory.unbind(1)))),
            timing=timing)


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
