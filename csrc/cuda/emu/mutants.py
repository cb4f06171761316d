"""Shows that the CUDA host emulation catches kernel bugs: injects each known bug below, one at
a time, into a scratch copy of the repository and checks that ``make test-cuda-emu`` fails (or
``make test-cuda-emu-sanitize``, the ASan + UBSan build, for a bug only a sanitizer can see).
Not run by CI (each mutant rebuilds part of _cuda_emu and runs the emulated suite).

    python csrc/cuda/emu/mutants.py [--venv PATH] [--quick] [--only NAME ...] [--keep DIR]
                                    [--no-baseline] [--timeout SECONDS]

--quick builds only the (head dim 64, bf16) instantiations and runs each mutant's suite on the
tests of the kernel it touches (-k) instead of the whole of test_cuda.py (or of the sanitizer
target's subset). Prints a Markdown table: mutant, where, caught or MISSED, the first failure.
Exit status 1 if a mutant was missed or the unmutated copy fails.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

# name, file, original text, mutated text, what the bug is, -k expression for --quick[, make target]
PLAIN, SANITIZED = "test-cuda-emu", "test-cuda-emu-sanitize"
MUTANTS = [
    ("no-barrier-after-wait", "csrc/cuda/attention_fwd.cuh",
     "    __syncthreads();     // ... and everyone else's\n", "\n",
     "removed __syncthreads after cp.async.wait_group (K/V tile read before other threads' copies land)",
     "prefill_against and bf16 and 64"),
    ("wait-group-off-by-one", "csrc/cuda/attention_fwd.cuh",
     "cp_async_wait<1>();  // this thread's", "cp_async_wait<2>();  // this thread's",
     "cp.async.wait_group 2 instead of 1 (the current tile may still be in flight)",
     "prefill_against and bf16 and 64"),
    ("ldmatrix-lane-map", "csrc/cuda/attention_fwd.cuh",
     "ldmatrix_x4(a, sQ + Kt::smem_offset(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, 2 * ks + (lane >> 4)));",
     "ldmatrix_x4(a, sQ + Kt::smem_offset(warp * 16 + (lane & 7) + (lane >> 4) * 8, 2 * ks + ((lane >> 3) & 1)));",
     "Q fragment: ldmatrix row/column lane map swapped",
     "prefill_against and bf16 and 64"),
    ("ldmatrix-missing-trans", "csrc/cuda/attention_fwd.cuh",
     "ldmatrix_x4_trans(bv, cV", "ldmatrix_x4(bv, cV",
     "V fragment loaded without .trans",
     "prefill_against and bf16 and 64"),
    ("pack-halves-swapped", "csrc/cuda/ptx.h",
     "__nv_bfloat162 v = __floats2bfloat162_rn(x, y);", "__nv_bfloat162 v = __floats2bfloat162_rn(y, x);",
     "pack2: the two bf16 halves of a register swapped",
     "prefill_against and bf16 and 64"),
    ("shuffle-distance", "csrc/cuda/attention_fwd.cuh",
     "row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 2);",
     "row_sum[i] += __shfl_xor_sync(0xffffffffu, row_sum[i], 4);",
     "row-sum quad reduction shuffles with lane distance 4 instead of 2",
     "prefill_against and bf16 and 64"),
    ("stale-slot-read", "csrc/cuda/attention_fwd.cuh",
     "const bool ok = key < nk;", "const bool ok = key < p.capacity;",
     "K/V tiles loaded up to the capacity: stale (NaN) cache slots reach the MMA",
     "prefill_against and bf16 and 64"),
    ("mma-b-fragments-swapped", "csrc/cuda/attention_fwd.cuh",
     "mma_16816<T>(s[2 * np], a, bk[0], bk[1]);", "mma_16816<T>(s[2 * np], a, bk[1], bk[0]);",
     "S = Q K^T: the two B registers of an MMA swapped",
     "prefill_against and bf16 and 64"),
    ("compaction-shift-race", "csrc/cuda/cache_kernels.cuh",
     "      }\n      __syncthreads();\n    }\n", "      }\n    }\n",
     "compact_: no barrier between the rounds of the overlapping carried-raw shift",
     "compact"),
    ("out-of-bounds-store", "csrc/cuda/attention_generic.cu",
     "    if (e < D) store_f(o + e, acc[i] * inv);", "    store_f(o + e, acc[i] * inv);",
     "simple path: lanes store past head_dim (into the next rows / past the tensor)",
     "simple_path or other_head_dims"),
    ("combine-shuffle-distance", "csrc/cuda/decode_splitkv.cuh",
     "for (int off = 16; off > 0; off >>= 1) max_lse", "for (int off = 8; off > 0; off >>= 1) max_lse",
     "split-KV combine: max reduction misses half the warp (splits past lane 16 ignored)",
     "decode and bf16 and 64"),
    ("bwd-boundary-mask-dropped", "csrc/cuda/attention_bwd_mma.cuh",
     "        if (partial) {\n          const int* sp = cSpans", "        if (false) {\n          const int* sp = cSpans",
     "backward dK/dV: boundary tiles not masked (keys a row does not see get probability mass)",
     "low_precision and bf16 and 64"),
    ("bwd-no-barrier-after-wait", "csrc/cuda/attention_bwd_mma.cuh",
     "    __syncthreads();     // ... and everyone's, with the rows' LSE, delta and spans\n", "\n",
     "backward dK/dV: no __syncthreads after cp.async.wait_group (row tile read before other threads' copies land)",
     "low_precision and bf16 and 64"),
    ("bwd-ds-without-delta", "csrc/cuda/attention_bwd_mma.cuh",
     "dp[nt][j] = prob * (dp[nt][j] - dlt[j / 2]);  // dS", "dp[nt][j] = prob * dp[nt][j];  // dS",
     "backward dQ: dS = P dP without subtracting delta = rowsum(dout * out)",
     "low_precision and bf16 and 64"),
    ("out-of-bounds-read", "csrc/cuda/cache_kernels.cuh",
     "    const int p = pos[t];\n",
     "    const int p = pos[t], p_next = *static_cast<const volatile int*>(pos + t + 1);\n    (void)p_next;\n",
     "rope_: reads the next token's position, past the positions tensor for the last token (results unchanged)",
     "rope and bfloat16", SANITIZED),
]


def run(cmd: list[str], cwd: str, timeout: int) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
        return p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        return 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")


def first_failure(log: str) -> str:
    for pat in (r"ERROR: AddressSanitizer: [^\n]*", r"runtime error: [^\n]*", r"cuda emulation: [^\n]*",
                r"^E\s+(AssertionError[^\n]*|assert [^\n]*)", r"^FAILED [^\n]*", r"error: [^\n]*"):
        m = re.search(pat, log, re.M)
        if m:
            return m.group(0).strip()[:160]
    return log.strip().splitlines()[-1][:160] if log.strip() else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=os.path.join(ROOT, ".venv"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--keep", default=None, help="scratch directory to use and keep")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per make run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    args = ap.parse_args()

    scratch = args.keep or tempfile.mkdtemp(prefix="beacon_mutants_")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, stdout=subprocess.PIPE,
                           text=True, check=True).stdout.split()
    for f in files:
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(scratch, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(scratch, f))
    cmake_args = "-DBEACON_OPS_CUDA=0"
    if args.quick:  # only the (64, bf16) instantiations: the quick cases use no other
        cmake_args += " -DBEACON_OPS_HEADDIMS=64 -DBEACON_OPS_DTYPES=bf16"
    chosen = [m if len(m) == 7 else m + (PLAIN,) for m in MUTANTS if args.only is None or m[0] in args.only]

    def suite(target: str, k: str | None) -> list[str]:
        make = ["make", target, f"VENV={os.path.abspath(args.venv)}", "JOBS=2", f"CMAKE_ARGS={cmake_args}"]
        if target == SANITIZED:  # its own subset of the cases, narrowed by -k with --quick
            return make + ([f"EMU_SAN_K={k}"] if k else [])
        extra = "-x -p no:cacheprovider" + (f" -k '{k}'" if k else "")
        return make + [f"PYTEST_ARGS={extra}"]

    for target in sorted({m[6] for m in chosen}):
        every_k = " or ".join(sorted({f"({m[5]})" for m in chosen if m[6] == target}))
        rc, log = (0, "") if args.no_baseline else run(suite(target, every_k if args.quick else None), scratch,
                                                          args.timeout)
        if rc != 0:
            print(f"the unmutated copy fails {target} (rc {rc}): {first_failure(log)}", file=sys.stderr)
            print(log[-3000:], file=sys.stderr)
            return 1
    rows, missed = [], 0
    for name, path, old, new, what, k, target in chosen:
        full = os.path.join(scratch, path)
        text = open(full).read()
        if text.count(old) != 1:
            rows.append((name, path, "NOT APPLIED", f"the original text occurs {text.count(old)} times"))
            missed += 1
            continue
        open(full, "w").write(text.replace(old, new))
        t0 = time.time()
        rc, log = run(suite(target, k if args.quick else None), scratch, args.timeout)
        open(full, "w").write(text)
        caught = rc not in (0, 124)  # a timeout is not a catch: the emulation reports deadlocks
        missed += not caught
        rows.append((name, path, f"caught ({time.time() - t0:.0f} s)" if caught else f"MISSED (rc {rc})",
                     f"{what}: {first_failure(log)}"))
        print(f"{name}: {rows[-1][2]}", file=sys.stderr, flush=True)  # progress
    print("| mutant | file | result | bug: first failure |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(x.replace("|", "/") for x in r) + " |")
    if args.keep is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
