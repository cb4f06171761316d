"""bench/decode_rows.py's bookkeeping: the shape argument and the medians with ranges that
``--repeat`` prints, and one tiny run end to end (the timings themselves are not checked)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import PACKAGE_DIR

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "bench", "decode_rows.py")


@pytest.fixture(scope="module")
def rows():
    spec = importlib.util.spec_from_file_location("decode_rows", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary(rows) -> None:
    assert rows.summary([0.0123], 1e3, ".2f") == "12.30"
    assert rows.summary([0.3, 0.1, 0.2, 0.9], 1, ".1f") == "0.2 [0.1-0.9]"  # median of four: the mean of the middle two


def test_parse_shapes(rows) -> None:
    assert rows.parse_shapes("4/8/128,3/3/64") == [(4, 8, 128), (3, 3, 64)]
    for bad in ("4/8", "4/0/64", "a/b/c"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not ROWS/KV_HEADS/HEAD_DIM"):
            rows.parse_shapes(bad)


def test_repeat_run_and_usage_errors() -> None:
    env = {**os.environ, "PYTHONPATH": PACKAGE_DIR}
    done = subprocess.run([sys.executable, SCRIPT, "--dtypes", "fp32", "--shapes", "2/1/64", "--keys", "600",
                           "--repeat", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("fp32 rows 2 kv_heads 1 d  64: ") and line.count("[") == 3, line
    bad = subprocess.run([sys.executable, SCRIPT, "--repeat", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--repeat: at least 1" in bad.stderr
