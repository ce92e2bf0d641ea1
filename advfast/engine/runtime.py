"""Where and how fast to run: the device and the CPU thread count."""

from __future__ import annotations

import os

import torch
from advfast.errors import InvalidValue


def resolve_device(device: str | None) -> torch.device:
    """"auto" (or None): the GPU when one is visible, else the CPU; otherwise the named device
    (ValueError for a CUDA device that is not there)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise InvalidValue(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValue(f"device {device} asked for, but no CUDA GPU is visible")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InvalidValue(f"device {device} asked for, but only {torch.cuda.device_count()} "
                             "GPUs are visible")
    return resolved


def default_threads() -> int:
    """CPU threads for torch: $OMP_NUM_THREADS if set, else the cores this process may use
    less the ones other jobs keep busy (the 1-minute load average, rounded), at least one.
    (torch's own default takes every core, and on a shared machine threads that wait for a
    busy core make an attack several times slower than one thread would.)"""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average here
        busy = 0
    return max(1, min(cores, cores - busy))


def set_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads (default :func:`default_threads`); returns the number."""
    count = default_threads() if threads is None else threads
    if count < 1:
        raise InvalidValue(f"threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count
