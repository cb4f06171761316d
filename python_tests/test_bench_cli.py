"""The bench command's argument parsing and table printing (no benchmark is run)."""
from __future__ import annotations

import subprocess
import sys

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
