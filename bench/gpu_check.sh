#!/usr/bin/env bash
# bench/gpu_check.sh OUT
#
# Everything advfast checks on a GPU, as one command, for the day a GPU machine is lent: on a
# bare Linux machine with an NVIDIA GPU, its own preinstalled PyTorch (it may be older than our
# pin and have no package registry), nvcc and pytest, it
#   1. builds advfast in place for the visible GPU's architecture only (fast),
#   2. runs every CUDA test (opcheck on CUDA and the CPU-vs-CUDA comparisons among them),
#   3. runs the benchmarks on CUDA: advfast bench (ResNet-50 at 3x224x224, bf16, channels_last,
#      batches 64 and 256, eager; the digits default, eager and CUDA graphs), the kernels
#      (bench_ops.py's shapes), the three attacks against their peers, dataset generation,
#   4. captures an Nsight Systems profile if nsys is on the PATH,
# and writes every log and a summary.json into OUT.  Budget: under 8 minutes on an H200, by
# construction (the step limits below add up to 475 s).  bench/check_gpu_stack.sh runs the CPU
# mode on the GPU machine's own software stack.
#
# ADVFAST_CHECK_DEVICE=cpu runs the same steps on the CPU at tiny sizes (CI does, so this
# script never rots); its tests are the CPU halves of those and pack_weights' (torch's oneDNN
# ops it calls, on the stack check's older torch too).  PYTHON picks the interpreter (default python3).
set -uo pipefail

out="${1:?usage: bench/gpu_check.sh OUT}"
mode="${ADVFAST_CHECK_DEVICE:-cuda}"
py="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary="$out/steps.jsonl"
: > "$summary"
failed=0

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with a time limit, logs to OUT/NAME.log.
step() {
  local name="$1" limit="$2"; shift 2
  local start rc
  start=$(date +%s)
  echo "== $name: $*" | tee "$out/$name.log"
  timeout "$limit" "$@" >> "$out/$name.log" 2>&1
  rc=$?
  local seconds=$(( $(date +%s) - start ))
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $seconds}" >> "$summary"
  echo "   rc=$rc in ${seconds}s"
  [ "$rc" -eq 0 ] || failed=1
  tail -n 3 "$out/$name.log"
}

# Step limits in seconds.  CUDA mode (16 cores and an H200): they add up to 475 s, so the whole
# check stays under 8 minutes by construction.  CPU mode (2 cores, the whole build from
# scratch, tiny sizes): generous, it runs in CI; the build took 272 s on a quiet machine and
# ran past 420 s in a rehearsal where the whole CI ran 1.6x slower, hence 900.
declare -A limit
if [ "$mode" = "cuda" ]; then
  limit=([environment]=15 [build]=120 [backend]=15 [tests]=80 [bench_resnet50]=70 [bench_ops]=30
         [bench_digits]=60 [bench_attacks]=30 [bench_generate]=20 [bench_precision]=15 [nsys]=20)
else
  limit=([environment]=60 [build]=900 [backend]=60 [tests]=300 [bench_resnet50]=240 [bench_ops]=120
         [bench_digits]=120 [bench_attacks]=240 [bench_generate]=120 [bench_precision]=180 [nsys]=60)
fi

if [ "$mode" = "cuda" ]; then
  if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA GPU visible to $py; use ADVFAST_CHECK_DEVICE=cpu for the CPU mode" >&2
    exit 2
  fi
  arch="$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
  export TORCH_CUDA_ARCH_LIST="$arch" ADVFAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
  dev=cuda; tiny=(); test_args=(-m cuda)
  # ResNet-50 eager (bf16, channels_last); CUDA graphs where launches dominate: the digits
  bench_args=(--model resnet50 --input-size 3,224,224 --batch-size 64 256 --amp bf16
              --channels-last --compile none --iterations 10 --repeats 3)
  digits_args=(--batch-size 256 1024 --compile none reduce-overhead --iterations 20 --repeats 3)
else
  dev=cpu; tiny=(--tiny); test_args=(-k "opcheck or cpu_and_cuda or packed_weights")
  bench_args=(--model resnet18 --input-size 3,32,32 --batch-size 2 --iterations 2 --repeats 1)
  digits_args=(--batch-size 8 --iterations 2 --repeats 1)
fi

step environment "${limit[environment]}" bash -c "nvidia-smi || true; $py -c 'import torch, sys; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available()); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\")'; \
command -v nvcc && nvcc --version; command -v nsys || echo 'nsys: not on PATH'"
step build "${limit[build]}" "$py" setup.py build_ext --inplace
step backend "${limit[backend]}" "$py" -c "import advfast.ops as o, sys; b = o.backend(); print(b); \
sys.exit(b != ('cpu+cuda' if '$mode' == 'cuda' else b))"
step tests "${limit[tests]}" "$py" -m pytest -q -p no:cacheprovider "${test_args[@]}" tests
# Most wanted first: a step that runs out of time does not stop the ones after it.
step bench_resnet50 "${limit[bench_resnet50]}" "$py" -m advfast bench --device "$dev" "${bench_args[@]}" --quiet \
  --peers torchattacks --json "$out/bench_resnet50.json"
step bench_ops "${limit[bench_ops]}" "$py" bench/bench_ops.py --device "$dev" --min-run-time 0.2 --skip-compile \
  "${tiny[@]}" --json "$out/bench_ops.json"
step bench_digits "${limit[bench_digits]}" "$py" -m advfast bench --device "$dev" "${digits_args[@]}" --quiet \
  --peers torchattacks --json "$out/bench_digits.json"
step bench_attacks "${limit[bench_attacks]}" "$py" bench/bench_attacks.py --device "$dev" --tiny \
  --json "$out/bench_attacks.json"
step bench_generate "${limit[bench_generate]}" "$py" bench/bench_generate.py --device "$dev" "${tiny[@]}" \
  --json "$out/bench_generate.json"
step bench_precision "${limit[bench_precision]}" "$py" bench/bench_precision.py --device "$dev" --tiny \
  --json "$out/bench_precision.json"
if command -v nsys > /dev/null; then
  step nsys "${limit[nsys]}" nsys profile -t cuda,nvtx -o "$out/attack" --force-overwrite true \
    "$py" -m advfast attack --device "$dev" --n 64 --iterations 20 --stop never --quiet \
    --out "$out/nsys-attack"
fi

"$py" - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
summary = {"steps": [json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))]}
for name in ("bench_ops", "bench_resnet50", "bench_digits", "bench_attacks", "bench_generate",
             "bench_precision"):
    path = os.path.join(out, name + ".json")
    if os.path.exists(path):
        summary[name] = json.load(open(path))
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print("summary:", ", ".join(f"{s['step']}={s['rc']} ({s['seconds']}s)" for s in summary["steps"]))
EOF
exit "$failed"
