"""Reading documents with :class:`~beacon_ops.llama.Llama`: prefill, decoding, sampling, loss.

A :class:`Session` holds one batch of documents being read: the cache and how many raw tokens
of each sequence were read. Every function here drives :meth:`Llama.step`; step sizes come from
the cache (``room``): a window takes ``W`` raw tokens, later windows ``S`` (stride), so prefill
runs window by window and generation (one token per step) completes windows exactly as prefill
does.

Choices the algorithm leaves open (``docs/activation-beacon.md``), written down here:

* condensing ratio: fixed (``BeaconConfig.ratio = r``) or adapt-N (``ratio=None``): decided once
  per sequence when its first window fills, from ``L`` = tokens known then (its whole prompt at
  prefill) with ``adapt_n`` tokens allowed for generation, and handed to the cache, which owns
  it; a ratio that does not divide the stride is an error.
* :func:`sequence_loss` returns the mean next-token loss over raw tokens, labels shifted once
  over the whole sequence; beacon rows get no logits, and logits are computed in chunks only for
  positions that have a target.
* A warning is issued once per session when a RoPE position exceeds the trained context.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .condensed_cache import CondensedKVCache, adapt_ratio
from .full_cache import FullKVCache
from .kv_cache import KVCache, check_ratio
from .llama import Llama, check_token_ids

__all__ = ["Session", "ATTENTION_KINDS", "ratio_for_length", "new_session", "prefill", "extend", "decode_step",
           "sample", "generate", "generate_from", "sequence_loss"]

ATTENTION_KINDS = ("beacon", "full", "sliding")
Ids = Tensor | Sequence[Sequence[int]] | Sequence[Tensor]


@dataclass
class Session:
    """The documents a model is reading: their cache and the raw tokens read per sequence."""

    cache: KVCache
    attention: str
    seen: list[int]
    warned: bool = False


def ratio_for_length(model: Llama, total: int) -> int:
    """The condensing ratio of a sequence of ``total`` known tokens (fixed, or adapt-N)."""
    b = model.beacon
    if b.ratio is not None:
        return b.ratio
    context = model.trained_context if b.adapt_context is None else min(model.trained_context, b.adapt_context)
    if b.adapt_ratios is not None:
        return adapt_ratio(total, context, b.window, b.adapt_n, b.adapt_ratios)
    return check_ratio(adapt_ratio(total, context, b.window, b.adapt_n), b.stride)


def new_session(model: Llama, lengths: Sequence[int], extra_tokens: int = 0, *,
                attention: str = "beacon") -> Session:
    """Start reading ``len(lengths)`` sequences of these prompt lengths (``model.session``).

    ``attention``: ``"beacon"`` (the condensed cache), ``"full"`` (plain causal attention) or
    ``"sliding"`` (plain attention over the last ``window`` raw tokens, no memory).
    ``extra_tokens``: room for generated tokens.
    """
    c, b = model.config, model.beacon
    longest = max(lengths) + extra_tokens
    common = dict(dtype=model.dtype, device=model.device, inv_freq=model.inv_freq,
                  rope_interleaved=c.rope_interleaved)
    if attention == "beacon":
        # the smallest ratio any sequence can get needs the most room
        r_min = min(ratio_for_length(model, n) for n in lengths)
        cap = CondensedKVCache.capacity_for(longest, b.window, b.stride, r_min, 0, sink_size=b.sink_size,
                                            placement=b.placement, sink_recapture=b.sink_recapture)
        mode, attend_previous = b.attention_mask_kind
        cache: KVCache = CondensedKVCache(c.num_layers, len(lengths), c.num_kv_heads, c.head_dim, cap,
                                          window=b.window, stride=b.stride, mode=mode,
                                          attend_previous=attend_previous, placement=b.placement,
                                          sink_size=b.sink_size, sink_recapture=b.sink_recapture, **common)
    elif attention in ("full", "sliding"):
        cache = FullKVCache(c.num_layers, len(lengths), c.num_kv_heads, c.head_dim, longest, chunk=b.window,
                            sliding_window=b.window if attention == "sliding" else None, **common)
    else:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    model.session = Session(cache, attention, [0] * len(lengths))
    return model.session


def _step(model: Llama, chunks: list[Tensor], known_len: Sequence[int]) -> list[Tensor]:
    """One step of the session; ``known_len[b]``: input length known for ``b`` (for adapt-N)."""
    s: Session = model.session
    # The ratio is due before the step that fills a window, or, with interleaved beacons (which
    # also go into windows that are not full), before a sequence's first step.
    early = s.attention == "beacon" and model.beacon.placement == "interleave"
    for b, ch in enumerate(chunks):
        if len(ch) and (early or len(ch) >= s.cache.room(b)) and not s.cache.has_ratio(b):
            s.cache.set_ratio(b, ratio_for_length(model, known_len[b]))
    hidden = model.step(s.cache, chunks)
    for b, ch in enumerate(chunks):
        s.seen[b] += len(ch)
    if any(len(ch) for ch in chunks):
        _warn_positions(model, s)
    return hidden


def _warn_positions(model: Llama, s: Session) -> None:
    top, limit = s.cache.max_position(), model.trained_context
    if not s.warned and top >= limit:  # trained positions are 0 .. limit - 1
        s.warned = True
        hint = ("the condensed memory outgrew the trained context (use adapt-N or a larger ratio)"
                if s.attention == "beacon" else "the input is longer than the trained context")
        warnings.warn(f"RoPE positions reach {top}, beyond the model's max_position_embeddings "
                      f"({limit}): {hint}; quality will degrade", RuntimeWarning, stacklevel=4)


def _as_list(ids: Ids, what: str = "ids") -> list[Tensor]:
    if isinstance(ids, Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"{what} must be [length] or [batch, length], got shape {tuple(ids.shape)}")
        return [row for row in ids]
    out = [torch.as_tensor(x, dtype=torch.long) for x in ids]
    if not out:
        raise ValueError(f"{what}: empty batch")
    return out


def _checked(model: Llama, ids: Ids) -> list[Tensor]:
    seqs = _as_list(ids)
    for b, x in enumerate(seqs):
        if len(x) == 0:
            raise ValueError(f"ids: sequence {b} is empty")
        check_token_ids(x, model.config.vocab_size, f"ids[{b}]")
    return seqs


def _feed(model: Llama, seqs: list[Tensor], *, progress: bool | None,
          on_hidden: Callable[[int, int, Tensor], None], known: Sequence[int] | None = None,
          whole_steps: bool = False) -> None:
    """Feed sequences step by step; ``on_hidden(b, start, hidden)`` per sequence chunk.

    ``known[b]``: the length of sequence ``b``'s whole input (for adapt-N; default: what was read
    before plus ``seqs[b]``). ``whole_steps``: stop a sequence before a step that its remaining
    tokens would not fill, so that reading the rest later makes the same steps as reading it all
    at once (the session then holds fewer tokens than given: see ``session.seen``).
    """
    s = model.session
    pos = [0] * len(seqs)
    if known is None:
        known = [s.seen[b] + len(x) for b, x in enumerate(seqs)]
    total = sum(len(x) for x in seqs)
    bar = None
    if progress or (progress is None and total > 4 * model.beacon.window):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="tok", desc="prefill", leave=False)
    while True:
        chunks = []
        for b, x in enumerate(seqs):
            n = min(len(x) - pos[b], s.cache.room(b))
            if whole_steps and n < s.cache.room(b):
                n = 0
            chunks.append(x[pos[b]:pos[b] + n].to(model.device))
        if not any(len(ch) for ch in chunks):
            break
        hidden = _step(model, chunks, known)
        for b, hb in enumerate(hidden):
            if len(hb):
                on_hidden(b, pos[b], hb)
            pos[b] += len(chunks[b])
        if bar is not None:
            bar.update(sum(len(ch) for ch in chunks))
    if bar is not None:
        bar.close()


def _chunked_logits(model: Llama, h: Tensor) -> Tensor:
    n = model.logits_chunk
    return torch.cat([model.logits(h[i:i + n]) for i in range(0, len(h), n)])


@torch.no_grad()
def prefill(model: Llama, ids: Ids, *, extra_tokens: int = 0, logits: str = "last",
            attention: str = "beacon", progress: bool | None = None) -> list[Tensor] | Tensor:
    """Read prompts (any length; a batch may have different lengths) from an empty cache.

    ``logits``: ``"last"`` -> ``[batch, vocab]`` for each sequence's last token; ``"all"`` ->
    a list of ``[length, vocab]`` (small inputs only); ``"none"`` -> nothing.
    ``extra_tokens`` reserves cache room for that many generated tokens per sequence.
    """
    seqs = _checked(model, ids)
    if logits not in ("last", "all", "none"):
        raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
    new_session(model, [len(x) for x in seqs], extra_tokens, attention=attention)
    out: list[list[Tensor]] = [[] for _ in seqs]

    def keep(b: int, start: int, h: Tensor) -> None:
        if logits == "all":
            out[b].append(_chunked_logits(model, h))
        elif logits == "last" and start + len(h) == len(seqs[b]):
            out[b].append(model.logits(h[-1:]))

    _feed(model, seqs, progress=progress, on_hidden=keep)
    if logits == "none":
        return []
    if logits == "last":
        return torch.cat([o[0] for o in out])
    return [torch.cat(o) for o in out]


@torch.no_grad()
def extend(model: Llama, ids: Ids, *, logits: str = "last", known_lengths: Sequence[int] | None = None,
           whole_steps: bool = False, progress: bool | None = None) -> Tensor | None:
    """Read more of each sequence into the current session (after :func:`new_session`, or a
    copy of a session saved after reading a shared prefix). When what was read before was read
    in whole steps, this makes the steps :func:`prefill` of the whole input makes: the same
    hidden states, bit for bit.

    ``ids``: one piece per sequence of the session (empty allowed). ``known_lengths``: each
    sequence's whole input length, which sets adapt-N's ratio (default: read so far plus
    ``ids``). ``whole_steps``: read only whole steps (a window, later a stride) and leave the
    rest, so that the session can be copied and continued with different inputs; how much was
    read is ``model.session.seen``. ``logits``: ``"last"`` -> ``[batch, vocab]`` of the last
    token read (sequences that read nothing: NaN rows) or ``"none"`` -> None.
    Arguments are checked before anything is read; a step that fails later (a cache too small
    for the input: size it with :func:`new_session`'s ``extra_tokens``) leaves the steps before
    it read, so start a new session (or copy a saved one) after an error.
    """
    s = model.session
    if s is None:
        raise RuntimeError("extend: start a session first (new_session)")
    if logits not in ("last", "none"):
        raise ValueError(f"logits must be 'last' or 'none', got {logits!r}")
    seqs = _as_list(ids)
    if len(seqs) != len(s.seen):
        raise ValueError(f"ids: expected {len(s.seen)} sequences (the session's batch), got {len(seqs)}")
    for b, x in enumerate(seqs):
        check_token_ids(x, model.config.vocab_size, f"ids[{b}]")
    if known_lengths is not None:
        if len(known_lengths) != len(seqs):
            raise ValueError(f"known_lengths: expected {len(seqs)} entries, got {len(known_lengths)}")
        for b, (n, x) in enumerate(zip(known_lengths, seqs)):
            if n < s.seen[b] + len(x):
                raise ValueError(f"known_lengths[{b}]={n} is less than the {s.seen[b] + len(x)} tokens read")
    out = torch.full((len(seqs), model.config.vocab_size), float("nan"), dtype=model.dtype, device=model.device)

    ends = [None if whole_steps else len(x) for x in seqs]

    def keep(b: int, start: int, h: Tensor) -> None:
        # only a sequence's last chunk (whole steps: which chunk is last is known only afterwards)
        if logits == "last" and (ends[b] is None or start + len(h) == ends[b]):
            out[b] = model.logits(h[-1:])[0]

    _feed(model, seqs, progress=progress, on_hidden=keep, known=known_lengths, whole_steps=whole_steps)
    return out if logits == "last" else None


@torch.no_grad()
def decode_step(model: Llama, tokens: Sequence[int | None]) -> Tensor:
    """Append one token per sequence (None = skip that sequence) after :func:`prefill`.

    Returns ``[batch, vocab]`` logits of the appended tokens (rows of skipped sequences are
    undefined: NaN). A step that fills a window also processes its beacons, then compacts.
    """
    s = model.session
    if s is None:
        raise RuntimeError("decode_step: call prefill first")
    if len(tokens) != len(s.seen):
        raise ValueError(f"tokens: expected {len(s.seen)} entries (the batch), got {len(tokens)}")
    chunks = [torch.tensor([] if t is None else [int(t)], dtype=torch.long, device=model.device)
              for t in tokens]
    for b, ch in enumerate(chunks):
        check_token_ids(ch, model.config.vocab_size, f"tokens[{b}]")
    hidden = _step(model, chunks, [n + 1 for n in s.seen])
    out = torch.full((len(tokens), model.config.vocab_size), float("nan"), dtype=model.dtype,
                     device=model.device)
    for b, hb in enumerate(hidden):
        if len(hb):
            out[b] = model.logits(hb[-1:])[0]
    return out


def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """Greedy (``temperature == 0``) or temperature + nucleus (top-p) sampling, per row."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: Llama, ids: Ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None, attention: str = "beacon",
             generator: torch.Generator | None = None, progress: bool | None = None) -> list[list[int]]:
    """Prefill ``ids`` and generate up to ``max_new_tokens`` per sequence.

    Stops a sequence at an EOS token (default: the config's; the EOS is included in the
    output) or at the budget. Returns the new tokens of each sequence.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    logits = prefill(model, ids, extra_tokens=max_new_tokens, attention=attention, progress=progress)
    return generate_from(model, logits, max_new_tokens, temperature=temperature, top_p=top_p,
                         eos_token_id=eos_token_id, generator=generator)


@torch.no_grad()
def generate_from(model: Llama, logits: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                  top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """:func:`generate` after the prompts were read (:func:`prefill` or :func:`extend`):
    ``logits`` ``[batch, vocab]`` are those of each prompt's last token."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = set(model.config.eos_ids if eos_token_id is None else
              ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
    n = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    active = [max_new_tokens > 0] * n
    while True:
        nxt = sample(logits, temperature, top_p, generator).tolist()
        step: list[int | None] = []
        for b in range(n):
            if active[b]:
                out[b].append(nxt[b])
                if nxt[b] in eos or len(out[b]) >= max_new_tokens:
                    active[b] = False
            step.append(nxt[b] if active[b] else None)
        if not any(active):
            return out
        logits = decode_step(model, step)


def sequence_loss(model: Llama, ids: Ids, labels: Ids | None = None, *, attention: str = "beacon",
                  progress: bool | None = None) -> Tensor:
    """Mean next-token cross-entropy over raw tokens (perplexity = exp of it).

    ``labels`` (default: ``ids``) align with ``ids``; they are shifted once over the whole
    sequence (the target of position t is ``labels[t + 1]``), and positions whose target is
    -100 are ignored. Logits are computed only where a target exists, in chunks of
    ``model.logits_chunk`` rows. Starts a fresh session. Meant for evaluation (call it under
    ``torch.no_grad()``): the in-place caches carry no gradient to earlier windows (training:
    :func:`beacon_ops.training.beacon_loss`).
    """
    seqs = _as_list(ids)
    labs = seqs if labels is None else _as_list(labels, "labels")
    if len(labs) != len(seqs) or any(len(a) != len(b) for a, b in zip(seqs, labs)):
        raise ValueError("labels must have the same shape as ids")
    seqs = _checked(model, seqs)
    targets = [torch.cat([lb[1:], lb.new_full((1,), -100)]).to(model.device) for lb in labs]
    new_session(model, [len(x) for x in seqs], attention=attention)
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    count = 0

    def add(b: int, start: int, h: Tensor) -> None:
        nonlocal total, count
        t = targets[b][start:start + len(h)]
        keep = (t != -100).nonzero()[:, 0]
        for i in range(0, len(keep), model.logits_chunk):
            sel = keep[i:i + model.logits_chunk]
            lg = model.logits(h[sel]).float()
            total = total + F.cross_entropy(lg, t[sel], reduction="sum").double()
            count += len(sel)

    _feed(model, seqs, progress=progress, on_hidden=add)
    if count == 0:
        raise ValueError("labels: no position has a target (all -100 or length 1)")
    return (total / count).float()
