"""Evaluation inputs: the passkey-retrieval prompt and the default long text.

The passkey prompt is the paper's: a filler repeated, "The pass key is NNNNN. Remember it. NNNNN
is the pass key." hidden at some depth, then "What is the pass key? The pass key is".
The default text of perplexity runs is CPython's ``_pydecimal.py`` (about 61K SmolLM2 tokens;
PSF licence), which every Python installation ships.
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["FILLER", "INTRO", "QUESTION", "passkey_prompt", "passkey_min_tokens", "default_text"]

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
