"""Per-iteration timing of attacks (the paper's Table I) and profiler annotations.

On CUDA, phases are bracketed by CUDA events that are read once, after the loop, and by NVTX
ranges named ``iter N/phase`` so ``nsys profile`` shows them.  On the CPU, perf_counter.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

PHASES = ("forward", "head", "backward", "update")


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

    def as_dict(self) -> dict:
        return asdict(self)


def hardware_info(device: torch.device) -> dict[str, object]:
    """What ran the attack: GPU name, driver, memory and power from NVML; or the CPU."""
    if device.type != "cuda":
        return {"cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "cores": os.cpu_count()}
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
    """Marks phase boundaries inside the attack loop without synchronising with the host.

    Usage per step: ``begin(n)``, then ``end(phase)`` for each of PHASES in order; the loop's final check forward is ``begin(n, check=True)`` ...
    ``end("check")``.
    """

    def __init__(self, device: torch.device, per_phase: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.per_phase = per_phase
        self._marks: list[tuple[str, object]] = []
        self._nvtx_open = False
        self._start_wall = 0.0
        self._steps_end: object | None = None
        self._in_check = False
        self._start = self._mark()

    def _mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def restart(self) -> None:
        """Starts the clock (after set-up work that should not count)."""
        self._marks.clear()
        self._steps_end = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._start_wall = time.perf_counter()
        self._start = self._mark()

    def begin(self, n: int, check: bool = False) -> None:
        """Starts iteration n; ``check`` marks the loop's final check forward, which ends the
        steps' clock."""
        self._iteration = n
        self._in_check = check
        if check:
            self._steps_end = self._mark()
        elif self.per_phase:
            self._marks.append(("begin", self._mark()))
        self._push("check" if check else PHASES[0])

    def end(self, phase: str) -> None:
        """Ends ``phase``; inside the final check forward only "check" counts, and ends it."""
        if self._in_check:
            if phase == "check":
                self._pop()
            return
        self._pop()
        if self.per_phase:
            self._marks.append((phase, self._mark()))
        following = PHASES.index(phase) + 1
        if following < len(PHASES):
            self._push(PHASES[following])

    def _push(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.nvtx.range_push(f"iter {self._iteration}/{phase}")
            self._nvtx_open = True

    def _pop(self) -> None:
        if self._nvtx_open:
            torch.cuda.nvtx.range_pop()
            self._nvtx_open = False

    def _seconds(self, a: object, b: object) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def finish(self, steps: int, batch_size: int) -> Timing:
        """Stops the clock; the one synchronisation, after the loop."""
        end = self._mark()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        total = (time.perf_counter() - self._start_wall) if self.cuda else end - self._start
        steps_end = end if self._steps_end is None else self._steps_end
        steps_time = self._seconds(self._start, steps_end)
        phases = None
        if self.per_phase:
            sums = dict.fromkeys(PHASES, 0.0)
            previous = None
            for name, mark in self._marks:
                if name != "begin":
                    sums[name] += self._seconds(previous, mark)
                previous = mark
            phases = {k: 1e3 * v / max(steps, 1) for k, v in sums.items()}
        return Timing(device=str(self.device), total_s=total, steps=steps, batch_size=batch_size,
                      per_iteration_ms=1e3 * steps_time / max(steps, 1),
                      images_per_s=batch_size / total if total > 0 else float("inf"),
                      phases_ms=phases, hardware=hardware_info(self.device))
