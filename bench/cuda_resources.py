"""Registers, stack and spills of every advfast CUDA kernel, from ptxas (nvcc --resource-usage).

Compiles each csrc/cuda/*.cu for one architecture with the build's own flags (setup.py's), lists
each kernel's registers per thread, stack frame and spill stores / loads, and exits 1 if any
kernel spills to local memory or uses a stack frame.  Needs nvcc and torch's headers, no GPU.

    python bench/cuda_resources.py [--arch 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\d+'\n"
                   r"ptxas info\s+: Function properties for [^\n]+\n"
                   r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                   r"ptxas info\s+: Used (\d+) registers")


def nvcc_flags(arch: str) -> list[str]:
    """The build's CUDA flags (torch's, and setup.py's NVCC_FLAGS) for one architecture."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    own = next(ast.literal_eval(node.value) for node in tree.body
               if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NVCC_FLAGS")
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    return ([f"-I{p}" for p in includes] + cpp_extension.COMMON_NVCC_FLAGS + ["-Xcompiler", "-fPIC"]
            + own + [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-std=c++20",
                     "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                     "--resource-usage"])


def kernels(source: Path, flags: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"), "-c",
                              str(source), "-o", str(Path(tmp) / "k.o"), *flags],
                             capture_output=True, text=True, check=False)
    if run.returncode:
        sys.exit(f"nvcc failed on {source.name}:\n{run.stderr[-3000:]}")
    found = ENTRY.findall(run.stdout + run.stderr)
    names = subprocess.run(["c++filt"], input="\n".join(f[0] for f in found),
                           capture_output=True, text=True).stdout.splitlines()
    return [{"file": source.name, "kernel": re.sub(r"\(.*|advfast::(\(anonymous namespace\)::)?",
                                                   "", name),
             "registers": int(r), "stack": int(st), "spill_stores": int(ss),
             "spill_loads": int(sl)} for (_, st, ss, sl, r), name in zip(found, names)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90", help="compute capability, e.g. 90 (sm_90)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    flags = nvcc_flags(args.arch)
    rows = [k for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) for k in kernels(src, flags)]
    print(f"| kernel (sm_{args.arch}) | registers / thread | stack | spill stores / loads |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['registers']} | {r['stack']} | "
              f"{r['spill_stores']} / {r['spill_loads']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r["kernel"] for r in rows if r["stack"] or r["spill_stores"] or r["spill_loads"]]
    if not rows:
        sys.exit("no kernel found in ptxas's report")
    if bad:
        sys.exit(f"spills or stack frames in: {', '.join(bad)}")
    print(f"\n{len(rows)} kernels, no spills, no stack frames")


if __name__ == "__main__":
    main()
