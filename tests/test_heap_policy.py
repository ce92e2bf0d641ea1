"""keep_freed_memory: the CPU's freed tensors stay in the process instead of being faulted in
again on every iteration; a user's own glibc settings win; the command line applies it.

The policy is process-wide, so each measurement runs in a fresh interpreter."""

import os
import platform
import subprocess
import sys

import pytest

from advfast import cli

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# Allocates and frees a 48 MB tensor (above glibc's largest dynamic mmap threshold, 32 MiB, so
# glibc maps it afresh every time by default), then prints the median minor faults of ten more
# (the median: the heap may still grow once, when something else took its top).
PROBE = """
import resource, statistics, sys, torch
from advfast.engine.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(3):
    torch.ones(12_000_000)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(12_000_000)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults))
"""


def _probe(policy: str, **env: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, policy], check=True, text=True,
                         capture_output=True, env={**os.environ, **env})
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's")
def test_freed_tensors_are_not_faulted_in_again():
    _, default_faults = _probe("default")
    applied, kept_faults = _probe("keep")
    assert default_faults > 5000  # 48 MB is about 11,700 pages, mapped afresh each time
    assert applied and kept_faults < 0.01 * default_faults


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's")
def test_users_own_glibc_settings_win():
    applied, faults = _probe("keep", MALLOC_TOP_PAD_="0")
    assert not applied and faults > 5000


def test_the_command_line_applies_it(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["bench", "--nsys", "--iterations", "1"]) == 2  # a user error, after it
    assert calls == [True]
