"""bench/adapter_heldout.py's bookkeeping: the figures it reads off the evaluation commands'
JSON and printed lines, and the table row (the commands themselves are tested where they live)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def heldout():
    spec = importlib.util.spec_from_file_location("adapter_heldout", os.path.join(HERE, "..", "bench", "adapter_heldout.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_passkey_figures(heldout, tmp_path) -> None:
    """Keys answered whole, mean share of digits in place, and digits in place by position,
    counted by hand for three answers (`full` rows are left out)."""
    results = [{"method": "beacon", "key": 68044, "answer": " 68045.", "correct": False, "digits": 0.8},
               {"method": "beacon", "key": 12345, "answer": "12345.", "correct": True, "digits": 1.0},
               {"method": "beacon", "key": 98765, "answer": "9876", "correct": False, "digits": 0.8},
               {"method": "full", "key": 98765, "answer": "98765", "correct": True, "digits": 1.0}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"results": results}))
    got = heldout._passkeys(str(path))
    assert (got["found"], got["keys"]) == (1, 3)
    assert got["digits"] == pytest.approx(2.6 / 3)
    assert got["by_position"] == pytest.approx([1, 1, 1, 1, 1 / 3])


def test_table_row(heldout) -> None:
    row = {"adapter": "/x/r37.safetensors",
           "8k": {"found": 8, "keys": 15, "digits": 0.81, "by_position": [1.0] * 5},
           "16k": {"found": 7, "keys": 15, "digits": 0.83, "by_position": [1.0, 0.93, 0.93, 0.8, 0.47]},
           "shifts": [{"place": 237, "answer": "68043.", "right": True}, {"place": 109, "answer": "68034.", "right": False}],
           "demo": {"answer": "68045.", "right": False}, "hamlet": 51.923}
    lines = heldout.table([row, {"adapter": "b.safetensors", "hamlet": 50.0}]).splitlines()
    assert lines[2] == ("| r37.safetensors | 8/15, 81% | 7/15, 83% (100% / 93% / 93% / 80% / 47%) | 1/2 | "
                        "`68045.` | 51.92 |")
    assert lines[3] == "| b.safetensors |  |  |  |  | 50.00 |"


def test_shift_lines_are_read(heldout) -> None:
    """bench/passkey_position.py's lines as it prints them (the answer by repr: in double quotes
    when it holds a single quote)."""
    text = ("key 68043, shift 21: first digit at token 7938, place 2 of the window's 256; "
            "answer '68043.<|im_end|>' (right)\nkey 68043, shift 64: first digit at token 7981, place 45 of the "
            "window's 256; answer \"68'4.\" (wrong)\n")
    assert heldout.parse_shifts(text) == [{"place": 2, "answer": "68043.", "right": True},
                                          {"place": 45, "answer": "68'4.", "right": False}]
