"""Training data of beacon_ops.long_tasks: answers are in the prompt where stated, labels as intended."""
from __future__ import annotations

import random
import re

import pytest

from beacon_ops.long_tasks import (IGNORE, TASK_KINDS, LongTaskMixture, Sample, memory_probe_samples,
                                   public_domain_texts)


class CharTokenizer:
    """One token per character (code point): positions in tokens are positions in text."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


TEXT = " ".join(f"Sentence number {i} of a long and plain document." for i in range(3000))


def _mixture(**kw) -> LongTaskMixture:
    return LongTaskMixture(CharTokenizer(), {"doc": TEXT}, window=256, min_len=1500, max_len=3000, **kw)


def _answer(tok: CharTokenizer, s: Sample) -> str:
    return tok.decode([t for t in s.labels if t != IGNORE])


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("kind", [k for k in TASK_KINDS if k != "recall"])
def test_facts_at_stated_positions_and_answers_labelled(kind: str, chat: bool) -> None:
    tok, mix = CharTokenizer(), _mixture()
    for seed in range(6):
        s = mix.task(kind, random.Random(seed), 2000, chat=chat, filler=seed % 2 == 0)
        assert len(s.ids) == len(s.labels)
        labelled = [i for i, t in enumerate(s.labels) if t != IGNORE]
        # labels are the tokens themselves, in one contiguous tail region after the facts
        assert all(s.labels[i] == s.ids[i] for i in labelled)
        assert labelled and labelled[0] == s.answer_start
        assert s.answer_start > max(s.fact_positions)
        text = tok.decode(s.ids)
        answer = _answer(tok, s)
        facts = [text[p:].split(".")[0] for p in s.fact_positions]
        # every fact sits at its stated position (a fact sentence begins there) ...
        for p in s.fact_positions:
            assert text[p] == " " and text[p + 1].isupper(), repr(text[p:p + 40])
        # ... and each value the answer gives comes from a fact (it is in the prompt before it)
        prompt = text[:s.answer_start]
        for value in [w.strip(".,:()\n") for w in answer.replace("<|im_end|>", " ").split()]:
            if any(ch.isdigit() for ch in value) and len(value) >= 4:
                assert any(value in f for f in facts), (value, facts)
                assert value in prompt
        assert 1500 <= len(s.ids) <= 2600


def test_depths_spread_over_the_sample() -> None:
    mix = _mixture()
    firsts = [mix.task("passkey", random.Random(i), 2000, chat=False, filler=False).fact_positions[0]
              for i in range(40)]
    assert min(firsts) < 500 and max(firsts) > 1400


@pytest.mark.parametrize("kind", ["passkey", "numbers", "uuid"])
def test_late_facts_start_in_the_last_quarter_of_their_window(kind: str) -> None:
    tok, mix = CharTokenizer(), _mixture()
    places = []
    for seed in range(20):
        s = mix.task(kind, random.Random(seed), 2000, chat=seed % 2 == 0, filler=seed % 3 == 0, late=True)
        text = tok.decode(s.ids)
        assert s.fact_positions == sorted(s.fact_positions)
        for p in s.fact_positions:
            assert text[p] == " " and text[p + 1].isupper(), repr(text[p:p + 40])   # a whole fact
            places.append(p % 256)
        assert 1500 <= len(s.ids) <= 2600
    # the clamps (fact order, haystack's ends) may hold back a few; the rest lie in [192, 256)
    late = [p for p in places if p >= 192]
    assert len(late) >= 0.9 * len(places), sorted(places)
    # drawn over the whole quarter, not one place
    assert min(late) < 208 and max(late) > 240


def test_late_share_leaves_other_runs_unchanged() -> None:
    # the draws of a mixture without late_share, in the order it made them before the option
    mix = _mixture(seed=3)
    for step in range(12):
        rng = random.Random(mix.seed * 1_000_003 + step)
        n = rng.randint(*mix.length_range(step))
        if rng.random() < mix.lm_share:
            assert mix(step).kind == "lm"
            continue
        kind = rng.choice(mix.kinds)
        want = mix.task(kind, rng, n, chat=rng.random() < mix.chat_share, filler=rng.random() < mix.filler_share)
        assert mix(step).ids == want.ids, step
    c = _mixture(seed=3, late_share=1.0, lm_share=0.0, kinds=("passkey",))
    places = [c(i).fact_positions[0] % 256 for i in range(12)]
    assert all(p >= 192 for p in places), places


def test_recall_answer_is_the_passage_from_far_back() -> None:
    tok, mix = CharTokenizer(), _mixture()
    for seed in range(8):
        for chat in (False, True):
            s = mix.task("recall", random.Random(seed), 2000, chat=chat, filler=False)
            text = tok.decode(s.ids)
            ans = _answer(tok, s).replace("<|im_end|>", "")
            start = s.fact_positions[0]
            # the recited text continues the passage that starts at the stated position
            assert text[start + 8:start + 8 + len(ans)] == ans
            assert s.answer_start > start + len(ans)


def test_lm_samples_label_all_but_the_first_window() -> None:
    mix = _mixture(lm_share=1.0)
    s = mix(0)
    assert s.kind == "lm"
    assert all(t == IGNORE for t in s.labels[:256])
    assert s.labels[256:] == s.ids[256:]


def test_lm_windows_label_only_the_last_windows() -> None:
    for n in range(6):  # lengths that end on a window boundary and inside a window
        s = _mixture(lm_share=1.0, lm_windows=2)(n)
        windows = -(-len(s.ids) // 256)
        first = max(256, (windows - 2) * 256)
        assert all(t == IGNORE for t in s.labels[:first]), len(s.ids)
        assert s.labels[first:] == s.ids[first:] and len(s.labels) > first
    assert _mixture(lm_share=1.0, lm_windows=99)(0).labels[256:] == _mixture(lm_share=1.0)(0).ids[256:]
    with pytest.raises(ValueError, match="lm_windows"):
        _mixture(lm_windows=0)


def test_draws_are_deterministic_per_step_and_mixed() -> None:
    a, b = _mixture(seed=7), _mixture(seed=7)
    assert [a(i).ids for i in range(5)] == [b(i).ids for i in range(5)]
    kinds = {a(i).kind for i in range(60)}
    assert "lm" in kinds and len(kinds) >= 5


def test_curriculum_grows_the_length_range() -> None:
    mix = _mixture(grow_steps=100, start_len=(600, 900))
    assert mix.length_range(0) == (600, 900)
    assert mix.length_range(50) == (1050, 1950)
    assert mix.length_range(100) == (1500, 3000)
    # over optimizer steps: with two samples a step, sample 100 is step 50, half-way
    two = _mixture(grow_steps=100, start_len=(600, 900), batch_size=2)
    assert two.length_range(100) == two.length_range(101) == (1050, 1950)
    assert two.length_range(200) == (1500, 3000)


def test_facts_in_memory_counts_earlier_windows() -> None:
    s = Sample([0] * 10, [IGNORE] * 10, "numbers", fact_positions=[10, 300, 700], answer_start=600)
    assert s.facts_in_memory(256) == 2


def test_memory_probe_copies_differ_only_in_the_key() -> None:
    tok = CharTokenizer()
    mix = _mixture(kinds=("passkey",))
    probe = memory_probe_samples(mix, 4, seed=3)
    base = probe[0]
    assert len({tuple(p.ids) for p in probe}) == 4          # four different keys
    keys = []
    for p in probe:
        assert len(p.ids) == len(base.ids) and p.answer_start == base.answer_start
        diff = [i for i, (a, b) in enumerate(zip(p.ids, base.ids)) if a != b]
        assert all(tok.decode([p.ids[i]]).isdigit() and tok.decode([base.ids[i]]).isdigit() for i in diff)
        assert p.facts_in_memory(mix.window) == 1              # the fact sits in an earlier window
        window_start = p.answer_start // mix.window * mix.window
        # the key nowhere in the question's raw window but in the answer
        assert (p is base or diff) and all(i < window_start or i >= p.answer_start for i in diff)
        answer = _answer(tok, p).strip().rstrip(".")
        assert answer.isdigit()
        fact = p.fact_positions[0]
        assert answer in tok.decode(p.ids[fact:fact + 200])     # the key the answer asks for
        labelled = [lab for lab in p.labels if lab != IGNORE]
        assert [t for t, lab in zip(p.ids, p.labels) if lab != IGNORE] == labelled
        keys.append(answer)
    assert len(set(keys)) == 4


def test_memory_probe_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n must be"):
        memory_probe_samples(_mixture(), 1)
    with pytest.raises(ValueError, match="passkey"):
        memory_probe_samples(_mixture(kinds=("numbers",)), 2)
    short = LongTaskMixture(CharTokenizer(), {"doc": TEXT}, window=1024, min_len=100, max_len=200,
                            kinds=("passkey",))
    with pytest.raises(ValueError, match="in memory"):
        memory_probe_samples(short, 2, max_draws=50)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="texts"):
        LongTaskMixture(CharTokenizer(), {}, 256, 10, 20)
    with pytest.raises(ValueError, match="kinds"):
        _mixture(kinds=("nope",))
    with pytest.raises(ValueError, match="lm_share"):
        _mixture(lm_share=1.5)
    with pytest.raises(ValueError, match="late_share"):
        _mixture(late_share=-0.1)


def test_evaluation_texts_are_held_out() -> None:
    train = public_domain_texts()
    held = public_domain_texts(held_out=True)
    assert not set(train) & set(held)
    names = " ".join(train).lower()
    assert "hamlet" not in names and "tempest" not in names and "_pydecimal" not in names
    assert "austen" not in names
    if any(k.startswith("kjv") for k in train):
        assert "Matthew 1:1" not in train["kjv/old-testament"]


def test_trainer_takes_task_samples_with_answer_only_loss() -> None:
    """A task sample trains on its answer tokens only; the log says what the sample was."""
    from llama_helpers import tiny_config, tiny_model

    from beacon_ops.train import TrainConfig, Trainer

    mix = LongTaskMixture(CharTokenizer(), {"doc": TEXT}, window=16, min_len=60, max_len=90, lm_share=0.0,
                          chat_share=0.0, kinds=("numbers",), seed=3)
    model = tiny_model(tiny_config(vocab_size=256), seed=0, window=16)
    tr = Trainer(model, TrainConfig(steps=2, lr=1e-2, ratios=(2, 4), checkpoint=None), mix)
    log = tr.train_step()
    s = mix(0)
    labelled = sum(t != IGNORE for t in s.labels[1:])  # position t predicts labels[t + 1]
    assert log.kind == "numbers" and log.targets == labelled > 0
    assert log.facts == len(s.fact_positions) and log.facts_in_memory == s.facts_in_memory(16)


# --- held-out answers (beacon_ops.evaluation.task_answers) ----------------------------------------
class _StubModel:
    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


@pytest.mark.parametrize("chat", [False, True])
def test_expected_answer_is_the_first_labelled_run(chat: bool) -> None:
    from beacon_ops.evaluation import expected_answer

    m = _mixture(lm_share=0.0, chat_share=float(chat), kinds=("passkey",))
    s = m(3)
    text, n = expected_answer(s, CharTokenizer())
    labelled = _answer(CharTokenizer(), s)
    if chat:   # the whole assistant turn, without its end-of-turn token and full stop
        assert labelled == text + ".<|im_end|>" and n == len(labelled)
        assert text.startswith("The ") and text.split()[-1].isdigit()
    else:      # " NNNNN." -> "NNNNN"
        assert labelled.startswith(" " + text + ".") and text.isdigit() and n == len(text) + 2
    with pytest.raises(ValueError, match="no answer"):
        expected_answer(_mixture(lm_share=1.0)(0), CharTokenizer())


def test_task_answers_score_exact_and_characters(monkeypatch) -> None:
    import beacon_ops.generation
    from beacon_ops.evaluation import expected_answer, task_answers, task_table

    tok = CharTokenizer()
    m = _mixture(lm_share=0.0, chat_share=0.0, kinds=("passkey",))
    keys = [expected_answer(m(i), tok)[0] for i in range(4)]
    replies = {0: " " + keys[0] + ".", 1: " " + keys[1][1] + keys[1][0] + keys[1][2:] + ".",
               2: " no idea", 3: " " + keys[3].upper() + "."}
    seen = []

    def fake_generate(model, ids, max_new_tokens, *, attention, progress):
        i = len(seen)
        seen.append((ids[0], max_new_tokens, attention))
        return [tok.encode(replies[i])]

    monkeypatch.setattr(beacon_ops.generation, "generate", fake_generate)
    model = _StubModel()
    res = task_answers(model, tok, m, 4, window=256, progress=False)
    assert model.resets == 4
    for i, (r, (prompt, budget, attention)) in enumerate(zip(res, seen)):
        s = m(i)
        assert prompt == s.ids[:s.answer_start] and attention == "beacon"
        assert budget == expected_answer(s, tok)[1] + 2
        assert r.expected == keys[i] and r.in_memory == (s.facts_in_memory(256) > 0)
        assert r.tokens == s.answer_start
    assert [r.correct for r in res] == [True, keys[1][0] == keys[1][1], False, True]
    assert res[0].char_accuracy == 1.0 and res[3].char_accuracy == 1.0
    if keys[1][0] != keys[1][1]:
        assert res[1].char_accuracy == pytest.approx((len(keys[1]) - 2) / len(keys[1]))
    assert res[2].char_accuracy < 0.5
    table = task_table(res)
    assert table.splitlines()[0] == "| task | fact in | exact | characters |"
    counts = [re.search(r"\((\d+)/(\d+)\)", line).groups() for line in table.splitlines()[2:]]
    assert sum(int(ok) for ok, _ in counts) == sum(r.correct for r in res)
    assert sum(int(n) for _, n in counts) == 4
    with pytest.raises(ValueError, match="language modelling"):
        task_answers(model, tok, _mixture(lm_share=1.0), 1, window=256, progress=False)
    with pytest.raises(ValueError, match="samples"):
        task_answers(model, tok, m, 0, window=256, progress=False)


def test_settings_rebuild_the_same_mixture() -> None:
    """settings() records every data setting: a mixture built from them draws the same samples;
    start_len appears only where a curriculum grows the lengths from it."""
    mix = _mixture(lm_share=0.25, chat_share=0.3, filler_share=0.6, late_share=0.5, kinds=["passkey", "uuid"],
                   lm_windows=2, grow_steps=10, start_len=(600, 900), seed=3, short_len=(400, 500),
                   short_share=0.5, batch_size=2)
    got = mix.settings()
    assert got["start_len"] == [600, 900] and got["tasks"] == ["passkey", "uuid"]
    assert (got["short_len"], got["short_share"], got["batch_size"]) == ([400, 500], 0.5, 2)
    kw = {k: v for k, v in got.items() if k not in ("tasks", "start_len")}
    kw.update(kinds=got["tasks"], start_len=tuple(got["start_len"]))
    again = LongTaskMixture(CharTokenizer(), {"doc": TEXT}, window=256, seed=3, **kw)
    for step in range(12):
        a, b = mix(step), again(step)
        assert (a.ids, a.labels) == (b.ids, b.labels)
    assert _mixture(start_len=(600, 900)).settings()["start_len"] is None
    assert _mixture(short_len=(400, 500)).settings()["short_len"] is None  # share 0: not in use


def test_short_share_draws_a_step_short_and_leaves_the_others_alone() -> None:
    """short_share of the optimizer steps (batch_size samples each) read short_len; every sample
    of a step reads the same range; the other steps' samples are the plain mixture's."""
    plain = _mixture(lm_share=1.0, seed=5)
    mix = _mixture(lm_share=1.0, seed=5, short_len=(300, 400), short_share=0.4, batch_size=3)
    short_steps = 0
    for step in range(150):
        samples = [mix(3 * step + i) for i in range(3)]
        lens = [len(s.ids) for s in samples]
        if all(300 <= n <= 400 for n in lens):
            short_steps += 1
        else:
            assert all(1500 <= n <= 3000 for n in lens), lens
            for i, a in enumerate(samples):
                b = plain(3 * step + i)
                assert (a.ids, a.labels) == (b.ids, b.labels)
    assert 0.25 <= short_steps / 150 <= 0.55, short_steps  # 0.4 +- 3 sd of a binomial's share
    with pytest.raises(ValueError, match="short_len"):
        _mixture(short_share=0.5)
    with pytest.raises(ValueError, match="short_len"):
        _mixture(short_len=(500, 400), short_share=0.5)
    with pytest.raises(ValueError, match="batch_size"):
        _mixture(batch_size=0)
