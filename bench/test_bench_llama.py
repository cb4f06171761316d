"""pytest-benchmark: the minimal Llama (small random config), beacon vs full attention.

Run with ``pytest bench/ --benchmark-only`` (kept out of the default ``pytest python_tests``).
Prefill of a 4K input (only the last token's logits) and one whole-model decode step after it,
each with the condensed cache (r = 32) and with a plain full KV cache, grouped side by side.
Before timing, the suite checks that both attentions give the same logits on an input shorter
than one window (docs/activation-beacon.md: such inputs must reproduce the base model), so the two timed paths
are the same model. Peak memory is measured by ``python -m beacon_ops bench llama`` (a fresh
process per configuration), not here. CUDA cases skip without a GPU.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("beacon_ops.llama", reason="beacon_ops.llama not available")

from beacon_ops.benchmarks.common import busy_machine_threads  # noqa: E402
from beacon_ops.generation import decode_step, prefill  # noqa: E402
from beacon_ops.benchmarks.llama import WINDOW, build_model  # noqa: E402

LENGTH = 4 * 1024
DECODE_ROUNDS = 16


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """One thread on a busy machine, as ``python -m beacon_ops bench`` does."""
    threads, _ = busy_machine_threads()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA device not available")),
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    device = request.param
    m = build_model("small-random", torch.float32, device)
    ids = torch.randint(2, m.config.vocab_size, (WINDOW // 2,), generator=torch.Generator().manual_seed(1))
    beacon = prefill(m, ids, logits="last", attention="beacon", progress=False)
    full = prefill(m, ids, logits="last", attention="full", progress=False)
    assert (beacon - full).abs().max().item() <= 1e-4 * max(1.0, full.abs().max().item())
    return m


def _ids(m) -> torch.Tensor:
    return torch.randint(2, m.config.vocab_size, (LENGTH,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attention", ["beacon", "full"])
def test_llama_prefill(benchmark, model, attention: str) -> None:
    ids = _ids(model)
    device = str(model.device.type)
    benchmark.group = f"llama prefill {LENGTH // 1024}K {device}"
    benchmark.extra_info.update(tokens=LENGTH, ratio=32 if attention == "beacon" else 0)

    def run() -> None:
        prefill(model, ids, logits="last", attention=attention, progress=False)
        _sync(device)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("attention", ["beacon", "full"])
def test_llama_decode_step(benchmark, model, attention: str) -> None:
    device = str(model.device.type)
    logits = prefill(model, _ids(model), logits="last", attention=attention, progress=False,
                           extra_tokens=DECODE_ROUNDS + 2)
    tok = [int(logits[0].argmax())]
    benchmark.group = f"llama decode step after {LENGTH // 1024}K {device}"
    benchmark.extra_info.update(context=LENGTH, ratio=32 if attention == "beacon" else 0)

    def step() -> None:
        out = decode_step(model, tok)
        _sync(device)
        tok[0] = int(out[0].argmax())

    # Every round appends one token; none of them completes a window (LENGTH % WINDOW == 0).
    benchmark.pedantic(step, rounds=DECODE_ROUNDS, warmup_rounds=1)
