"""Beacon-only training with mixed ratios (``docs/activation-beacon.md``, sections 6-7).

The base LLM is frozen; only ``beacon_embed_tokens`` and the chosen ``beacon_{q,k,v,o}_proj``
are trained (full matrices, or low-rank deltas from the base projections with ``rank``; see
:mod:`beacon_ops.adapter`). Every step reads one chunk of text window by window
(:func:`beacon_ops.training.beacon_loss`: memory not detached, ratios ``step-random`` with one
generator seeded 42), with AdamW, linear warm-up then linear decay to zero, gradient clipping and
optional autocast (the frozen projections then stored in its dtype, the trained tensors in
fp32). Only the trained tensors are saved (safetensors, settings in the metadata), with the
optimizer state next to them (``PATH.state.pt``) so that a resumed run continues exactly: chunks
are drawn from a generator seeded by ``(seed, step)``.

A step's batch is token ids (language modelling on every token), an ``(ids, labels)`` pair, or
a :class:`beacon_ops.long_tasks.Sample` (e.g. a synthetic long-context task with loss on its
answer only); the training data and its held-out evaluation texts are described in
:mod:`beacon_ops.long_tasks`. Jane Austen, an evaluation text, is never a default.

An optimizer step reads ``batch_size`` samples (gradient accumulation). In a ``torch.distributed``
process group (:mod:`beacon_ops.distributed`, e.g. under ``torchrun``) they are shared among the
ranks and the beacon gradients summed with one all-reduce; the samples and ratios of a step do
not depend on the world size, so a run (and its resumption) gives the same result on any number
of processes, up to fp32 rounding.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import build_info
from .adapter import (adapter_layout, cast_frozen_projections, load_adapter_into_higher_rank,
                      load_beacon_adapter, low_rank_dim, make_beacon_trainable, read_adapter_config,
                      save_beacon_adapter)
from .distributed import Distributed
from .llama import BEACON_PROJS, Llama
from .long_tasks import Sample, kjv_text, shakespeare_files
from .training import (DISTILL_ON, STEP_RANDOM_RATIOS, StepRandomRatios, beacon_loss, gradient_windows,
                       ratio_draws, teacher_states)

__all__ = ["TrainConfig", "TextSampler", "Trainer", "StepLog", "default_texts", "kjv_text", "lr_factor",
           "cpu_has_native_bf16"]

# CPU instruction-set levels (build_info's names) that multiply bf16 natively
NATIVE_BF16_ISAS = ("avx512bf16", "amx")


def cpu_has_native_bf16(isa: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (AVX-512-BF16 or AMX; without, bf16 autocast
    training takes ~10x fp32's time). ``isa``: a level by build_info's names; default: this CPU's
    detected one, not the kernels' (``BEACON_OPS_CPU_ISA`` may cap those), as torch's bf16
    matmuls, most of a training step, follow the hardware."""
    if isa is None:
        isa = build_info()["cpu_isa_detected"]
    return isa in NATIVE_BF16_ISAS


# --- data -------------------------------------------------------------------------------------
default_texts = shakespeare_files  # the plays; beacon_ops.long_tasks.public_domain_texts has all


class TextSampler:
    """Random chunks of ``min_len``..``max_len`` tokens from tokenized documents.

    Chunk ``step`` is drawn with a generator seeded by ``(seed, step)``: a resumed run reads the
    same chunks as an uninterrupted one. A document is chosen with probability proportional to
    its length; documents shorter than ``min_len`` are dropped.
    """

    def __init__(self, docs: Sequence[Sequence[int]], min_len: int, max_len: int, seed: int = 42) -> None:
        if not 2 <= min_len <= max_len:
            raise ValueError(f"need 2 <= min_len <= max_len, got {min_len}, {max_len}")
        self.docs = [torch.as_tensor(d, dtype=torch.long) for d in docs if len(d) >= min_len]
        if not self.docs:
            raise ValueError(f"no document has at least min_len={min_len} tokens")
        self.min_len, self.max_len, self.seed = min_len, max_len, seed
        self.weights = torch.tensor([float(len(d)) for d in self.docs])

    @property
    def num_tokens(self) -> int:
        return sum(len(d) for d in self.docs)

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        d = self.docs[int(torch.multinomial(self.weights, 1, generator=g))]
        n = int(torch.randint(self.min_len, min(self.max_len, len(d)) + 1, (1,), generator=g))
        start = int(torch.randint(0, len(d) - n + 1, (1,), generator=g))
        return d[start:start + n]


# --- training -----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings of a beacon training run (stored in the adapter's metadata)."""

    steps: int
    lr: float = 5e-5
    warmup: int = 0                   # steps of linear warm-up
    weight_decay: float = 0.0
    clip: float = 1.0                 # gradient-norm clipping (0 = off)
    params: tuple[str, ...] = BEACON_PROJS
    rank: int = 0                     # 0: full beacon matrices; > 0: low-rank deltas
    reader_rank: int = 0              # > 0: a reader of this rank (beacon_ops.memory_reading) trained too
    reader_lr: float | None = None    # the reader's peak learning rate (None: lr)
    added_rank_lr: float | None = None  # grown adapters (start_from a lower rank): the added
    # rank's peak learning rate (None: lr); the trained rank keeps lr
    ratios: tuple[int, ...] = STEP_RANDOM_RATIOS
    ratio_seed: int = 42
    seed: int = 42
    checkpoint: str | None = "window"
    autocast: str | None = None       # "bfloat16" / "float16" autocast dtype, None = off
    attention: str = "auto"           # beacon_loss's attention backend
    grad_windows: int | None = None   # None: backpropagate through every window; N: only through
    # those with a target or a fact and N others drawn per sample (training.gradient_windows)
    batch_size: int = 1               # samples per optimizer step, over all ranks together
    distill: float = 0.0              # > 0: full attention teaches the targets of samples it can read
    # (up to the model's trained context), this weight on the distance (training.teacher_states)
    distill_on: str = "layers"        # what it teaches: "layers" (every layer's output,
    # training.distill_distance) or "logits" (the next-token distribution, training.logit_divergence)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class StepLog:
    step: int
    loss: float
    loss_after_first: float
    tokens: int
    ratios: list[int]
    lr: float
    grad_norm: float
    seconds: float
    kind: str = "lm"              # what the sample was (see beacon_ops.long_tasks)
    facts_in_memory: int = 0      # facts its answers need that lay in condensed memory
    facts: int = 0                # facts its answers need
    targets: int = 0              # labelled tokens
    distill: float = 0.0          # mean distillation term of the distilled samples' targets
    distilled: int = 0            # samples read with a teacher


class Trainer:
    """Beacon-only training of ``model`` (frozen except the beacon parameters).

    ``batches(step)`` gives step ``step``'s token ids, an ``(ids, labels)`` pair (labels ``-100``
    where there is no loss) or a :class:`~beacon_ops.long_tasks.Sample`. :meth:`run` trains up to
    ``config.steps``; :meth:`save` / :meth:`resume` write and read the adapter plus the optimizer
    state, so that a resumed run is bit-identical to an uninterrupted one (same device).
    """

    def __init__(self, model: Llama, config: TrainConfig, batches: Callable[[int], Any],
                 meta: dict[str, Any] | None = None, dist: Distributed | None = None) -> None:
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        if not config.distill >= 0:
            raise ValueError(f"distill must be >= 0, got {config.distill}")
        if config.distill_on not in DISTILL_ON:
            raise ValueError(f"distill_on must be one of {DISTILL_ON}, got {config.distill_on!r}")
        if config.distill and config.reader_rank:
            raise ValueError("distill: a reader changes how raw tokens read memory, the teacher's too; "
                             "train it without distillation")
        self.model, self.config, self.batches = model, config, batches
        self.dist = dist or Distributed.current()
        self.meta = dict(meta or {})
        self.trainable = make_beacon_trainable(model, config.params, config.rank, seed=config.seed,
                                               reader_rank=config.reader_rank)
        if config.autocast:  # the frozen base once in the autocast dtype, not cast per matmul
            cast_frozen_projections(model, getattr(torch, config.autocast))
        # two groups when a reader has its own rate (a reader starts at zero; the beacon side may
        # continue a trained adapter at a lower rate)
        reader = [p for n, p in self.trainable if ".beacon_reader_" in n]
        groups = [{"params": [p for n, p in self.trainable if ".beacon_reader_" not in n]}]
        if reader and config.reader_lr is not None:
            groups.append({"params": reader})
        else:
            groups[0]["params"] += reader
        self.opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = StepRandomRatios(config.ratios, config.ratio_seed, model.beacon.stride)
        self.dist.broadcast_([p for _, p in self.trainable])   # every rank starts from rank 0's
        self.step = 0
        self.history: list[StepLog] = []

    def train_step(self) -> StepLog:
        """One optimizer step over ``config.batch_size`` samples, shared among the ranks.

        Sample ``i`` of step ``s`` is ``batches(s * batch_size + i)``; rank ``r`` of ``w`` reads
        ``i = r, r + w, ...`` and accumulates the gradients of their mean loss, which one
        all-reduce then sums. Each sample draws its ratios from the shared ratio generator at
        the position after the draws of samples ``0 .. i-1``
        (:func:`~beacon_ops.training.ratio_draws`), so the samples, ratios and summed gradient of
        a step do not depend on the world size.
        """
        c, model, d = self.config, self.model, self.dist
        t0 = time.perf_counter()
        factor = lr_factor(self.step, c.warmup, c.steps)
        lr = c.lr * factor
        for i, grp in enumerate(self.opt.param_groups):  # group 1: the reader at its own rate
            grp["lr"] = lr if i == 0 else c.reader_lr * factor
        size, first = c.batch_size, self.step * c.batch_size
        mine = [(i, *self._batch(first + i)) for i in d.shard(size)]
        lengths = dict(kv for part in d.all_gather([(i, len(ids)) for i, ids, _, _ in mine]) for kv in part)
        window = model.beacon.window
        draws = [ratio_draws(lengths[i], model.beacon) for i in range(size)]
        start_state = self.sampler.generator.get_state()
        model.train()
        ctx = (torch.autocast(model.device.type, dtype=getattr(torch, c.autocast)) if c.autocast
               else torch.autocast(model.device.type, enabled=False))
        self.opt.zero_grad(set_to_none=True)
        records = []
        for i, ids, labels, sample in mine:
            self._seek_ratios(start_state, sum(draws[:i]))
            teacher = None
            if c.distill and len(ids) <= model.trained_context:
                with ctx:
                    teacher = teacher_states(model, ids, labels, attention="masked" if c.attention == "masked" else "op",
                                             last_layer_only=c.distill_on == "logits")
            with ctx:
                out = beacon_loss(model, ids.to(model.device), labels, ratio=self.sampler,
                                  checkpoint=c.checkpoint, attention=c.attention,
                                  grad_windows=self._grad_windows(first + i, ids, labels, sample),
                                  teacher=teacher, distill=c.distill, distill_on=c.distill_on)
            if len(out.ratios) != draws[i]:
                raise RuntimeError(f"sample {first + i} drew {len(out.ratios)} ratios, expected {draws[i]}")
            if out.loss.requires_grad:  # not when truncation kept no window whose beacons it reads
                (out.loss if size == 1 else out.loss / size).backward()
            facts = (sample.kind, sample.facts_in_memory(window), len(sample.fact_positions)) \
                if sample is not None else ("lm", 0, 0)
            records.append((i, out.cross_entropy(), out.loss_after_first_window(), len(ids),
                            out.ratios, *facts, sum(out.window_counts), out.distill(), teacher is not None))
        self._seek_ratios(start_state, sum(draws))
        params = [p for _, p in self.trainable]
        d.sum_grads(params)
        if c.clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, c.clip))
        else:
            norms = [p.grad.norm() for p in params if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        self._optimizer_step()
        self.step += 1
        records = sorted(r for part in d.all_gather(records) for r in part)
        later = [r[2] for r in records if r[2] == r[2]]   # NaN: a sample of one window
        taught = [r[9] for r in records if r[10]]
        log = StepLog(self.step, sum(r[1] for r in records) / size,
                      sum(later) / len(later) if later else float("nan"), sum(r[3] for r in records),
                      [x for r in records for x in r[4]], lr, norm, time.perf_counter() - t0,
                      ",".join(r[5] for r in records), sum(r[6] for r in records),
                      sum(r[7] for r in records), sum(r[8] for r in records),
                      sum(taught) / len(taught) if taught else 0.0, len(taught))
        self.history.append(log)
        return log

    def _optimizer_step(self) -> None:
        """``opt.step()``; with ``added_rank_lr`` the updates of a grown adapter's added rank
        (``lora_A``'s rows and ``lora_B``'s columns from ``init_rank`` on) are scaled by
        ``added_rank_lr / lr``. AdamW's update is elementwise, so this is that rate for those
        entries exactly: the added factors live in the same tensors as the trained ones, and
        at a continuation's low rate they would hardly leave zero."""
        c = self.config
        if c.added_rank_lr is None or c.added_rank_lr == c.lr or c.lr == 0:
            self.opt.step()
            return
        if "init_rank" not in self.meta:
            raise ValueError("added_rank_lr needs a grown adapter (start_from one of a lower rank)")
        r, scale = int(self.meta["init_rank"]), c.added_rank_lr / c.lr
        added = [p.detach().narrow(dim, r, p.shape[dim] - r) for n, p in self.trainable
                 if ".beacon_reader_" not in n and (dim := low_rank_dim(n)) is not None]
        before = [a.clone() for a in added]
        self.opt.step()
        with torch.no_grad():
            for a, b in zip(added, before):
                a.copy_(b + (a - b) * scale)

    def _grad_windows(self, index: int, ids: torch.Tensor, labels: torch.Tensor | None,
                      sample: Sample | None) -> set[int] | None:
        """Sample ``index``'s windows to backpropagate through (``config.grad_windows``); the
        random ones are drawn from the run's seed and the sample's index, so a resumed run and
        any number of processes draw the same."""
        if self.config.grad_windows is None:
            return None
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        return gradient_windows(len(ids), self.model.beacon.window, ids if labels is None else labels,
                                sample.fact_positions if sample is not None else (),
                                others=self.config.grad_windows, generator=gen)

    def _seek_ratios(self, start_state: torch.Tensor, draws: int) -> None:
        """Put the ratio generator ``draws`` draws after ``start_state``."""
        self.sampler.generator.set_state(start_state)
        for _ in range(draws):
            self.sampler()

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, Sample | None]:
        batch = self.batches(step)
        if isinstance(batch, Sample):
            return torch.tensor(batch.ids), torch.tensor(batch.labels), batch
        if isinstance(batch, (tuple, list)):
            ids, labels = batch
            return torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long), None
        return torch.as_tensor(batch, dtype=torch.long), None, None

    def run(self, *, progress: bool = True, on_step: Callable[[StepLog], None] | None = None,
            save_every: int = 0, save_path: str | None = None,
            time_limit: float | None = None) -> list[StepLog]:
        """Train up to ``config.steps``, or until ``time_limit`` seconds have passed (checked
        between steps, on rank 0's clock for all ranks); saves every ``save_every`` steps to
        ``save_path``. With several ranks every rank calls it; the progress bar and ``on_step``
        are rank 0's."""
        t_start = time.perf_counter()
        main = self.dist.is_main
        bar = None
        if progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.config.steps, initial=self.step, desc="train", unit="step")
        ema = None
        while self.step < self.config.steps:
            late = main and time_limit is not None and time.perf_counter() - t_start >= time_limit
            if self.dist.any(late, self.model.device):
                break
            log = self.train_step()
            if on_step and main:
                on_step(log)
            if save_every and save_path and self.step % save_every == 0:
                self.save(save_path)
            if bar is not None:
                ema = log.loss if ema is None else 0.9 * ema + 0.1 * log.loss
                bar.set_postfix(loss=f"{log.loss:.3f}", ema=f"{ema:.3f}",
                                later=f"{log.loss_after_first:.3f}",
                                tok_s=f"{log.tokens / log.seconds:.0f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        return self.history

    # --- save / resume ----------------------------------------------------------------------------
    def adapter_config(self) -> dict[str, Any]:
        c, b = self.config, self.model.beacon
        return {**self.meta, "format": 1, "params": list(c.params), "rank": c.rank,
                **({"reader_rank": c.reader_rank} if c.reader_rank else {}),
                "window": b.window, "stride": b.stride, **b.layout(), "step": self.step,
                **({"adapt_context": b.adapt_context} if b.adapt_context is not None else {}),
                "train": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in vars(c).items()}}

    def save(self, path: str) -> None:
        """Adapter to ``path``; optimizer, sampler and step to ``path + '.state.pt'``.

        With several ranks (which hold the same state) rank 0 writes and all wait for it."""
        if not self.dist.is_main:
            self.dist.barrier()
            return
        save_beacon_adapter(self.model, path, self.adapter_config())
        torch.save({"step": self.step, "optimizer": self.opt.state_dict(),
                    "sampler": self.sampler.state_dict(),
                    "history": [vars(h) for h in self.history]}, path + ".state.pt")
        self.dist.barrier()

    def _adapter_config_for_this_run(self, path: str, flag: str, lower_rank: bool = False) -> dict[str, Any]:
        """The settings of the adapter at ``path``, which must have this run's projections and
        rank, or with ``lower_rank`` a low rank below the run's (``flag`` names the option in the
        error)."""
        cfg = read_adapter_config(path)
        r, run_rank = int(cfg["rank"]), self.config.rank
        rank_ok = r == run_rank or (lower_rank and 0 < r < run_rank)
        if tuple(cfg["params"]) != tuple(self.config.params) or not rank_ok:
            raise ValueError(f"{flag}: adapter has params={cfg['params']} rank={cfg['rank']}, the run "
                             f"asks for params={list(self.config.params)} rank={self.config.rank}")
        reader = int(cfg.get("reader_rank", 0))
        if reader != self.config.reader_rank and not (lower_rank and reader == 0):
            raise ValueError(f"{flag}: adapter has reader_rank={reader}, the run asks for "
                             f"{self.config.reader_rank} (--reader-rank)")
        return cfg

    def start_from(self, path: str) -> None:
        """Start this run from the weights of an adapter (e.g. one trained on language modelling):
        its tensors are copied in, the optimizer and step stay fresh. The adapter must have this
        run's projections and its rank, or for low-rank runs a lower one (grown: the added rank
        starts at zero, so step 0 computes what the adapter did). Its window and beacon layout may
        differ from the run's (a warm start for another window, mode or placement; the adapter's
        window is recorded as ``init_window``). Every rank reads the same file."""
        cfg = self._adapter_config_for_this_run(path, "--init", lower_rank=True)
        r = int(cfg["rank"])
        grow = r < self.config.rank
        b = self.model.beacon
        trained_window = int(cfg.get("window", b.window))
        if trained_window != b.window:   # the parameters do not depend on W: a warm start for another window
            self.meta["init_window"] = trained_window
        if grow:
            load_adapter_into_higher_rank(self.model, path)
            self.meta["init_rank"] = r
        else:
            load_beacon_adapter(self.model, path)
        self.meta["init"] = os.path.basename(path)

    def resume(self, path: str) -> None:
        """Load the adapter (and, when present, the training state) written by :meth:`save`.

        The world size may differ from the saving run's; the batch size may not (it fixes which
        samples a step reads)."""
        cfg = self._adapter_config_for_this_run(path, "--resume")
        saved, run = adapter_layout(cfg), self.model.beacon.layout()
        if saved != run:
            differ = ", ".join(f"{k}={saved[k]!r}" for k in saved if saved[k] != run[k])
            raise ValueError(f"--resume: the adapter was trained with {differ}, this run asks for "
                             + ", ".join(f"{k}={run[k]!r}" for k in saved if saved[k] != run[k])
                             + " (--mode, --placement and --sink must stay the same)")
        saved_batch = int(cfg.get("train", {}).get("batch_size", 1))
        if saved_batch != self.config.batch_size:
            raise ValueError(f"--resume: the run was trained with batch size {saved_batch}, this one asks "
                             f"for {self.config.batch_size} (--batch-size must stay the same)")
        load_beacon_adapter(self.model, path)
        for key in ("init", "init_window", "init_rank"):  # where the run began stays on record
            if key in cfg:
                self.meta.setdefault(key, cfg[key])
        state_path = path + ".state.pt"
        self.step = int(cfg.get("step", 0))
        if os.path.exists(state_path):
            st = torch.load(state_path, map_location=self.model.device, weights_only=False)
            self.opt.load_state_dict(st["optimizer"])
            self.sampler.load_state_dict(st["sampler"])
            self.step = int(st["step"])
            self.history = [StepLog(**h) for h in st.get("history", [])]
