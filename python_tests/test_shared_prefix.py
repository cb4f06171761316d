"""Reading a shared prefix once: ``generation.extend`` in whole steps, a copy of the session, the
rest read from the copy; against ``prefill`` of the whole input (bit for bit), and
``evaluation.passkey_grid`` with and without sharing (the same results)."""
from __future__ import annotations

import copy

import pytest
import torch

from beacon_ops import generation
from beacon_ops.checkpoints import ByteTokenizer
from beacon_ops.evaluation import passkey_grid
from beacon_ops.generation import extend, generate, generate_from, new_session, prefill

from llama_helpers import tiny_config, tiny_model

VARIANTS = {
    "append, adapt-N": dict(window=16, adapt_n=8),
    "append, stride 8, r = 4": dict(window=16, stride=8, ratio=4),
    "interleave + sink (v3)": dict(variant="v3", window=16, ratio=2),
}


def _inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 101, (n,), generator=g)


@pytest.mark.parametrize("attention", ["beacon", "full", "sliding"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_extend_from_a_copied_session_is_prefill_bit_for_bit(variant, attention):
    if attention != "beacon" and variant != "append, adapt-N":
        pytest.skip("plain caches have no beacon variant")
    model = tiny_model(**VARIANTS[variant])
    a, b = _inputs(150, 1), _inputs(150, 1)
    b[90:] = _inputs(60, 2)
    a[90], b[90] = 5, 6  # a and b agree on their first 90 tokens, then differ
    b = b[:140]          # and differ in length
    want = {}
    for name, ids in (("a", a), ("b", b)):
        want[name] = (prefill(model, [ids], extra_tokens=4, attention=attention),
                      generate(model, [ids], 4, attention=attention))
        model.reset()
    new_session(model, [150], 4, attention=attention)
    extend(model, [a[:90]], logits="none", known_lengths=[150], whole_steps=True)
    read = model.session.seen[0]
    assert read <= 90 and read % 8 == 0 and read >= 16  # stopped at a whole step before 90
    saved = copy.deepcopy(model.session)
    for name, ids in (("a", a), ("b", b)):
        model.session = copy.deepcopy(saved)
        logits = extend(model, [ids[read:]], known_lengths=[len(ids)])
        assert torch.equal(logits, want[name][0]), name
        assert generate_from(model, logits, 4) == want[name][1], name
        model.reset()


def test_extend_rejects_bad_calls():
    model = tiny_model(window=16, ratio=4)
    with pytest.raises(RuntimeError, match="new_session"):
        extend(model, [[5, 6]])
    new_session(model, [40], attention="beacon")
    with pytest.raises(ValueError, match="ids: expected 1 sequences"):
        extend(model, [[5], [6]])
    with pytest.raises(ValueError, match="known_lengths\\[0\\]=3"):
        extend(model, [[5] * 10], known_lengths=[3])
    with pytest.raises(ValueError, match="logits"):
        extend(model, [[5]], logits="all")
    with pytest.raises(ValueError, match="ids\\[0\\]"):
        extend(model, [[500]])
    assert model.session.seen == [0]  # nothing read by the failed calls
    logits = extend(model, [[5] * 10], whole_steps=True)
    assert model.session.seen == [0] and torch.isnan(logits).all()  # 10 tokens do not fill a window


def test_passkey_grid_shares_prefixes_with_the_same_results(monkeypatch):
    tok = ByteTokenizer()
    model = tiny_model(tiny_config(vocab_size=256), window=64, adapt_n=64)  # byte tokens
    models = {"beacon": (model, "beacon"), "sliding": (model, "sliding"), "full": (model, "full")}
    args = dict(lengths=[600, 900], depths=[0, 0.5, 1], keys=2, seed=3, max_tokens={"full": 600},
                max_new_tokens=5, progress=False)
    # every prompt's last logits (generate calls generate_from too): the same bits both ways
    seen: list[torch.Tensor] = []

    def spy(model, logits, *a, **kw):
        seen.append(logits.clone())
        return real(model, logits, *a, **kw)

    real = generation.generate_from
    monkeypatch.setattr(generation, "generate_from", spy)
    shared = passkey_grid(models, tok, share_prefix=True, **args)
    shared_logits, seen[:] = seen[:], []
    plain = passkey_grid(models, tok, share_prefix=False, **args)
    assert len(seen) == len(shared_logits) == len(plain)
    assert all(torch.equal(s, p) for s, p in zip(shared_logits, seen))
    key = lambda r: (r.method, r.length, r.depth, r.key)  # noqa: E731
    assert [key(r) for r in shared] == [key(r) for r in plain] and len(shared) == 2 * 3 * 2 * 2 + 3 * 2
    for s, p in zip(shared, plain):
        assert (s.answer, s.tokens, s.ratio) == (p.answer, p.tokens, p.ratio), key(s)
    assert {r.ratio for r in shared if r.method == "beacon"} - {0} and len({r.answer for r in shared}) > 1
    # what each prompt read: all of it without sharing; with it, the filler once a group
    assert all(p.read == p.tokens for p in plain)
    assert all(0 < s.read <= s.tokens for s in shared)
    for method, n in {(r.method, r.length) for r in shared}:
        group = [r for r in shared if (r.method, r.length) == (method, n)]
        assert group[0].read == group[0].tokens and sum(r.read for r in group) < 0.7 * sum(r.tokens for r in group)
