#!/usr/bin/env bash
# One-shot check of beacon_ops on a GPU machine (H100/H200; sm_80+): build from source, run the
# test suite with CUDA, compute-sanitizer memcheck + racecheck on small attention / compaction
# calls, and the CUDA benchmarks. Logs and JSON go to $OUT (default ./gpu_out), at most 8 files:
#   gpu_check.log            every step's output, with a PASS/FAIL/SKIP line per step
#   summary.json             step -> status and seconds
#   sanitizer.log            compute-sanitizer output (memcheck, racecheck)
#   bench_attention.json, bench_decode.json, bench_compaction.json   (python -m beacon_ops bench)
#   bench_cuda_attention.json   prefill TFLOP/s vs SDPA flash, decode bytes/s vs a copy
# Designed to finish in under 8 minutes (every step runs under `timeout`).
#
# The GPU machine has its own Python (3.12) + torch (2.11, cu130), nvcc, cmake, ninja, pytest
# and no internet. What it lacks travels in the git-ignored folder .whl/ (fill it here with
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform any -d .whl pybind11 \
#     hypothesis sortedcontainers attrs pytest-benchmark py-cpuinfo expecttest
# ): the wheels whose module the machine cannot import are installed into /tmp/site. The
# optional CUTLASS headers (no kernel needs them) are used when an nvidia-cutlass wheel is there
# too: CUTLASS_DIR then points at /tmp/site/cutlass_library/source.
#
# On the GPU machine:  bash bench/gpu_check.sh   (with the .whl/ folder next to the checkout;
#   the files under $OUT are the results).
# Here, without a GPU:  bash bench/gpu_check.sh --no-gpu   (wheels, build, import, test
#   collection; the GPU steps are reported as SKIP).
set -u -o pipefail

NO_GPU=0
for arg in "$@"; do
  case "$arg" in
    --no-gpu) NO_GPU=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
SAN="$OUT/sanitizer.log"
: > "$LOG"
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
BUILD_DIR="${BUILD_DIR:-build/gpu}"
JOBS="${JOBS:-$(nproc)}"
T0=$(date +%s)
DEADLINE="${DEADLINE:-465}"  # seconds for the whole script (an 8-minute budget)
declare -a SUMMARY=()
FAILED=0

log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S CMD...: run with a timeout, output into the log, record status.
step() {
  local name="$1" limit="$2"; shift 2
  local t=$(date +%s) rc
  local left=$((DEADLINE - (t - T0)))
  if [ $left -lt 20 ]; then skip "$name" "out of time (${DEADLINE}s budget)"; return 1; fi
  if [ $limit -gt $left ]; then limit=$left; fi
  log "== $name (timeout ${limit}s): $*"
  if declare -F "$1" > /dev/null; then  # a function of this script: run it in a child bash
    timeout --kill-after=10 "$limit" bash -c "$*" >> "$LOG" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  fi
  rc=$?
  local dt=$(($(date +%s) - t)) status=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status=FAIL; fi
  log "-- $name: $status (rc=$rc, ${dt}s)"
  if [ "$status" != PASS ]; then FAILED=1; fi
  SUMMARY+=("\"$name\": {\"status\": \"$status\", \"rc\": $rc, \"seconds\": $dt}")
  return $rc
}
skip() { log "-- $1: SKIP ($2)"; SUMMARY+=("\"$1\": {\"status\": \"SKIP\", \"reason\": \"$2\"}"); }

write_summary() {
  { echo "{"; local i n=${#SUMMARY[@]}
    for ((i = 0; i < n; i++)); do
      if [ $i -lt $((n - 1)) ]; then echo "  ${SUMMARY[$i]},"; else echo "  ${SUMMARY[$i]}"; fi
    done
    echo "}"; } > "$OUT/summary.json"
  log "total $(($(date +%s) - T0))s; summary in $OUT/summary.json"
}
trap write_summary EXIT

# ---------------------------------------------------------------------------------------------
# 1. Machine and wheels.
{
  echo "host: $(hostname)  date: $(date -u)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -2 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} >> "$LOG" 2>&1

install_wheels() {
  mkdir -p "$SITE"
  shopt -s nullglob
  local whl mod
  for whl in .whl/*.whl; do
    case "$(basename "$whl")" in
      nvidia_cutlass-*) mod="" ;;  # optional headers: always, when present
      pybind11-*) mod=pybind11 ;;
      hypothesis-*) mod=hypothesis ;;
      sortedcontainers-*) mod=sortedcontainers ;;
      attrs-*) mod=attrs ;;
      pytest_benchmark-*) mod=pytest_benchmark ;;
      py_cpuinfo-*) mod=cpuinfo ;;
      expecttest-*) mod=expecttest ;;
      *) mod="" ;;
    esac
    if [ -n "$mod" ] && "$PY" -c "import $mod" 2>/dev/null; then
      echo "have $mod; not installing $(basename "$whl")"
      continue
    fi
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$whl" || return 1
  done
}
export -f install_wheels
export PY SITE
if ls .whl/*.whl > /dev/null 2>&1; then
  step wheels 120 install_wheels
else
  skip wheels "no .whl folder: using installed packages"
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$SITE/cutlass_library/source/include/cute" ]; then
  export CUTLASS_DIR="$SITE/cutlass_library/source"
fi

# ---------------------------------------------------------------------------------------------
# 2. Build (in place, all cores; default archs 8.0;9.0+PTX unless BEACON_OPS_CUDA_ARCHS is set).
PYBIND_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())' 2>/dev/null || true)"
build() {
  rm -f beacon_ops/_C*.so beacon_ops/_build.json
  $CMAKE -S . -B "$BUILD_DIR" -G Ninja -DBEACON_OPS_INPLACE=ON -DBEACON_OPS_CUDA=1 \
    -DBEACON_OPS_PTXAS_VERBOSE=ON -DPython_EXECUTABLE="$(command -v "$PY")" \
    ${PYBIND_DIR:+-Dpybind11_DIR="$PYBIND_DIR"} ${CMAKE_ARGS:-} &&
  $CMAKE --build "$BUILD_DIR" -j "$JOBS" &&
  "$PY" -m beacon_ops info
}
export -f build
# CMake: the pip one of this Python if it has it, else the system's (>= 3.24).
if "$PY" -m cmake --version > /dev/null 2>&1; then CMAKE="$PY -m cmake"; else CMAKE=cmake; fi
export BUILD_DIR JOBS PYBIND_DIR CMAKE CMAKE_ARGS="${CMAKE_ARGS:-}"
if [ "$NO_GPU" = 1 ] && [ -n "${SKIP_BUILD:-}" ]; then
  skip build "SKIP_BUILD set"
else
  step build 240 build || { log "build failed: stopping"; exit 1; }
fi

# ---------------------------------------------------------------------------------------------
# 3. Tests.
export BEACON_OPS_EXPECT_CUDA=1
if [ "$NO_GPU" = 1 ]; then
  unset BEACON_OPS_EXPECT_CUDA
  step collect 120 "$PY" -m pytest python_tests -q -p no:cacheprovider --collect-only
else
  step test_cuda 150 "$PY" -m pytest python_tests/test_cuda.py -q -p no:cacheprovider -rs
  # The CUDA backward: its kernel tests, and autograd through the op on CUDA tensors.
  step test_cuda_backward 90 "$PY" -m pytest python_tests/test_cuda_backward.py \
    python_tests/test_attention_backward.py -q -p no:cacheprovider -rs -k cuda
  step test_suite 100 "$PY" -m pytest python_tests -q -p no:cacheprovider -x -rs \
    --ignore=python_tests/test_cuda.py --ignore=python_tests/test_cuda_backward.py
fi

# ---------------------------------------------------------------------------------------------
# 4. compute-sanitizer on a small attention (prefill + decode) and a compaction call.
if [ "$NO_GPU" = 1 ]; then
  skip sanitizer "--no-gpu"
elif ! command -v compute-sanitizer > /dev/null; then
  skip sanitizer "compute-sanitizer not found"
else
  : > "$SAN"
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" 90 bash -c "compute-sanitizer --tool $tool --print-limit 20 --error-exitcode 3 \
      '$PY' bench/sanitizer_case.py >> '$SAN' 2>&1; rc=\$?; tail -3 '$SAN'; exit \$rc"
  done
fi

# ---------------------------------------------------------------------------------------------
# 5. Benchmarks (side by side in one run each).
if [ "$NO_GPU" = 1 ]; then
  skip benchmarks "--no-gpu"
else
  step bench_cuda_attention 75 "$PY" -m beacon_ops.benchmarks.cuda_attention ${BENCH_QUICK:+--quick} \
    --json "$OUT/bench_cuda_attention.json"
  for kind in attention decode compaction; do
    if "$PY" -c "import beacon_ops.benchmarks.$kind" 2>/dev/null; then
      step "bench_$kind" 50 "$PY" -m beacon_ops bench "$kind" --device cuda ${BENCH_QUICK:+--quick} \
        --json "$OUT/bench_$kind.json"
    else
      skip "bench_$kind" "beacon_ops.benchmarks.$kind does not exist"
    fi
  done
fi
exit $FAILED  # 1 when any step failed or timed out (see summary.json)
