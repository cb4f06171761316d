"""The documents' `python -m beacon_ops ...` and `python bench/*.py ...` commands still parse.

README.md, docs/*.md and the adapters' README print many commands next to the figures they made;
a renamed or removed flag would leave them unreproducible without anyone noticing. Each command
found in a code block or an inline code span is parsed: by the CLI's own parser, or by the bench
script's, stopped as soon as its arguments have parsed; nothing is run. Synopsis notation is read
as a user would: ``[--flag X]`` as the flag given, ``{a,b}`` and ``cpu|cuda`` as their first
choice, placeholders (``A``, ``PATH``, ``<file>``, ``--flag ...``) as a value; file arguments are
not checked for existence. A command elided with ``...`` may leave out required flags.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import pkgutil
import re
import shlex
import sys
from pathlib import Path

import pytest

import beacon_ops.commands
from beacon_ops.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "python -m beacon_ops "


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "beacon_ops/assets/README.md"]


def documented_commands(text: str, prefix: str = PREFIX) -> list[str]:
    """What follows ``prefix`` (``python -m beacon_ops``) in the text's code blocks (fenced or
    indented) and inline code spans."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if prefix in line:
                found.append(line[line.index(prefix) + len(prefix):].split(" #")[0])
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    for line in re.sub(r"\\\n\s*", " ", prose).splitlines():  # indented code blocks
        if line.startswith("    ") and line.strip().startswith(prefix):
            found.append(line.strip()[len(prefix):].split(" #")[0])
    for span in re.findall(r"`([^`]+)`", prose):
        span = re.sub(r"\\?\n\s*", " ", span)  # an inline span may wrap
        if prefix in span:
            found.append(span[span.index(prefix) + len(prefix):])
    return found


def argv_of(command: str) -> list[str]:
    """The command's arguments with its synopsis notation and placeholders made concrete."""
    command = re.sub(r"\[,[^\]]*\]", "", command)  # N[,M...]
    command = command.replace('"..."', "x")
    command = re.sub(r"\.\.\..*?\.\.\.", " ... ", command)  # "... the same ..."
    command = command.replace("[", " ").replace("]", " ")
    command = re.sub(r"\{([^,{}]+),[^{}]*\}", r"\1", command)
    argv = []
    for tok in shlex.split(command):
        if tok in ("...", "\u2026"):
            if argv and argv[-1].startswith("--"):
                argv.append("1")  # "--shifts ...": a value left out
            continue
        if re.fullmatch(r"<[^>]*>|[A-Z][A-Z0-9_]*", tok):
            tok = "1"
        elif "|" in tok and not tok.startswith("-"):
            tok = tok.split("|")[0]
        argv.append(tok)
    return argv


@pytest.fixture
def lenient_paths(monkeypatch):
    """File arguments taken as given: the documents name files of their authors' runs."""
    for info in pkgutil.iter_modules(beacon_ops.commands.__path__):
        module = importlib.import_module(f"beacon_ops.commands.{info.name}")
        if hasattr(module, "existing_path"):
            monkeypatch.setattr(module, "existing_path", lambda text: text)


def test_documents_hold_commands():
    """The extraction finds the documents' commands (a guard for the test below)."""
    commands = [c for doc in _documents() for c in documented_commands(doc.read_text(encoding="utf-8"))]
    assert len(commands) >= 30
    names = {argv_of(c)[0] for c in commands}
    assert {"train", "eval-passkey", "eval-ppl", "bench", "demo"} <= names


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_parse(doc, lenient_paths):
    failures = []
    for command in documented_commands(doc.read_text(encoding="utf-8")):
        argv = argv_of(command)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(argv)
        except SystemExit as e:
            message = err.getvalue().strip()
            elided = "..." in command or "\u2026" in command
            if e.code and not (elided and "arguments are required" in message):
                failures.append(f"python -m beacon_ops {command[:120]}\n    {message}")
    assert not failures, "commands in the document that no longer parse:\n" + "\n".join(failures)


def test_a_stale_flag_is_caught(lenient_paths):
    """The check fails on a flag the CLI does not have."""
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(argv_of("eval-passkey --lengths 8k --no-such-flag 3"))


class _Parsed(Exception):
    """Raised in place of a bench script's work once its arguments have parsed."""


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_bench_scripts_parse(doc, monkeypatch):
    """`python bench/NAME.py ...` commands: each script's main() parses them (then stops)."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.syspath_prepend(str(ROOT))
    failures = []
    for command in documented_commands(doc.read_text(encoding="utf-8"), prefix="python bench/"):
        script, *rest = command.split(maxsplit=1)
        path = ROOT / "bench" / script
        assert path.is_file(), f"{doc.name} names bench/{script}, which does not exist"
        if "argparse" not in path.read_text(encoding="utf-8"):  # a script without options
            if rest:
                failures.append(f"python bench/{command[:120]}\n    the script takes no arguments")
            continue
        spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys, "argv", [str(path), *argv_of(rest[0] if rest else "")])
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                module.main()
        except _Parsed:
            continue
        except SystemExit as e:
            if e.code:
                failures.append(f"python bench/{command[:120]}\n    {err.getvalue().strip()}")
                continue
        failures.append(f"python bench/{command[:120]}\n    main() ran without parsing its arguments")
    assert not failures, "bench commands in the document that no longer parse:\n" + "\n".join(failures)


def test_documented_make_targets_exist():
    """Every `make TARGET` the documents name (in code) is a target of the Makefile."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    named = {t for doc in _documents()
             for t in re.findall(r"(?:`|^\s*)make ([a-z][\w-]*)", doc.read_text(encoding="utf-8"), flags=re.M)}
    assert {"run", "test", "build"} <= named
    assert not named - targets, f"targets named in the documents but not in the Makefile: {named - targets}"
