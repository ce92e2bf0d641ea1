"""Kernel microbenchmarks under pytest-benchmark, comparable across commits:

    python -m pytest bench/test_kernels.py --benchmark-json=kernels.json
    python -m pytest bench/test_kernels.py --benchmark-compare     # against the last saved run

Every case runs on the CPU and, where a GPU is visible, on CUDA; the copy baseline (one
``x.copy_(grad)``: read one tensor, write one, the memory floor) is measured in the same run at
every shape, so ratios are taken within one run (``perturb_step`` / ``copy``,
``adam_tanh_step`` / ``copy``).  The test suite
(``python -m pytest tests``) does not collect this folder.
"""

from __future__ import annotations

import pytest
import torch

from advfast import ops

SHAPES = [(8, 3, 224, 224), (32, 3, 64, 64), (256, 3, 32, 32)]
VARIANTS = {"alpha": dict(sign=False, alpha=5e-4), "beta": dict(sign=False, beta=5.0),
            "alpha-sign": dict(sign=True, alpha=5e-4), "beta-sign": dict(sign=True, beta=5.0)}
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
HEAD_BATCHES = [64, 256]


def _timed(benchmark, device: str, fn) -> None:
    """Times ``fn``, waiting for the GPU inside each round (kernels launch asynchronously)."""
    if device == "cuda":
        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark(synced)
    else:
        benchmark(fn)


def _images(shape, device: str):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(shape, generator=gen).to(device)
    grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
    return x0.clone(), grad, x0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_copy(benchmark, device, shape):
    x, grad, _ = _images(shape, device)
    _timed(benchmark, device, lambda: x.copy_(grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_perturb_step(benchmark, device, shape, variant):
    x, grad, x0 = _images(shape, device)
    _timed(benchmark, device, lambda: ops.perturb_step_(x, grad, x0, **VARIANTS[variant]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", HEAD_BATCHES)
@pytest.mark.parametrize("loss", ops.LOSSES)
def test_loss_head(benchmark, device, batch, loss):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, 1000, generator=gen) * 5).to(device)
    target = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    source = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    _timed(benchmark, device, lambda: ops.loss_head(logits, target, source, loss,
                                                    validate_indices=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adam_tanh_step(benchmark, device, shape):
    """CW's fused step: reads w, m, v, x, grad, x0 and writes w, m, v, x (5x a copy's traffic
    at the memory limit)."""
    x, grad, x0 = _images(shape, device)
    w = torch.atanh((2 * x0 - 1) * (1 - 1e-6))
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    c = torch.ones(shape[0], device=device)
    step = torch.ones(shape[0], dtype=torch.int64, device=device)
    _timed(benchmark, device, lambda: ops.adam_tanh_step_(w, m, v, x, grad, x0, c, step,
                                                          lr=1e-2))
