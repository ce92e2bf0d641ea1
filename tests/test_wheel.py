"""The wheel holds every module of the source tree and the compiled library, and imports on
its own (from the unpacked wheel, not from this checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                           "--no-deps", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels = list(out.glob("advfast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def source_modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)).replace(os.sep, "/")
                  for p in (ROOT / "advfast").rglob("*.py") if "__pycache__" not in p.parts)


def test_the_wheel_holds_every_module_and_the_compiled_library(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    modules = source_modules()
    assert "advfast/engine/rows.py" in modules and len(modules) > 30
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules missing from {wheel.name}: {missing}"
    compiled = [n for n in names if n.startswith("advfast/_C") and n.endswith(".so")]
    assert len(compiled) == 1, sorted(n for n in names if n.startswith("advfast/_C"))


def test_every_module_imports_from_the_unpacked_wheel(wheel, tmp_path):
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    modules = [m[:-3].replace("/", ".").removesuffix(".__init__") for m in source_modules()]
    modules = [m for m in modules if m != "advfast.__main__"]  # runs the command line
    script = (
        "import importlib, sys\n"
        "import advfast\n"
        f"assert advfast.__file__.startswith({str(unpacked)!r}), advfast.__file__\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(unpacked)!r}), module.__file__\n"
        "import advfast.ops\n"
        "print(advfast.ops.backend(), len(sys.modules))\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] != "reference", "the wheel's compiled library did not load"
