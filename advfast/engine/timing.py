"""Per-iteration timing of attacks (the paper's Table I) and profiler annotations.

On CUDA, phases are bracketed by CUDA events that are read once, after the loop, and by NVTX
ranges named ``iter N/phase`` so ``nsys profile`` shows them.  On the CPU, perf_counter.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

PHASES = ("forward", "head", "backward", "update")
_UNTIMED = nullcontext()  # reentrant and stateless: one instance serves every untimed phase


@dataclass
class Timing:
    """Wall-clock time of one attack call.

    ``total_s`` covers the whole loop, including its last forward pass that checks the final
    images; ``per_iteration_ms`` is the time of the steps alone (forward, loss head, backward,
    update) divided by their number; ``phases_ms`` gives the mean milliseconds per step of each
    phase (None when phase timing is off; the final check forward is left out of it too).
    """

    device: str
    total_s: float
    steps: int
    batch_size: int
    per_iteration_ms: float
    images_per_s: float
    phases_ms: dict[str, float] | None = None
    hardware: dict[str, object] = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    # platform.processor() runs `uname -p` in a subprocess: once is enough
    return platform.processor() or platform.machine()


def hardware_info(device: torch.device) -> dict[str, object]:
    """What ran the attack: GPU name, driver, memory and power from NVML; or the CPU."""
    if device.type != "cuda":
        return {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    index = device.index if device.index is not None else torch.cuda.current_device()
    info: dict[str, object] = {"gpu": torch.cuda.get_device_name(index)}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            info.update(driver=pynvml.nvmlSystemGetDriverVersion(),
                        memory_total_mib=memory.total // 2**20,
                        memory_used_mib=memory.used // 2**20,
                        power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                        power_limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # NVML missing or refused: timing still works without it
        info["nvml"] = f"unavailable: {err}"
    return info


class PhaseTimer:
    """Times the phases of the attack loop without synchronising with the host.

    ``with timer.phase(n, "forward"): ...`` brackets one phase of iteration n: a CUDA event
    pair (read once, in :meth:`finish`) or perf_counter, and an NVTX range ``iter n/forward``
    for Nsight Systems.  The phase "check" (the final forward that observes the last images)
    is kept out of the per-iteration time.
    """

    def __init__(self, device: torch.device, per_phase: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.per_phase = per_phase
        self._spans: list[tuple[str, object, object]] = []
        self._check: list[tuple[object, object]] = []
        self._start_wall = 0.0
        self._start: object = None

    def _mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Starts the clock (after set-up work that should not count)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._start_wall = time.perf_counter()
        self._start = self._mark()

    def phase(self, n: int, name: str) -> AbstractContextManager[None]:
        """Brackets phase ``name`` (one of PHASES, or "check") of iteration n.  On the CPU an
        untimed phase is one shared empty context: the loop pays no generator for it."""
        if not (self.cuda or self.per_phase or name == "check"):
            return _UNTIMED
        return self._timed_phase(n, name)

    @contextmanager
    def _timed_phase(self, n: int, name: str) -> Iterator[None]:
        timed = self.per_phase or name == "check"
        begin = self._mark() if timed else None
        if self.cuda:
            torch.cuda.nvtx.range_push(f"iter {n}/{name}")
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.nvtx.range_pop()
            if timed:
                span = (begin, self._mark())
                if name == "check":
                    self._check.append(span)
                else:
                    self._spans.append((name, *span))

    def _seconds(self, a: object, b: object) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def finish(self, steps: int, samples: int) -> Timing:
        """Stops the clock; the one synchronisation, after the loop.  ``steps`` is the number
        of iterations run, ``samples`` the number of samples attacked."""
        end = self._mark()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            total = time.perf_counter() - self._start_wall
        else:
            total = end - self._start
        check = sum(self._seconds(a, b) for a, b in self._check)
        steps_time = self._seconds(self._start, end) - check
        phases = None
        if self.per_phase:
            sums = dict.fromkeys(PHASES, 0.0)
            for name, a, b in self._spans:
                sums[name] += self._seconds(a, b)
            phases = {k: 1e3 * v / max(steps, 1) for k, v in sums.items()}
        return Timing(device=str(self.device), total_s=total, steps=steps, batch_size=samples,
                      per_iteration_ms=1e3 * steps_time / max(steps, 1),
                      images_per_s=samples / total if total > 0 else float("inf"),
                      phases_ms=phases, hardware=hardware_info(self.device))
