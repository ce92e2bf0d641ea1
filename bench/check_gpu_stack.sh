#!/usr/bin/env bash
# bench/check_gpu_stack.sh OUT
#
# bench/gpu_check.sh in its CPU mode, on the GPU machine's own software stack (the device tool's
# KINDS.md): Python 3.12, torch 2.11.0 and torchvision 0.26.0, with the packages that machine has
# (scikit-learn, matplotlib, pyarrow, tqdm, safetensors, nvidia-ml-py, pytest, pytest-benchmark,
# scipy, pandas, ninja) and without the ones it lacks (torchattacks, expecttest, foolbox, ART,
# mlxtend).  So a GPU session finds a check that builds and runs on that stack, not only on ours.
#
# The tree is copied to a temporary folder first, so that the build against torch 2.11 never
# touches this checkout's build/ objects.  ADVFAST_STACK_VENV picks the virtual environment
# (default ~/.cache/advfast/venv-gpu-stack), PYTHON312 the interpreter that makes it.
set -euo pipefail

out="${1:?usage: bench/check_gpu_stack.sh OUT}"
root="$(cd "$(dirname "$0")/.." && pwd)"
# the first interpreter that really is Python 3.12 (a pyenv shim may exist and refuse to run)
py312=""
for candidate in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
                 /usr/bin/python3.12; do
  if [ -n "$candidate" ] && "$candidate" -c \
      "import sys; sys.exit(sys.version_info[:2] != (3, 12))" > /dev/null 2>&1; then
    py312="$candidate"; break
  fi
done
[ -n "$py312" ] || { echo "check_gpu_stack: no Python 3.12 found (set PYTHON312)" >&2; exit 2; }
venv="${ADVFAST_STACK_VENV:-$HOME/.cache/advfast/venv-gpu-stack}"
[ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools wheel ninja
"$py" -m pip install -q torch==2.11.0 torchvision==0.26.0 numpy tqdm safetensors scikit-learn \
  matplotlib pyarrow nvidia-ml-py pytest pytest-benchmark scipy pandas
for absent in torchattacks expecttest foolbox adversarial-robustness-toolbox mlxtend; do
  "$py" -m pip uninstall -q -y "$absent" > /dev/null 2>&1 || true
done
"$py" -c "import sys, torch, torchvision; print('stack: python', sys.version.split()[0], \
'torch', torch.__version__, 'torchvision', torchvision.__version__)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# tracked and untracked files that git does not ignore: the tree as it stands, without build/
(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - --) \
  | tar -xf - -C "$work"
mkdir -p "$out"
# the GPU machine's H200 is sm_90: one architecture keeps the build inside its step limit
export TORCH_CUDA_ARCH_LIST=9.0
ADVFAST_CHECK_DEVICE=cpu PYTHON="$py" bash "$work/bench/gpu_check.sh" "$(cd "$out" && pwd)"
