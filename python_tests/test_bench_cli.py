"""The bench command's argument parsing and table printing (no benchmark is run)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from beacon_ops.benchmarks.common import print_table, print_value


def test_threads_list_and_bad_values():
    for bad in ("0", "2,x", ""):
        res = subprocess.run([sys.executable, "-m", "beacon_ops", "bench", "attention",
                              "--threads", bad], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res
        assert "--threads" in res.stderr


def test_table_uses_short_headers_in_order(capsys):
    rows = [{"step": "prefill", "dtype": "fp32", "op_ms": 12.345, "pairs": 7},
            {"step": "decode", "dtype": "bf16", "op_gbps": 3.5}]
    print_table(rows, {"step": "step", "dtype": "dtype", "op_ms": "op ms", "op_gbps": "op GB/s"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "dtype", "op", "ms", "op", "GB/s"]
    assert lines[1].split() == ["prefill", "fp32", "12.35"]
    assert lines[2].split() == ["decode", "bf16", "3.5"]
    assert "pairs" not in "\n".join(lines)


def test_summary_of_dicts_is_a_table(capsys):
    print_value("summary", {"prefill_vs_matmul": {"fp32 1thr": 0.81234, "bf16 1thr": 0.7}})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "summary:"
    assert out[1].split() == ["fp32", "1thr", "bf16", "1thr"]
    assert out[2].split() == ["prefill_vs_matmul", "0.8123", "0.7"]


def test_attention_bench_has_an_interleaved_causal_row(monkeypatch):
    """`bench attention` measures, beside the appended step-expansion window, the same window
    with its beacons interleaved (the condensed cache's layout: W + W/r raw entries, no appended
    beacons, mask kind causal), with the same peers; its ratios join the summary."""
    from beacon_ops.benchmarks import attention

    calls = []

    def fake_step(device, dtype, **kw):  # records the calls instead of timing them
        calls.append(kw)
        nq = kw["nq"]
        return {"step": kw.get("step") or ("prefill" if nq > 1 else "decode"), "mode": kw.get("mode"),
                "dtype": str(dtype).split(".")[-1], "q": nq, "keys": kw["mem"] + kw["raw"] + kw["beacon"],
                "vs_matmul": 1.0, "vs_sdpa_causal": 1.0, "speedup_vs_sdpa_masked": 1.0, "speedup_vs_flex": 1.0,
                "vs_copy": 1.0, "speedup_vs_sdpa": 1.0}

    monkeypatch.setattr(attention, "measure_step", fake_step)
    res = attention.run("cpu", True, threads=[1])
    steps = {(r["step"], r["dtype"]) for r in res["rows"]}
    for dtype in ("fp32", "bf16"):
        assert {("prefill", dtype), ("prefill-interleaved", dtype), ("decode", dtype)} <= steps
    appended = [c for c in calls if c.get("step") is None and c["nq"] > 1]
    interleaved = [c for c in calls if c.get("step") == "prefill-interleaved"]
    assert len(interleaved) == 2 and appended
    a, i = appended[0], interleaved[0]
    assert i["mode"] == "causal" and i["beacon"] == 0 and i["raw"] == a["raw"] + a["beacon"]
    assert i["nq"] == a["nq"] and i["mem"] == a["mem"] and i["flex"] and i["ceiling"]
    assert set(res["summary"]["prefill_interleaved_speedup_vs_sdpa_masked"]) == {"fp32 1thr", "bf16 1thr"}


def test_attention_bench_decodes_at_several_key_counts(monkeypatch):
    """`bench attention` measures decode at 3,584 and 32,768 keys (quick) and 102,400 too (full),
    one query over the raw 512 after memory, each against the copy; the summary names the
    headline's ratio as before and the longer ones by their key count."""
    from beacon_ops.benchmarks import attention

    def fake_step(device, dtype, **kw):
        nq = kw["nq"]
        keys = kw["mem"] + kw["raw"] + kw["beacon"]
        return {"step": kw.get("step") or ("prefill" if nq > 1 else "decode"), "dtype": str(dtype).split(".")[-1],
                "q": nq, "keys": keys, "vs_copy": keys / 1e6, "speedup_vs_sdpa": 2.0, "raw": kw["raw"]}

    monkeypatch.setattr(attention, "measure_step", fake_step)
    for quick, keys in ((True, [3584, 32768]), (False, [3584, 32768, 102400])):
        res = attention.run("cpu", quick, threads=[1])
        decode = [r for r in res["rows"] if r["step"] == "decode"]
        assert sorted({r["keys"] for r in decode}) == keys and {r["raw"] for r in decode} == {512}
        assert res["config"]["decode_keys"] == keys
        names = ["decode_vs_copy", "decode_vs_copy_32k", "decode_vs_copy_100k"][:len(keys)]
        for name, n in zip(names, keys):
            assert res["summary"][name] == {"fp32 1thr": n / 1e6, "bf16 1thr": n / 1e6}
        assert ("decode_vs_copy_100k" in res["summary"]) == (not quick)


def test_interleaved_causal_step_is_measured_against_its_peers():
    """A real (tiny) measurement of the interleaved-causal step: the op against SDPA with the
    materialised causal mask, the causal SDPA and the matmul ceiling; the useful work is the
    causal pair count (memory + the entries up to each query's own)."""
    import torch

    from beacon_ops.benchmarks.attention import COLUMNS, measure_step

    mem, entries = 16, 18
    row = measure_step("cpu", torch.float32, heads=2, kv_heads=1, d=16, mem=mem, raw=entries, beacon=0,
                       ratio=8, nq=entries, mode="causal", ceiling=True, step="prefill-interleaved")
    assert row["step"] == "prefill-interleaved" and row["mode"] == "causal"
    assert row["keys"] == mem + entries
    assert row["pairs"] == entries * mem + entries * (entries + 1) // 2
    for key in ("op_ms", "op_gflops", "sdpa_masked_ms", "speedup_vs_sdpa_masked", "vs_sdpa_causal",
                "matmul_gflops", "vs_matmul"):
        assert key in row and key in COLUMNS and row[key] > 0, key


def test_training_step_settings_compute_the_same_loss():
    """`bench train` on a tiny model: one row per setting, each a real forward and backward of
    the same sample; the fp32 settings give the same loss (they only change what autograd keeps),
    bf16 autocast a close one."""
    import torch

    from beacon_ops.adapter import make_beacon_trainable
    from beacon_ops.benchmarks.training import COLUMNS, SETTINGS, measure
    from llama_helpers import tiny_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = tiny_model(window=16, ratio=4)
        make_beacon_trainable(m, rank=4)
        rows = measure(m, 8, 2, 30, "cpu")
    finally:
        torch.set_num_threads(n)
    assert [r["setting"] for r in rows] == list(SETTINGS)
    base = rows[0]["loss"]
    for r in rows:
        assert set(COLUMNS) <= set(r) and r["windows"] == 4 and r["step_s"] > 0, r
        tol = 5e-2 if "bf16" in r["setting"] else 1e-5
        assert abs(r["loss"] - base) <= tol * max(1.0, abs(base)), (r["setting"], r["loss"], base)
    assert m.beacon.window == 8


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("quick", [False, True])
def test_training_bench_leaves_out_bf16_without_native_bf16(monkeypatch, quick, native):
    """Without native bf16 the bf16 autocast rows (~10x fp32's time there) are left out of the
    quick and the full run alike, and the result says why; with it they are measured."""
    from beacon_ops.benchmarks import training

    asked = []
    monkeypatch.setattr(training, "build_trainable", lambda device: (None, "stub"))
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(training, "measure", lambda m, w, r, t, d, settings: asked.append(list(settings)) or [])
    res = training.run("cpu", quick)
    assert len(asked) == (1 if quick else len(training.SAMPLES))
    for names in asked:
        assert ("bf16 autocast" in names) == native and "default" in names
    assert ("left_out" in res) == (not native)
    if not native:
        assert list(res["left_out"]) == ["bf16 autocast"] and "native bf16" in res["left_out"]["bf16 autocast"]


def test_layer_copies_fill_the_budget_with_separate_equal_caches():
    import torch

    from beacon_ops.benchmarks.attention import layer_copies

    k = torch.randn(1, 2, 100, 8)  # 6,400 bytes
    v = torch.randn(1, 2, 100, 8)
    layers = layer_copies(k, v, 64_000)  # 12,800 bytes a layer: 5 layers hold 64,000
    assert len(layers) == 5
    assert layers[0][0] is k and layers[0][1] is v
    ptrs = {t.data_ptr() for kv in layers for t in kv}
    assert len(ptrs) == 10  # each copy has storage of its own (its reads evict the others')
    for kl, vl in layers:
        assert torch.equal(kl, k) and torch.equal(vl, v)
    assert len(layer_copies(k, v, 1)) == 1 and len(layer_copies(k, v, 12_801)) == 2
