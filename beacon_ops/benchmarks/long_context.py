"""``bench long-context``: attention over a whole long input, beacon prefill vs full causal SDPA.

A beacon prefill of ``L`` tokens (window ``W = 1024``, stride ``W``, ratio ``r``,
step-expansion) runs the attention op once per window: window ``i`` has ``W`` raw queries plus
``B = W / r`` beacon queries over memory ``M = i * B`` (+ the window's raw keys and beacons).
Full attention reads the same input with one ``scaled_dot_product_attention(is_causal=True)``
over all ``L`` tokens (PyTorch's own flash kernel on the CPU). Both are measured side by side
in one run, together with the machine's matmul ceiling (``common.matmul_gflops``).

Useful work is counted exactly: each window's pairs are ``reference.allowed_pairs`` (the spec's
explicit mask) of the window without memory plus ``num_queries * M`` (every row sees the whole
memory), an identity checked against the full reference mask on the input's last window; full
attention has ``L (L + 1) / 2`` pairs; FLOPs are ``4 * head_dim * pairs`` per head. Attention
time only (no projections, no cache writes).

How the times are taken (written into every result so that nobody has to guess):

- beacon: every window of the input is run and timed (once, after one warm-up call of the
  largest window) and the times are summed; where SDPA is measured, this pass runs before and
  after SDPA and the two sums are averaged (``beacon_passes``, ``beacon_pass_spread`` =
  (max - min) / mean shows the machine's noise), so that a change of load during a long SDPA
  call weighs on both sides alike. With ``sample`` set, ``sample`` windows
  spread evenly over the input are timed (median of 3 calls each) and the others are
  interpolated linearly in the window index (a window's work is affine in its index); rows say
  ``windows_timed``.
- full attention: SDPA is run over lengths in increasing order while the previous length
  predicts (by exact pair count) at most ``sdpa_budget_s`` seconds; longer lengths are
  extrapolated from the largest measured one by their exact pair counts
  (``t(L) = t(L_max) * pairs(L) / pairs(L_max)``) and flagged ``sdpa_extrapolated: true``.
  SDPA's GFLOP/s still rise slightly with length, so the extrapolation overstates SDPA's time a
  little: the full run measures SDPA at 128K for fp32 / head_dim 128 as a check and records
  what the extrapolation would have said (``sdpa_extrapolation_would_be_ms``; measured on a
  2-core CPU: 97.1 s extrapolated from 32K vs 92.2 s measured, 5 % high).
- the ratio does not depend on the head count, so the CPU runs use one head (``heads``).

Also one window step vs SDPA with the materialised beacon mask (``attention.measure_step``).
"""
from __future__ import annotations

import functools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ..attention import beacon_attention
from ..reference import allowed_pairs
from .attention import measure_step
from .common import matmul_gflops, sync, time_fn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WINDOW = 1024
MODE = "step-expansion"
KIB = 1024


def window_steps(length: int, window: int, ratio: int) -> list[tuple[int, int, int, int]]:
    """``(mem, raw, beacon, num_queries)`` of every attention step of a beacon prefill.

    Stride = window. Each full window completes with ``window // ratio`` beacons; a trailing
    partial window (``length % window`` tokens) gets none.
    """
    beacons = window // ratio
    steps = [(i * beacons, window, beacons, window + beacons) for i in range(length // window)]
    if length % window:
        rest = length % window
        steps.append((len(steps) * beacons, rest, 0, rest))
    return steps


@functools.lru_cache(maxsize=None)
def step_pairs(mem: int, raw: int, beacon: int, ratio: int, num_queries: int) -> int:
    """Exact allowed (query, key) pairs of one step, per head (the reference mask)."""
    return allowed_pairs([0, num_queries], [mem], [raw], [beacon], [ratio], MODE)


def _fast_step_pairs(mem: int, raw: int, beacon: int, ratio: int, num_queries: int) -> int:
    # Every query row sees the whole memory (attend_previous), so a step's pairs are those of the
    # same step without memory plus num_queries * mem. The dense reference mask of a late window
    # of a 128K input is about 20M cells; this keeps counting cheap. prefill_pairs checks the
    # identity against the reference on the input's last window.
    return step_pairs(0, raw, beacon, ratio, num_queries) + num_queries * mem


def prefill_pairs(length: int, window: int, ratio: int) -> int:
    """Exact allowed pairs, per head, of all windows of a beacon prefill of ``length`` tokens."""
    steps = window_steps(length, window, ratio)
    last = steps[-1]
    if step_pairs(*last[:3], ratio, last[3]) != _fast_step_pairs(*last[:3], ratio, last[3]):
        raise AssertionError(f"pair count of window {last} disagrees with the reference mask")
    return sum(_fast_step_pairs(*s[:3], ratio, s[3]) for s in steps)


def causal_pairs(length: int) -> int:
    """Allowed pairs of full causal attention over ``length`` tokens, per head."""
    return length * (length + 1) // 2


def _lens(device: str, mem: int, raw: int, beacon: int, ratio: int, nq: int):
    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return i32([0, nq]), i32([mem]), i32([raw]), i32([beacon]), i32([ratio])


class Prefill:
    """The attention steps of a beacon prefill of ``length`` tokens, ready to run.

    One K/V buffer sized for the last window serves every step (the op reads only the slots its
    lengths name; the values are random, which costs the same as real ones).
    ``run_step(i)`` runs window ``i`` and returns ``(out, lse)``; ``run_all()`` runs them all.
    """

    def __init__(self, device: str, dtype: torch.dtype, *, length: int, ratio: int, heads: int,
                 head_dim: int, window: int = WINDOW) -> None:
        self.device, self.ratio = device, ratio
        self.steps = window_steps(length, window, ratio)
        cap = max(m + r + b for m, r, b, _ in self.steps)
        g = torch.Generator().manual_seed(0)
        self.k = torch.randn(1, heads, cap, head_dim, generator=g).to(device, dtype)
        self.v = torch.randn(1, heads, cap, head_dim, generator=g).to(device, dtype)
        q_all = torch.randn(max(s[3] for s in self.steps), heads, head_dim, generator=g)
        q_all = q_all.to(device, dtype)
        self.args = [(q_all[:nq], _lens(device, m, r, b, ratio, nq), nq)
                     for m, r, b, nq in self.steps]

    def pairs(self) -> int:
        """Exact allowed pairs of all steps, per head."""
        return sum(_fast_step_pairs(m, r, b, self.ratio, nq) for m, r, b, nq in self.steps)

    def run_step(self, i: int):
        q, lens, nq = self.args[i]
        return beacon_attention(q, self.k, self.v, *lens, max_seqlen_q=nq, mode=MODE)

    def run_all(self) -> None:
        for i in range(len(self.steps)):
            self.run_step(i)


def time_prefill(device: str, dtype: torch.dtype, *, length: int, ratio: int, heads: int,
                 head_dim: int, window: int = WINDOW, sample: int | None = None) -> dict:
    """Summed time of the beacon attention op over all windows of a prefill of ``length``.

    Returns ``beacon_s`` (summed seconds), ``windows`` and ``windows_timed`` (see the module
    docstring for ``sample``).
    """
    pre = Prefill(device, dtype, length=length, ratio=ratio, heads=heads, head_dim=head_dim,
                  window=window)

    def once(i: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        pre.run_step(i)
        sync(device)
        return time.perf_counter() - t0

    n = len(pre.steps)
    pre.run_step(n - 1)  # warm-up (threads, allocator) on the largest window
    if sample is None or sample >= n:
        times = [once(i) for i in range(n)]
        timed = n
    else:
        idx = sorted({round(j * (n - 1) / (sample - 1)) for j in range(sample)})
        measured = {i: statistics.median(once(i) for _ in range(3)) for i in idx}
        times = []
        for i in range(n):
            lo = max(j for j in idx if j <= i)
            hi = min(j for j in idx if j >= i)
            w = 0.0 if hi == lo else (i - lo) / (hi - lo)
            times.append(measured[lo] * (1 - w) + measured[hi] * w)
        timed = len(idx)
    return {"beacon_s": sum(times), "windows": n, "windows_timed": timed}


def sdpa_inputs(device: str, dtype: torch.dtype, *, length: int, heads: int, head_dim: int):
    """Random ``q, k, v`` of shape ``[1, heads, length, head_dim]`` for full causal SDPA."""
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, heads, length, head_dim, generator=g).to(device, dtype)
                 for _ in range(3))


def time_sdpa(device: str, dtype: torch.dtype, *, length: int, heads: int, head_dim: int) -> float:
    """Seconds of one ``scaled_dot_product_attention(is_causal=True)`` over ``length`` tokens.

    Short runs (< 0.2 s) are repeated and the median taken; long ones are timed once after no
    warm-up of their own (the caller has warmed SDPA up on a shorter length).
    """
    q, k, v = sdpa_inputs(device, dtype, length=length, heads=heads, head_dim=head_dim)
    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if first > 0.2:
        return first
    return time_fn(fn, device, min_time=0.5, max_reps=20, warmup=0)


def _log(msg: str) -> None:
    print(f"[long-context {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(device: str, dtype_name: str, head_dim: int, lengths: list[int], ratios: list[int],
            *, heads: int, sdpa_budget_s: float, sample_above: int | None, sample: int,
            matmul: float, force_sdpa: set[int] | frozenset = frozenset()) -> list[dict]:
    """Rows for one dtype and head dim: every length x ratio, SDPA per length (shared)."""
    dtype = DTYPES[dtype_name]
    rows = []
    sdpa_measured: tuple[int, float] | None = None  # (largest measured length, its seconds)
    time_sdpa(device, dtype, length=2048, heads=heads, head_dim=head_dim)  # warm-up
    for length in lengths:
        pairs_full = causal_pairs(length)
        predicted = (sdpa_measured[1] * pairs_full / causal_pairs(sdpa_measured[0])
                     if sdpa_measured else 0.0)
        samp = sample if sample_above is not None and length > sample_above else None

        def beacon_pass() -> list[dict]:
            return [time_prefill(device, dtype, length=length, ratio=ratio, heads=heads,
                                 head_dim=head_dim, sample=samp) for ratio in ratios]

        t_start = time.perf_counter()
        before = beacon_pass()
        check = None  # what extrapolation would have said, for a forced measurement
        if predicted <= sdpa_budget_s or length in force_sdpa:
            t_sdpa = time_sdpa(device, dtype, length=length, heads=heads, head_dim=head_dim)
            if predicted > sdpa_budget_s:
                check = predicted
            sdpa_measured = (length, t_sdpa)
            extrapolated = False
            # Sandwich: the beacon passes before and after SDPA are averaged, so that a change
            # of the machine's load during the (long) SDPA call weighs on both sides alike.
            after = beacon_pass()
        else:
            t_sdpa = predicted
            extrapolated = True
            after = None
        _log(f"{dtype_name} d{head_dim} L={length}: sdpa {t_sdpa:.2f} s"
             f"{' (extrapolated)' if extrapolated else ''}, beacon "
             + ", ".join(f"r{r} {b['beacon_s']:.2f} s" for r, b in zip(ratios, before))
             + f" [{time.perf_counter() - t_start:.0f} s]")
        gf = 4 * head_dim * heads / 1e9
        for i, ratio in enumerate(ratios):
            res = before[i]
            pairs_beacon = prefill_pairs(length, WINDOW, ratio)
            passes = [res["beacon_s"]] + ([after[i]["beacon_s"]] if after else [])
            t_b = sum(passes) / len(passes)
            rows.append({
                "dtype": dtype_name, "head_dim": head_dim, "heads": heads, "context": length,
                "ratio": ratio, "windows": res["windows"], "windows_timed": res["windows_timed"],
                "beacon_pairs": pairs_beacon, "beacon_ms": t_b * 1e3,
                "beacon_gflops": gf * pairs_beacon / t_b,
                "sdpa_pairs": pairs_full, "sdpa_ms": t_sdpa * 1e3,
                "sdpa_gflops": gf * pairs_full / t_sdpa,
                "sdpa_extrapolated": extrapolated,
                "beacon_passes": len(passes),
                "beacon_pass_spread": (max(passes) - min(passes)) / t_b,
                "speedup": t_sdpa / t_b,
                "ideal_speedup": pairs_full / pairs_beacon,
                "beacon_vs_matmul": gf * pairs_beacon / t_b / matmul,
                "sdpa_vs_matmul": gf * pairs_full / t_sdpa / matmul,
            })
            if check is not None:  # measured although the budget said extrapolate
                rows[-1]["sdpa_extrapolation_would_be_ms"] = check * 1e3
    return rows


def run(device: str, quick: bool) -> dict:
    """Beacon prefill attention vs SDPA full causal over 4K..128K (quick: 4K..16K, one head dim)."""
    cpu = device == "cpu"
    heads = 1 if cpu else 16
    if quick:
        lengths = [4 * KIB, 8 * KIB, 16 * KIB]
        head_dims, dtypes = [128], ["fp32", "bf16"]
        budget, sample_above, sample = 5.0, None, 0
    else:
        lengths = [4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB]
        head_dims, dtypes = [64, 128], ["fp32", "bf16"]
        budget, sample_above, sample = (12.0 if cpu else 60.0), None, 0
    ratios = [8, 32, 128]
    rows, matmul = [], {}
    for dtype_name in dtypes:
        matmul[dtype_name] = matmul_gflops(device, 1024, DTYPES[dtype_name])
        for d in head_dims:
            # The headline (fp32, head_dim 128) measures SDPA at the longest length too, and
            # records what the extrapolation would have given (a check of the method).
            force = {lengths[-1]} if (dtype_name, d) == ("fp32", 128) and not quick else set()
            rows += measure(device, dtype_name, d, lengths, ratios, heads=heads,
                            sdpa_budget_s=budget, sample_above=sample_above, sample=sample,
                            matmul=matmul[dtype_name], force_sdpa=force)
    # One window step vs SDPA with the materialised beacon mask: the last window of the largest
    # input (r = 32), fp32 and bf16, head_dim 128.
    steps = []
    W, r = WINDOW, 32
    mem = (lengths[-1] // W - 1) * (W // r)
    for dtype_name in dtypes:
        row = measure_step(device, DTYPES[dtype_name], heads=heads, kv_heads=heads, d=128,
                           mem=mem, raw=W, beacon=W // r, ratio=r, nq=W + W // r)
        row["context"] = lengths[-1]
        row["ratio"] = r
        steps.append(row)
    longest = [x for x in rows if x["context"] == lengths[-1] and x["ratio"] == 32]
    target = {f"{x['dtype']}/d{x['head_dim']}": round(x["speedup"], 2) for x in longest}
    return {
        "rows": rows,
        "window_step_vs_masked_sdpa": steps,
        "matmul_gflops": matmul,
        f"speedup_r32_{lengths[-1] // KIB}k": target,
        "target": "speedup (SDPA full causal / summed beacon windows) >= 20 at 128K, r = 32 "
                  "(ideal = pair ratio)",
        "config": {"window": WINDOW, "stride": WINDOW, "mode": MODE, "heads": heads,
                   "kv_heads": heads, "lengths": lengths, "ratios": ratios,
                   "sdpa_budget_s": budget,
                   "beacon_timing": "every window timed once and summed; mean of the passes "
                                    "before and after SDPA where SDPA is measured"
                   if sample_above is None
                   else f"{sample} windows timed above {sample_above} tokens, rest interpolated",
                   "sdpa_extrapolation": "t(L) = t(L_max measured) * pairs(L) / pairs(L_max)",
                   "flops": "4 * head_dim * exact allowed pairs * heads"},
    }


def plot(res: dict, out_dir: str) -> list[str]:
    """PNG: summed attention time vs context, beacon (per ratio) vs full causal SDPA."""
    from .plots import attention_time_plot

    return attention_time_plot(res["rows"], out_dir)
