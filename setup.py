"""Builds advfast._C: the CPU kernels always, the CUDA kernels whenever torch has CUDA and a CUDA
toolkit is found (a visible GPU is not needed).

Environment:
    ADVFAST_CUDA=1        require the CUDA kernels (fail if no toolkit is found)
    ADVFAST_CUDA=0        build the CPU kernels only
    TORCH_CUDA_ARCH_LIST  GPU architectures; default "8.0;9.0+PTX" when no GPU is visible
    CUDA_HOME             toolkit root; found from `nvcc --dryrun` when unset
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _toolkit_root_from_nvcc() -> str | None:
    """The toolkit root nvcc itself reports (its TOP= line), which survives nvcc wrapper scripts."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        open(probe, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", probe], capture_output=True, text=True,
                                 timeout=60, cwd=tmp)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    return os.path.realpath(match.group(1)) if match else None


def _want_cuda() -> bool:
    choice = os.environ.get("ADVFAST_CUDA", "auto").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return False
    if "CUDA_HOME" not in os.environ:
        root = _toolkit_root_from_nvcc()
        if root:
            os.environ["CUDA_HOME"] = root
    import torch

    available = torch.version.cuda is not None and bool(os.environ.get("CUDA_HOME"))
    if choice in ("1", "true", "yes", "on") and not available:
        raise RuntimeError("ADVFAST_CUDA=1 but torch has no CUDA or no CUDA toolkit was found; "
                           "set CUDA_HOME to the toolkit root")
    return available


def _extensions():
    use_cuda = _want_cuda()
    # Imported after CUDA_HOME is settled: cpp_extension reads it at import time.
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # No FMA contraction (-ffp-contract=off here, --fmad=false for nvcc): the kernels then
    # round like the eager reference, and the CPU like the GPU.  No
    # trapping math (nothing relies on floating-point traps): lets exp_of's rounding and
    # conversion vectorise.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    if not use_cuda:
        return [CppExtension("advfast._C", sources, extra_compile_args={"cxx": cxx},
                             extra_link_args=["-fopenmp"])]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return [CUDAExtension("advfast._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                          extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
                          extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        """Keeps object files in ./build/ (pip would use a new temporary folder each time), so
        a second ``pip install -e`` recompiles only what changed."""

        def finalize_options(self) -> None:
            super().finalize_options()
            here = os.path.dirname(os.path.abspath(__file__))
            self.build_temp = os.path.join(here, "build", "temp")
            print("advfast: compiling the C++/CUDA kernels (a few minutes on 2 cores the first "
                  "time; object files are kept in build/)", flush=True)

    return Build.with_options(use_ninja=shutil.which("ninja") is not None)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
