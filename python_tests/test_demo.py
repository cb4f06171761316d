"""``python -m beacon_ops demo`` / ``eval-ppl`` (beacon_ops/commands/), on the random tiny fallback."""
from __future__ import annotations

import json
import math
import re

import pytest

import beacon_ops.checkpoints
from beacon_ops.cli import main
from beacon_ops.checkpoints import ByteTokenizer
from beacon_ops.commands.eval_ppl import parse_lengths
from beacon_ops.evaluation import FILLER, QUESTION, passkey_prompt


def test_passkey_prompt_has_the_needle_at_its_depth():
    tok = ByteTokenizer()
    for n, depth in ((4000, 0.25), (9000, 0.8)):
        ids = passkey_prompt(tok, n, 12345, depth)
        text = tok.decode(ids)
        assert abs(len(ids) - n) <= len(FILLER)
        needle = "The pass key is 12345. Remember it. 12345 is the pass key."
        assert text.count(needle) == 1 and text.endswith(QUESTION)
        assert abs(text.index(needle) / len(text) - depth) < 0.03


def test_lengths_parse_and_reject():
    assert parse_lengths("2k, 8k,1500") == [2048, 8192, 1500]
    with pytest.raises(Exception, match="--lengths"):
        parse_lengths("2k,lots")


@pytest.fixture
def no_smollm2(monkeypatch):
    monkeypatch.setattr(beacon_ops.checkpoints, "smollm2_path", lambda: None)


def test_eval_ppl_table(tmp_path, no_smollm2, capsys):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(80)))
    out = tmp_path / "ppl.json"
    assert main(["eval-ppl", "--text", str(text), "--lengths", "100,300", "--targets", "50",
                 "--window", "128", "--ratio", "4", "--full-max", "200", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM tiny Llama" in printed and "skipped" in printed
    rows = json.loads(out.read_text())["rows"]
    short, long = rows
    # no window fills at 100 tokens: beacon = sliding window = full attention (the base model)
    assert math.isclose(short["beacon"], short["full"], rel_tol=1e-4)
    assert math.isclose(short["sliding"], short["full"], rel_tol=1e-4)
    assert long["full"] is None and long["beacon"] > 0 and long["sliding"] > 0


def test_demo_falls_back_and_reports(tmp_path, no_smollm2, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--tokens", "600", "--window", "128", "--max-new-tokens", "3",
                 "--json", str(out)]) == 0
    assert "RANDOM tiny Llama" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert not rep["real_model"] and rep["prompt_tokens"] >= 550
    assert [r["attention"] for r in rep["runs"]] == ["beacon", "full"]
    beacon, full = rep["runs"]
    # adapt-N picks r = 0 for 600 tokens (+1024) within the fallback's 2048 context: the beacon
    # path is then the base model, so both greedy answers agree
    assert beacon["ratio"] == 0 and beacon["answer"] == full["answer"]
    assert 1 <= beacon["new_tokens"] <= 3 and beacon["prefill_tok_s"] > 0


def test_digits_by_position():
    from beacon_ops.evaluation import PasskeyResult, digits_by_position

    def r(method, key, answer):
        return PasskeyResult(method, 4096, 0.5, key, 4096, answer, str(key) in answer, 0.0, 4, 1.0)

    results = [r("beacon", 68044, "68045."), r("beacon", 43432, " 43423."), r("beacon", 12345, "12345."),
               r("beacon", 71898, "7189"), r("full", 11111, "11111.")]
    assert digits_by_position(results) == [
        "beacon: digit in place, by position in the key: 100% 100% 100% 75% 25%",
        "full: digit in place, by position in the key: 100% 100% 100% 100% 100%"]
    assert digits_by_position([]) == []


def test_window_place_split():
    from beacon_ops.evaluation import PasskeyResult, window_place_split

    def r(method, place, correct):
        return PasskeyResult(method, 4096, 0.5, 12345, 4096, "", correct, 0.0, 4, 1.0, 0, place)

    results = [r("beacon", 0, True), r("beacon", 63, False), r("beacon", 64, True), r("beacon", 237, False),
               r("beacon", 255, True), r("full", None, True)]
    assert window_place_split(results, 256) == [
        "beacon: keys found by the quarter of the 256-token window they start in: 1/2, 1/1, 0/0, 1/2"]


def test_answer_contains():
    """The key said as a whole number counts; inside a longer one it does not (an answer of
    ``680448.`` for 68044 once counted as found)."""
    from beacon_ops.evaluation import answer_contains

    assert answer_contains("68044", "68044.") and answer_contains("68044", "The pass key is 68044<|im_end|>")
    assert not answer_contains("68044", "680448.") and not answer_contains("68044", "168044")
    assert not answer_contains("68044", "68045.") and not answer_contains("68044", "")
    assert answer_contains("Blue Whale", "the blue whale.") and not answer_contains("cat", "category")
    assert answer_contains("3f2a-9c", "id: 3F2A-9C") and not answer_contains("3f2a-9c", "3f2a-9c1")
    assert answer_contains("(x)", "a(x)b")   # edges that are not letters or digits bind nothing


def test_chars_in_place():
    from beacon_ops.evaluation import chars_in_place

    assert chars_in_place("73691", "73697.7") == 0.8
    assert chars_in_place("65125", "65611.") == 0.4
    assert chars_in_place("12345", "12345") == 1.0 and chars_in_place("12345", "") == 0.0
    assert chars_in_place("12345", " 12345") == 0.0  # in place, not anywhere
    assert chars_in_place("", "x") == 0.0


def test_eval_passkey_grid_table_heatmap(tmp_path, no_smollm2, capsys):
    out = tmp_path / "pk.json"
    assert main(["eval-passkey", "--lengths", "400,1100", "--depths", "0,1", "--window", "128",
                 "--methods", "beacon,full,sliding", "--full-max", "600", "--json", str(out),
                 "--plot", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| length | beacon | full | sliding |" in printed and "skipped" in printed
    res = json.loads(out.read_text())["results"]
    # 2 lengths x 2 depths for beacon and sliding; full attention only where it fits (400 <= 600)
    assert sorted((r["method"], r["length"]) for r in res) == sorted(
        [(m, n) for m in ("beacon", "sliding") for n in (400, 400, 1100, 1100)] + [("full", 400)] * 2)
    assert all(r["correct"] == (re.search(rf"(?<!\d){r['key']}(?!\d)", r["answer"]) is not None) for r in res)
    assert all(0 <= r["digits"] <= 1 and (r["digits"] == 1) >= r["answer"].startswith(str(r["key"])) for r in res)
    assert ", digits " in printed and "read " in printed and "(the filler they share read once" in printed
    # adapt-N: r = 0 at 400 tokens, 2 at 1100 (+1024 generation allowance > the 2048 context)
    assert {r["length"]: r["ratio"] for r in res if r["method"] == "beacon"} == {400: 0, 1100: 2}
    # r = 0 is the base model: beacon answers equal full attention's where both ran
    for r in res:
        if r["method"] == "full":
            twin = next(x for x in res if x["method"] == "beacon" and x["length"] == r["length"]
                        and x["depth"] == r["depth"])
            assert twin["answer"] == r["answer"] and twin["key"] == r["key"]
    assert (tmp_path / "passkey_heatmap.png").stat().st_size > 1000


def test_eval_passkey_keys_per_cell(tmp_path, no_smollm2, capsys):
    out = tmp_path / "pk.json"
    assert main(["eval-passkey", "--lengths", "400", "--depths", "0,1", "--keys", "3", "--window", "128",
                 "--methods", "beacon,sliding", "--json", str(out), "--plot", str(tmp_path)]) == 0
    res = json.loads(out.read_text())["results"]
    assert len(res) == 2 * 3 * 2  # depths x keys x methods
    for d in (0.0, 1.0):
        beacon = [r["key"] for r in res if r["method"] == "beacon" and r["depth"] == d]
        sliding = [r["key"] for r in res if r["method"] == "sliding" and r["depth"] == d]
        assert beacon == sliding and len(set(beacon)) == 3  # three keys a cell, the same for both methods
    assert "/6)" in capsys.readouterr().out  # the table counts every key of the length
    with pytest.raises(SystemExit) as e:
        main(["eval-passkey", "--keys", "0"])
    assert e.value.code == 2 and "--keys" in capsys.readouterr().err


def test_plot_passkey_merges_runs(tmp_path, no_smollm2, capsys):
    """plot-passkey: runs made a length at a time become one table and heatmap; --names turns two
    runs into two panels; the same key answered twice, a file that is not eval-passkey's and a
    wrong --names count are one line naming the argument, exit 2."""
    runs = []
    for n in (400, 600):
        runs.append(tmp_path / f"pk{n}.json")
        assert main(["eval-passkey", "--lengths", str(n), "--depths", "0,1", "--window", "128",
                     "--methods", "beacon", "--json", str(runs[-1])]) == 0
    capsys.readouterr()
    png = tmp_path / "merged.png"
    assert main(["plot-passkey", str(runs[0]), str(runs[1]), "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| length | beacon |" in printed and "| 400 | " in printed and "| 600 | " in printed
    assert png.stat().st_size > 1000
    assert main(["plot-passkey", str(runs[0]), str(runs[0]), "--names", "a,b", "--out", str(png)]) == 0
    assert "| length | a | b |" in capsys.readouterr().out
    assert main(["plot-passkey", str(runs[0]), str(runs[1]), "--names", "r1", "--out", str(png)]) == 0
    assert "| length | r1 |" in capsys.readouterr().out  # one name for every file
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "x"}))
    for argv, needles in [
        ([str(runs[0]), str(runs[0])], ("JSON", "both answer key")),
        ([str(bad)], ("JSON", "no 'results' list")),
        ([str(runs[0]), str(runs[1]), "--names", "a,b,c"], ("--names", "2 files")),
        ([str(runs[0]), str(runs[1]), "--names", "a,"], ("--names", "non-empty")),
    ]:
        code = main(["plot-passkey", *argv, "--out", str(png)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and all(s in err[0] for s in needles), (code, err)
    assert main(["plot-passkey", str(runs[0]), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "--out" in capsys.readouterr().err


def test_shipped_adapter_is_the_default_for_smollm2_only(monkeypatch):
    import argparse

    from beacon_ops import adapter as adapter_mod
    from beacon_ops.commands import common

    monkeypatch.setattr(beacon_ops.checkpoints, "smollm2_path", lambda: "/x/SmolLM2.gguf")
    monkeypatch.setattr(common, "shipped_adapter_path", lambda: "/x/shipped.safetensors")
    monkeypatch.setattr(common, "read_adapter_config", lambda p: {"window": 512})
    a = argparse.Namespace(adapter="auto", model=None, window=None, default_window=1024)
    common.resolve_adapter(a)
    assert a.adapter == "/x/shipped.safetensors" and a.window == 512
    a = argparse.Namespace(adapter="none", model=None, window=None, default_window=1024)
    common.resolve_adapter(a)
    assert a.adapter is None and a.window == 1024
    a = argparse.Namespace(adapter="auto", model="other.gguf", window=256, default_window=1024)
    common.resolve_adapter(a)
    assert a.adapter is None and a.window == 256
    # the shipped file, when present, is a valid adapter for SmolLM2's shapes and says its window
    path = adapter_mod.shipped_adapter_path()
    if path:
        cfg = adapter_mod.read_adapter_config(path)
        assert cfg["window"] > 0 and cfg["rank"] >= 0
