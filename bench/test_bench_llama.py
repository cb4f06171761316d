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

from beacon_ops.generation import decode_step, prefill  # noqa: E402
from beacon_ops.benchmarks.llama import WINDOW, build_model  # noqa: E402

LENGTH = 4 * 1024
DECODE_ROUNDS = 16


pytestmark = pytest.mark.usefixtures("busy_machine_thread_count")


@pytest.fixture(scope="module")
def model(device):
    m = build_model("small-random", torch.float32, device)
    ids = torch.randint(2, m.config.vocab_size, (WINDOW // 2,), generator=torch.Generator().manual_seed(1))
    beacon = prefill(m, ids, logits="last", attention="beacon", progress=False)
    full = prefill(m, ids, logits="last", attention="full", progress=False)
    assert (beacon - full).abs().max().item() <= 1e-4 * max(1.0, full.abs().max().item())
    return m


def _ids(m) -> torch.Tensor:
    return torch.randint(2, m.config.vocab_size, (LENGTH,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attention", ["beacon", "full"])
def test_llama_prefill(benchmark, synced, device, model, attention: str) -> None:
    ids = _ids(model)
    benchmark.group = f"llama prefill {LENGTH // 1024}K {device}"
    benchmark.extra_info.update(tokens=LENGTH, ratio=32 if attention == "beacon" else 0)

    benchmark.pedantic(synced(lambda: prefill(model, ids, logits="last", attention=attention,
                                              progress=False)), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("attention", ["beacon", "full"])
def test_llama_decode_step(benchmark, synced, device, model, attention: str) -> None:
    logits = prefill(model, _ids(model), logits="last", attention=attention, progress=False,
                           extra_tokens=DECODE_ROUNDS + 2)
    tok = [int(logits[0].argmax())]
    benchmark.group = f"llama decode step after {LENGTH // 1024}K {device}"
    benchmark.extra_info.update(context=LENGTH, ratio=32 if attention == "beacon" else 0)

    def step() -> None:
        tok[0] = int(synced(decode_step)(model, tok)[0].argmax())

    # Every round appends one token; none of them completes a window (LENGTH % WINDOW == 0).
    benchmark.pedantic(step, rounds=DECODE_ROUNDS, warmup_rounds=1)
