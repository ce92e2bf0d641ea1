"""Where and how fast to run: the device, the CPU thread count and the C heap's policy."""

from __future__ import annotations

import ctypes
import os
import sys

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


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLDS = (1 << 30, 1 << 25)  # older glibc refuses more than 32 MiB
_TRIM_THRESHOLD = 1 << 30
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Keeps the memory torch frees on the CPU inside the process (glibc's mallopt): blocks up
    to 1 GiB come from the heap instead of fresh mmaps, and up to 1 GiB freed at the heap's
    top stays there.  By default glibc hands such memory back to the kernel, and every
    iteration of an attack then page-faults its activations in again: 270-680 faults per
    iteration on the digits CNN at batch 64, 6-20 % of its time (bench/bench_malloc.py).
    The process keeps its peak heap instead.  Returns whether it applied: not on a C library
    other than glibc, nor where the user set glibc's own malloc variables (theirs win).
    Process-wide, so the command line calls it, not the library."""
    if sys.platform != "linux" or any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # The mmap threshold first: the trim threshold alone would switch off glibc's dynamic
    # mmap threshold and map every block of 128 KiB or more afresh.
    if not any(mallopt(_M_MMAP_THRESHOLD, size) for size in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
