"""The reader: attention split at the memory boundary (beacon_ops.memory_reading) and the
low-rank deltas that raw tokens use to query and read the condensed memory.

References: fp64 softmax attention with an explicit mask over the concatenated keys (the split),
the inference path (condensed cache, in-place ops) for the training forward, and the base model
itself for inputs of one window (bit-identical).
"""
from __future__ import annotations

import pytest
import torch

from beacon_ops.adapter import install_reader, load_beacon_adapter, make_beacon_trainable
from beacon_ops.generation import sequence_loss
from beacon_ops.memory_reading import dense_attention, merge_by_lse
from beacon_ops.train import TextSampler, TrainConfig, Trainer
from beacon_ops.training import beacon_loss

from llama_helpers import check_gradient_by_finite_differences, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fp64_attention(q, k, v, scale, visible):
    """[n, H, d] over [kvh, m, d], mask [n, m]: fp64, explicit, GQA by repeat."""
    g = q.shape[1] // k.shape[0]
    kk, vv = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)
    s = torch.einsum("nhd,hmd->nhm", q.double(), kk) * scale
    s = s.masked_fill(~visible[:, None, :], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("nhm,hmd->nhd", p, vv)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (3, 1)])
def test_split_and_merge_equal_one_attention(heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    n, m, w, d = 7, 11, 9, 16
    q = torch.randn(n, heads, d, generator=g)
    k = torch.randn(kv_heads, m + w, d, generator=g)
    v = torch.randn(kv_heads, m + w, d, generator=g)
    visible = torch.rand(n, m + w, generator=g) > 0.4
    visible[0] = False            # a row that sees nothing at all
    visible[1, m:] = False        # a row that sees only memory
    visible[2, :m] = False        # a row that sees only the window
    scale = d ** -0.5
    out_m, lse_m = dense_attention(q, k[:, :m], v[:, :m], scale, visible[:, :m])
    out_w, lse_w = dense_attention(q, k[:, m:], v[:, m:], scale, visible[:, m:])
    got = merge_by_lse(out_w, lse_w, out_m, lse_m)
    want = _fp64_attention(q, k, v, scale, visible)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.isinf(lse_m[0]).all() and (lse_m[0] < 0).all() and torch.isinf(lse_w[1]).all()
    assert torch.equal(got[0], torch.zeros_like(got[0]))


def _with_reader(model, rank: int = 3, seed: int = 5, scale: float = 1.5):
    """``model`` with a reader whose deltas are not zero (both factors random)."""
    install_reader(model, rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for r in (layer.self_attn.beacon_reader_q, layer.self_attn.beacon_reader_o):
                r.lora_B.copy_(torch.randn(r.lora_B.shape, generator=g) * scale)
    return model


def _inference_loss(model, ids, labels=None) -> float:
    with torch.no_grad():
        out = sequence_loss(model, [ids], None if labels is None else [labels], progress=False)
    model.reset()
    return float(out)


SETTINGS = [dict(ratio=4), dict(ratio=2, mode="segmentation"), dict(ratio=4, attend_previous=False),
            dict(variant="v3", placement="interleave", mode="full-coverage", ratio=4, sink_size=1,
                 beacon_params=("q", "k", "v"))]


@pytest.mark.parametrize("attention", ["op", "masked"])
@pytest.mark.parametrize("beacon", SETTINGS, ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items()))
def test_training_forward_equals_inference_with_a_reader(beacon: dict, attention: str) -> None:
    """The differentiable training cache and the in-place condensed cache split and merge apart;
    with a nonzero reader their losses agree, and the reader changes the loss."""
    m = _with_reader(tiny_model(window=16, **beacon))
    ids = torch.randint(0, 101, (70,), generator=torch.Generator().manual_seed(7))
    ref = _inference_loss(m, ids)
    with torch.no_grad():
        got = beacon_loss(m, ids, attention=attention).loss.item()
    assert abs(got - ref) <= 2e-5 * max(1.0, abs(ref)), (got, ref)
    plain = _inference_loss(tiny_model(window=16, **beacon), ids)
    assert abs(plain - ref) > 1e-3, (plain, ref)


def test_zero_reader_is_the_model_without_one() -> None:
    ids = torch.randint(0, 101, (70,), generator=torch.Generator().manual_seed(8))
    plain = tiny_model(window=16, ratio=4)
    m = tiny_model(window=16, ratio=4)
    install_reader(m, 4)
    assert abs(_inference_loss(m, ids) - _inference_loss(plain, ids)) <= 2e-6


def test_one_window_inputs_are_bit_identical() -> None:
    """No memory, no split: logits of inputs that fit the window equal the base model's bit for bit."""
    ids = torch.randint(0, 101, (16,), generator=torch.Generator().manual_seed(9))
    from beacon_ops.generation import prefill

    outs = []
    for reader in (False, True):
        m = tiny_model(window=16, ratio=4)
        if reader:
            _with_reader(m)
        with torch.no_grad():
            outs.append(prefill(m, [ids], logits="all", progress=False)[0])
        m.reset()
    assert torch.equal(outs[0], outs[1])


def test_reader_gradients_and_training(tmp_path) -> None:
    """The reader trains (its B factors move, the base does not), saves with the adapter and
    loads back into a fresh model with the same loss; ``--init`` from a reader-less adapter
    starts the reader at zero; ``--resume`` insists on the same reader rank."""
    docs = [torch.randint(0, 101, (400,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]

    def trainer(reader_rank: int, steps: int = 2) -> Trainer:
        cfg = TrainConfig(steps=steps, lr=1e-2, warmup=1, rank=2, reader_rank=reader_rank, ratios=(2, 4),
                          checkpoint=None)
        return Trainer(tiny_model(window=16), cfg, TextSampler(docs, 40, 90, seed=1))

    tr = trainer(3)
    names = [n for n, _ in tr.trainable]
    assert any("beacon_reader_q.lora_B" in n for n in names) and any("beacon_reader_o.lora_B" in n for n in names)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.run(progress=False)
    for n, p in tr.model.named_parameters():
        if "beacon_reader" in n and n.endswith("lora_B"):
            assert not torch.equal(p, before[n]), f"{n} did not change"
        elif n not in names:
            assert torch.equal(p, before[n]), f"{n} changed"
    path = str(tmp_path / "reader.safetensors")
    tr.save(path)
    fresh = tiny_model(window=16)
    cfg = load_beacon_adapter(fresh, path)
    assert cfg["reader_rank"] == 3
    fresh.beacon = tr.model.beacon = type(fresh.beacon)(window=16, ratio=4)
    ids = torch.randint(0, 101, (70,), generator=torch.Generator().manual_seed(2))
    assert _inference_loss(fresh, ids) == _inference_loss(tr.model.eval(), ids)

    plain = trainer(0)
    plain.run(progress=False)
    plain_path = str(tmp_path / "plain.safetensors")
    plain.save(plain_path)
    grown = trainer(3)
    grown.start_from(plain_path)
    assert all(not layer.self_attn.beacon_reader_q.lora_B.any() for layer in grown.model.model.layers)
    with pytest.raises(ValueError, match="reader_rank"):
        trainer(3).resume(plain_path)
    with pytest.raises(ValueError, match="reader_rank"):
        trainer(0).resume(path)


def test_reader_has_its_own_learning_rate() -> None:
    """--reader-lr: the reader's factors in a second optimizer group at that rate (the same
    warm-up and decay), the beacon side at --lr."""
    docs = [torch.randint(0, 101, (400,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    cfg = TrainConfig(steps=4, lr=1e-3, warmup=2, rank=2, reader_rank=2, reader_lr=5e-3, ratios=(4,),
                      checkpoint=None)
    tr = Trainer(tiny_model(window=16), cfg, TextSampler(docs, 40, 90, seed=1))
    beacon_group, reader_group = tr.opt.param_groups
    assert {id(p) for p in reader_group["params"]} == {id(p) for n, p in tr.trainable if "beacon_reader" in n}
    tr.train_step()
    assert beacon_group["lr"] == pytest.approx(1e-3 / 2) and reader_group["lr"] == pytest.approx(5e-3 / 2)


@pytest.mark.parametrize("attention", ["op", "masked"])
def test_reader_gradients_match_finite_differences(attention: str) -> None:
    """Gradients of the training loss for the reader's factors, and for the beacon parameters
    upstream of it (through the window's LSE: the op's lse gradient), against central finite
    differences of the *inference* loss along each gradient."""
    m = _with_reader(tiny_model(window=16, ratio=4), scale=0.5)
    names = [n for n, _ in make_beacon_trainable(m, reader_rank=3)]
    assert any("beacon_reader" in n for n in names)
    ids = torch.randint(0, 101, (48,), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[:33] = -100
    out = beacon_loss(m, ids, labels, attention=attention)
    out.loss.backward()
    groups = ["model.layers.1.self_attn.beacon_reader_q.lora_B", "model.layers.1.self_attn.beacon_reader_q.lora_A",
              "model.layers.0.self_attn.beacon_reader_o.lora_B", "model.layers.1.self_attn.beacon_reader_o.lora_A",
              "model.layers.0.self_attn.beacon_k_proj.weight", "model.beacon_embed_tokens.weight"]
    check_gradient_by_finite_differences(m, groups, lambda: _inference_loss(m, ids, labels))
