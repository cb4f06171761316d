"""plot-log and beacon_ops.training_plot: a training log read as one run (a resumed run's repeated
steps counted once, the last record winning), its summary, the PNG, and one-line errors."""
from __future__ import annotations

import json

import pytest

from beacon_ops.training_plot import (_rolling_mean, plot_training_log, read_training_log,
                                      summarize_training_log)

# the CLI harness and its autouse fixture (the tiny model, no BEACON_OPS_DEBUG) of test_cli
from test_cli import no_smollm2, run_cli  # noqa: E402,F401

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_resumed_runs_log_reads_as_one_run(tmp_path, capsys):
    """A real tiny run: 2 steps saved, a third logged but not saved (the session ended), then
    resumed to step 4; step 3 appears twice in the log and the resumed run's record wins."""
    log, out = tmp_path / "log.jsonl", str(tmp_path / "a.safetensors")
    flags = ["train", "--tiny", "--window", "64", "--min-len", "130", "--max-len", "140", "--out", out,
             "--log-file", str(log)]
    assert run_cli(flags + ["--steps", "2"], capsys)[0] == 0
    with open(log, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 99.0, "tokens": 1, "lr": 0.0, "seconds": 1.0}) + "\n")
    assert run_cli(flags + ["--steps", "4", "--resume", out], capsys)[0] == 0
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 3, 4]
    recs = read_training_log(str(log))
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[2] == lines[3] and recs[2]["loss"] != 99.0
    s = summarize_training_log(recs)
    assert s["tokens"] == sum(r["tokens"] for r in recs) and s["steps"] == 4
    png = tmp_path / "curve.png"
    code, printed, err = run_cli(["plot-log", str(log), "--out", str(png), "--smooth", "2",
                                  "--json", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "steps 1-4 (4 logged)" in printed
    assert json.loads((tmp_path / "s.json").read_text())["tokens"] == s["tokens"]


def test_summary_and_rolling_mean(tmp_path):
    recs = [{"step": i, "loss": float(i), "tokens": 10 * i, "seconds": 360.0} for i in range(1, 21)]
    s = summarize_training_log(recs)
    assert s == {"steps": 20, "first_step": 1, "last_step": 20, "tokens": 2100, "hours": 2.0,
                 "tenth": 2, "loss_first": 1.5, "loss_last": 19.5}
    assert _rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert _rolling_mean([2.0, 4.0], 5) == [2.0, 3.0]
    # without "lr" the plot has the loss panel only; still a PNG
    assert open(plot_training_log(recs, str(tmp_path / "sub" / "c.png")), "rb").read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="smooth"):
        plot_training_log(recs, str(tmp_path / "d.png"), smooth=0)


@pytest.mark.parametrize("content, needle", [
    ("", "no training steps"),
    ('{"step": 1, "loss": 0.5}\nnot json\n', "log.jsonl:2: not a JSON line"),
    ('{"step": "1", "loss": 0.5}\n', "log.jsonl:1: a training log line has an integer 'step'"),
    ('[1, 2]\n', "log.jsonl:1:"),
])
def test_bad_logs_are_one_line_naming_the_line(tmp_path, capsys, content, needle):
    log = tmp_path / "log.jsonl"
    log.write_text(content)
    code, _, err = run_cli(["plot-log", str(log), "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "LOG:" in err and needle in err, err
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--out", "c.svg"], "--out: must name a .png file"),
    (["--out", "c.png", "--smooth", "0"], "--smooth"),
])
def test_bad_flags(tmp_path, capsys, argv, needle):
    log = tmp_path / "log.jsonl"
    write_log(log, [{"step": 1, "loss": 0.5}])
    code, _, err = run_cli(["plot-log", str(log)] + argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_missing_log(tmp_path, capsys):
    code, _, err = run_cli(["plot-log", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and "no such file" in err
