"""Evaluation: the passkey-retrieval prompt and grid, held-out long-context task answers, and the
default long text.

The passkey prompt is the paper's: a filler repeated, "The pass key is NNNNN. Remember it. NNNNN
is the pass key." hidden at some depth, then "What is the pass key? The pass key is".
The default text of perplexity runs is CPython's ``_pydecimal.py`` (about 61K SmolLM2 tokens;
PSF licence), which every Python installation ships.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch

__all__ = ["FILLER", "INTRO", "QUESTION", "passkey_prompt", "passkey_min_tokens", "default_text",
           "find_tokens", "PasskeyResult", "passkey_grid", "answer_contains", "chars_in_place", "accuracy_table",
           "plot_passkey_heatmap", "read_passkey_results",
           "TaskResult", "expected_answer", "task_answers", "task_table"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_min_tokens(tok: Any, key: int) -> int:
    """Tokens of the shortest passkey prompt (one filler sentence block) for this tokenizer."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    return len(tok.encode(INTRO + needle + FILLER + QUESTION))


def passkey_prompt(tok: Any, n_tokens: int, key: int, depth: float) -> list[int]:
    """The paper's passkey prompt, about ``n_tokens`` long, key at ``depth`` (0 = start, 1 = end)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tok.encode(INTRO + needle + QUESTION))
    per = len(tok.encode(FILLER * 20)) / 20
    reps = max(1, round((n_tokens - fixed) / per))
    before = round(reps * depth)
    text = INTRO + FILLER * before + needle + FILLER * (reps - before) + QUESTION
    return tok.encode(text)


def default_text() -> str:
    """Path of CPython's ``_pydecimal.py`` (ships with every Python; PSF licence)."""
    import _pydecimal

    return os.path.abspath(_pydecimal.__file__)


# --- the passkey grid ---------------------------------------------------------------------------
@dataclass
class PasskeyResult:
    """One run of :func:`passkey_grid`."""

    method: str        # "beacon", "untrained", "full", "sliding" (or a caller's name)
    length: int        # nominal prompt length
    depth: float
    key: int
    tokens: int        # actual prompt tokens
    answer: str
    correct: bool      # the greedy answer says the key (answer_contains)
    digits: float      # share of the key's digits at their place in the answer (partial progress)
    ratio: int | None  # condensing ratio used (beacon attention)
    seconds: float
    read: int = 0      # prompt tokens this run read (fewer than ``tokens`` when it began from a copy)
    place: int | None = None  # beacon attention: the key's first digit's token index mod the window


def passkey_grid(models: dict[str, tuple[Any, str]], tok: Any, lengths: Sequence[int],
                 depths: Sequence[float], *, seed: int = 0, keys: int = 1,
                 max_tokens: dict[str, int] | None = None, max_new_tokens: int = 8, progress: bool = True,
                 share_prefix: bool = True,
                 on_result: Callable[[PasskeyResult], None] | None = None) -> list[PasskeyResult]:
    """Greedy passkey answers for every (length, depth) and method.

    ``models``: method name -> (model, attention kind: ``beacon``, ``full`` or ``sliding``).
    ``max_tokens``: per method, lengths above it are skipped (e.g. full attention past the
    model's context). Each (length, depth) has ``keys`` prompts, each with its own 5-digit key
    drawn from ``seed`` (the same for every method; with one key per cell, the keys of earlier
    versions).
    ``share_prefix``: the prompts of a length share the filler before their keys; read it once
    (the session is copied at the last whole step before a later prompt departs from this one),
    which gives the answers of reading every prompt from the start, bit for bit, reading about
    half the tokens with several keys a cell. A result's ``read`` and ``seconds`` then count only
    what its prompt read beyond the copy it started from.
    """
    if keys < 1:
        raise ValueError(f"keys must be >= 1, got {keys}")
    from .generation import generate, ratio_for_length

    rng = random.Random(seed)
    cells = [(n, d, rng.randint(10000, 99999)) for n in lengths for d in depths for _ in range(keys)]
    limits = max_tokens or {}
    # method by method, each length's prompts by depth: the next prompt shares the most filler
    todo = [(m, n, d, k) for m in models for n, d, k in cells if n <= limits.get(m, n)]
    prompts = [passkey_prompt(tok, n, k, d) for _, n, d, k in todo]
    groups: dict[tuple[str, int], list[int]] = {}  # (method, length) -> indices into todo, in order
    for i, t in enumerate(todo):
        groups.setdefault(t[:2], []).append(i)
    as_tensor = [torch.tensor(p) for p in prompts] if share_prefix else []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(p) for p in prompts), desc="passkey", unit="tok", unit_scale=True)
    reader = _PrefixReader(max_new_tokens) if share_prefix else None
    results = []
    for i, (method, n, d, key) in enumerate(todo):
        model, attention = models[method]
        ids = prompts[i]
        t0 = time.perf_counter()
        with torch.no_grad():
            if reader is None:
                new, read = generate(model, [ids], max_new_tokens, attention=attention, progress=False)[0], len(ids)
            else:
                group = groups[(method, n)]
                new, read = reader.answer(model, attention, as_tensor[i], [as_tensor[j] for j in group if j > i],
                                          max(len(prompts[j]) for j in group))
        model.reset()
        answer = tok.decode(new).strip()
        place = None
        if attention == "beacon":
            at = find_tokens(ids, tok.encode(str(key)))
            place = at % model.beacon.window if at >= 0 else None
        r = PasskeyResult(method, n, d, key, len(ids), answer, answer_contains(str(key), answer), chars_in_place(str(key), answer),
                          ratio_for_length(model, len(ids)) if attention == "beacon" else None,
                          time.perf_counter() - t0, read, place)
        results.append(r)
        if on_result:
            on_result(r)
        if bar is not None:
            bar.update(len(ids))
            bar.set_postfix(method=method, length=n, depth=d, ok=r.correct, refresh=False)
    if bar is not None:
        bar.close()
    return results


def find_tokens(ids: Sequence[int], sub: Sequence[int]) -> int:
    """First index of ``sub`` in ``ids``, -1 when absent (the key's digits among the prompt's)."""
    sub = list(sub)
    return next((i for i in range(len(ids) - len(sub) + 1) if list(ids[i:i + len(sub)]) == sub), -1)


class _PrefixReader:
    """Greedy answers to prompts read in order, each from a copy of the session saved where it
    departs from an earlier prompt. While a prompt is read, the session is saved at the last
    whole step (see :func:`~beacon_ops.generation.extend`) before each point where a later
    prompt departs from it; the saved sessions are nested prefixes of the current prompt."""

    def __init__(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.group: tuple[Any, ...] | None = None
        self.saved: list[tuple[torch.Tensor, int, Any]] = []  # (ids read, ratio, session), shortest first

    def answer(self, model: Any, attention: str, x: torch.Tensor, later: Sequence[torch.Tensor],
               longest: int) -> tuple[list[int], int]:
        """The new tokens and how many prompt tokens were read for them. ``later``: the prompts
        of this group (model, attention kind, room) still to come; ``longest``: the group's
        longest prompt (the session's room)."""
        import copy

        from .generation import extend, generate_from, new_session, ratio_for_length

        ratio = ratio_for_length(model, len(x)) if attention == "beacon" else 0
        if self.group != (id(model), attention, longest):
            self.group, self.saved = (id(model), attention, longest), []
        self.saved = [sv for sv in self.saved if sv[1] == ratio and _common_prefix(sv[0], x) == len(sv[0])]
        start = len(self.saved[-1][0]) if self.saved else 0
        if self.saved:
            model.session = copy.deepcopy(self.saved[-1][2])
        else:
            new_session(model, [len(x)], self.max_new_tokens + longest - len(x), attention=attention)
        for cut in sorted({_common_prefix(x, p) for p in later}):
            read = model.session.seen[0]
            if cut > read:
                extend(model, [x[read:cut]], logits="none", known_lengths=[len(x)], whole_steps=True)
                if model.session.seen[0] > read:
                    self.saved.append((x[:model.session.seen[0]], ratio, copy.deepcopy(model.session)))
        read = model.session.seen[0]
        logits = extend(model, [x[read:]], known_lengths=[len(x)])
        return generate_from(model, logits, self.max_new_tokens)[0], len(x) - start


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


def answer_contains(want: str, got: str) -> bool:
    """Whether ``got`` says ``want`` as a whole, case aside: not as part of a longer number or
    word (``680448.`` does not say the key 68044; ``68044.`` and ``The pass key is 68044`` do)."""
    edge = r"[^\W_]"   # a letter or digit
    left = f"(?<!{edge})" if want[:1].isalnum() else ""
    right = f"(?!{edge})" if want[-1:].isalnum() else ""
    return re.search(left + re.escape(want) + right, got, flags=re.IGNORECASE) is not None


def chars_in_place(want: str, got: str) -> float:
    """Share of ``want``'s characters that ``got`` has at the same place (``73691`` vs
    ``73697.`` -> 0.8): progress that exact answers do not show yet."""
    return sum(a == b for a, b in zip(want, got)) / max(1, len(want))


def digits_by_position(results: Sequence[PasskeyResult]) -> list[str]:
    """Per method, the share of keys whose i-th digit the answer has in place, for each i: where
    in the key the misses are (the beacon adapters lose the last digits first; a 16K `demo`
    answered 68045 for both 68044 and 68043, docs/training-log.md)."""
    lines = []
    for m in dict.fromkeys(r.method for r in results):
        keys = [(str(r.key), r.answer.strip()) for r in results if r.method == m]
        shares = []
        for i in range(max(len(k) for k, _ in keys)):
            have = [(k, a) for k, a in keys if i < len(k)]
            shares.append(sum(i < len(a) and a[i] == k[i] for k, a in have) / len(have))
        lines.append(f"{m}: digit in place, by position in the key: " + " ".join(f"{x:.0%}" for x in shares))
    return lines


def window_place_split(results: Sequence[PasskeyResult], window: int) -> list[str]:
    """Per beacon method, keys found by the quarter of its window the key starts in (``place``):
    in step-expansion a window's last tokens are seen by its last few beacons only, and the
    shipped adapter loses keys at the end of a window (docs/training-log.md)."""
    lines = []
    for m in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == m and r.place is not None]
        if not rs:
            continue
        cells = []
        for q in range(4):
            part = [r for r in rs if q * window <= 4 * r.place < (q + 1) * window]
            cells.append(f"{sum(r.correct for r in part)}/{len(part)}")
        lines.append(f"{m}: keys found by the quarter of the {window}-token window they start in: " + ", ".join(cells))
    return lines


def accuracy_table(results: Sequence[PasskeyResult]) -> str:
    """Markdown table: accuracy over the depths per (length, method), the share of key digits
    in place, and the ratio used."""
    methods = list(dict.fromkeys(r.method for r in results))
    head = "| length | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods)
    rows = [head]
    for n in sorted({r.length for r in results}):
        cells = []
        for m in methods:
            rs = [r for r in results if r.length == n and r.method == m]
            if not rs:
                cells.append("skipped")
                continue
            ok = sum(r.correct for r in rs)
            ratios = sorted({r.ratio for r in rs if r.ratio is not None})
            digits = sum(r.digits for r in rs) / len(rs)
            cells.append(f"{ok / len(rs):.0%} ({ok}/{len(rs)}), digits {digits:.0%}"
                         + (f", r = {'/'.join(map(str, ratios))}" if ratios else ""))
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_passkey_heatmap(results: Sequence[PasskeyResult], path: str, title: str = "") -> str:
    """One length x depth heatmap per method (the share of the cell's keys found: green = all),
    side by side, saved to ``path``; with several keys a cell, each cell says how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in results))
    lengths = sorted({r.length for r in results})
    depths = sorted({r.depth for r in results})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        found_in = [[[] for _ in lengths] for _ in depths]
        for r in results:
            if r.method == m:
                found_in[depths.index(r.depth)][lengths.index(r.length)].append(r.correct)
        grid = [[sum(c) / len(c) if c else float("nan") for c in row] for row in found_in]
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(found_in):
            for j, c in enumerate(row):
                if len(c) > 1:
                    ax.text(j, i, f"{sum(c)}/{len(c)}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length")
        ax.set_ylabel("depth of the key")
        found = [r.correct for r in results if r.method == m]
        ax.set_title(f"{m}: {sum(found)}/{len(found)}")
    if title:
        fig.suptitle(title, fontsize=10, wrap=True)  # wrap: one panel is narrower than a long title
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_passkey_results(path: str) -> list[PasskeyResult]:
    """The results an ``eval-passkey --json PATH`` run wrote, as :class:`PasskeyResult`.

    Raises ``ValueError`` saying what is wrong when the file is not such a JSON file."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e.msg}, line {e.lineno})") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path} has no 'results' list: not an eval-passkey --json file")
    names = {f.name for f in fields(PasskeyResult)}
    required = {f.name for f in fields(PasskeyResult) if f.name not in ("read", "place")}
    out = []
    for i, row in enumerate(rows):
        missing = required - set(row) if isinstance(row, dict) else required
        if missing:
            raise ValueError(f"{path}: result {i} lacks {', '.join(sorted(missing))}")
        out.append(PasskeyResult(**{k: v for k, v in row.items() if k in names}))
    return out


# --- held-out long-context tasks ----------------------------------------------------------------
@dataclass
class TaskResult:
    """One greedy answer of :func:`task_answers`."""

    kind: str          # the task (beacon_ops.long_tasks.TASK_KINDS)
    tokens: int        # prompt tokens (up to the answer)
    in_memory: bool    # a fact the answer needs lay in an earlier window (read through beacons)
    expected: str      # the first answer, without its final full stop / end-of-turn token
    answer: str        # the greedy continuation
    correct: bool      # ``answer`` says ``expected`` (answer_contains: case aside, not inside a longer word)
    char_accuracy: float  # share of ``expected``'s characters the answer has at the same place
    seconds: float


def expected_answer(sample: Any, tok: Any, eos: str = "<|im_end|>") -> tuple[str, int]:
    """(text, tokens) of a task sample's first answer: its labelled tokens from ``answer_start``
    up to the next unlabelled one, stripped of spaces, a final full stop and ``eos``."""
    from .long_tasks import IGNORE

    if sample.answer_start < 0:
        raise ValueError("sample: a language-modelling sample has no answer")
    ids = []
    for t, lab in zip(sample.ids[sample.answer_start:], sample.labels[sample.answer_start:]):
        if lab == IGNORE:
            break
        ids.append(t)
    text = tok.decode(ids).replace(eos, "").strip()
    return text[:-1] if text.endswith(".") else text, len(ids)


def task_answers(model: Any, tok: Any, sampler: Callable[[int], Any], samples: int, *,
                 window: int, first: int = 0, attention: str = "beacon", progress: bool = True,
                 eos: str = "<|im_end|>") -> list[TaskResult]:
    """Greedy answers to ``samples`` task samples ``sampler(first) ...`` (e.g. a
    :class:`~beacon_ops.long_tasks.LongTaskMixture` with ``lm_share=0`` and a seed that training
    did not use): each prompt is read up to its first answer, which is then generated (its
    length + 2 tokens) and compared with the sample's own. ``window``: the beacon window, to
    tell answers read through memory from answers in the raw window."""
    from .generation import generate

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=samples, desc="tasks", unit="sample")
    out = []
    for i in range(first, first + samples):
        s = sampler(i)
        if s.answer_start < 0:
            raise ValueError(f"sampler: sample {i} is language modelling (use lm_share=0)")
        want, n_ans = expected_answer(s, tok, eos)
        t0 = time.perf_counter()
        with torch.no_grad():
            new = generate(model, [s.ids[:s.answer_start]], n_ans + 2, attention=attention, progress=False)[0]
        model.reset()
        got = tok.decode(new).replace(eos, " ").strip()
        r = TaskResult(s.kind, s.answer_start, s.facts_in_memory(window) > 0, want, got,
                       answer_contains(want, got), chars_in_place(want, got), time.perf_counter() - t0)
        out.append(r)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kind=r.kind, memory=r.in_memory, ok=r.correct, refresh=False)
    if bar is not None:
        bar.close()
    return out


def task_table(results: Sequence[TaskResult]) -> str:
    """Markdown table: per task and where its fact lay, exact answers and character accuracy."""
    rows = ["| task | fact in | exact | characters |", "|---|---|---|---|"]
    for kind in dict.fromkeys(r.kind for r in results):
        for mem, where in ((True, "memory (beacons)"), (False, "raw window")):
            rs = [r for r in results if r.kind == kind and r.in_memory == mem]
            if rs:
                ok = sum(r.correct for r in rs)
                chars = sum(r.char_accuracy for r in rs) / len(rs)
                rows.append(f"| {kind} | {where} | {ok / len(rs):.0%} ({ok}/{len(rs)}) | {chars:.0%} |")
    return "\n".join(rows)
