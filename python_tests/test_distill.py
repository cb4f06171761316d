"""Distillation from full attention (beacon_ops.training: teacher_states, distill_distance, the
``teacher`` of beacon_loss; ``train --distill``).

References: transformers' per-layer hidden states on the same weights (the teacher), the
distance written out in fp64 by hand, finite differences of the loss (its gradient).
"""
from __future__ import annotations

import json

import pytest
import torch

from beacon_ops.adapter import make_beacon_trainable
from beacon_ops.long_tasks import Sample
from beacon_ops.train import TrainConfig, Trainer
from beacon_ops.training import beacon_loss, distill_distance, layer_states, logit_divergence, teacher_states

from llama_helpers import check_gradient_by_finite_differences, hf_twin, tiny_config, tiny_model
from test_cli import assert_usage_error, run_cli
from test_training import _one_thread  # noqa: F401  (the module's one-thread fixture)


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed))


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[:40] = -100          # targets only from position 39 on, and a gap
    labels[50:53] = -100
    return labels


def test_teacher_states_are_transformers_hidden_states() -> None:
    """Every layer's output at the target positions equals transformers' hidden states of the
    whole sequence (its last entry is after the final norm); beacons configured (ratio 4) change
    nothing: the teacher reads every window at ratio 0."""
    model = tiny_model(tiny_config(num_layers=3), window=16, ratio=4)
    ids = _ids(70)
    labels = _labels(ids)
    got = teacher_states(model, ids, labels)
    positions = [t for t in range(70) if t + 1 < 70 and labels[t + 1] != -100]
    assert got.states.shape == (len(positions), 3, 48)
    assert got.row.tolist() == [positions.index(t) if t in positions else -1 for t in range(70)]
    with torch.no_grad():
        hs = hf_twin(model)(ids[None], output_hidden_states=True).hidden_states
        last = model.model.norm(got.states[:, -1])
    for layer in range(2):
        assert (got.states[:, layer] - hs[layer + 1][0, positions]).abs().max() <= 1e-4, layer
    assert (last - hs[3][0, positions]).abs().max() <= 1e-4


def test_teacher_refuses_what_full_attention_cannot_read() -> None:
    model = tiny_model(tiny_config(max_position_embeddings=64), window=16, ratio=4)
    with pytest.raises(ValueError, match="ids: 70 tokens exceed the 64 positions"):
        teacher_states(model, _ids(70))
    with pytest.raises(ValueError, match="labels must have the shape"):
        teacher_states(model, _ids(40), _ids(39))


def test_distill_distance_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, 7, generator=g) * 4, torch.randn(5, 3, 7, generator=g) + 2
    want = torch.zeros(5, dtype=torch.float64)
    for i in range(5):
        for layer in range(3):
            a, b = s[i, layer].double(), t[i, layer].double()
            a = a / (a.square().mean() + 1e-6).sqrt()
            b = b / (b.square().mean() + 1e-6).sqrt()
            want[i] += ((a - b) ** 2).mean() / 3
    assert torch.allclose(distill_distance(s, t).double(), want, rtol=1e-5, atol=0)
    assert distill_distance(s, 3 * s).abs().max() <= 1e-6  # scale does not count
    assert torch.allclose(distill_distance(s, t, per_layer=True).mean(1), distill_distance(s, t))


@pytest.mark.parametrize("checkpoint", [None, "window"])
def test_loss_adds_the_weighted_distance(checkpoint: str | None) -> None:
    """With a teacher the loss is CE + weight x mean distance over the targets; at ratio 0 the
    student is the teacher (distance 0); at ratio 4 it is not, and the same figures come out
    whether windows are checkpointed or not."""
    model = tiny_model(window=16, ratio=4)
    make_beacon_trainable(model, rank=2, seed=1)
    ids = _ids(70)
    labels = _labels(ids)
    teacher = teacher_states(model, ids, labels)
    same = beacon_loss(model, ids, labels, ratio=0, teacher=teacher, distill=3.0)
    assert same.distill() <= 1e-10
    plain = beacon_loss(model, ids, labels, checkpoint=checkpoint)
    out = beacon_loss(model, ids, labels, checkpoint=checkpoint, teacher=teacher, distill=3.0)
    assert out.distill() > 1e-4 and out.cross_entropy() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(out.cross_entropy() + 3.0 * out.distill(), rel=1e-6)
    ref = beacon_loss(model, ids, labels, checkpoint=None, teacher=teacher, distill=3.0)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_layer_states_are_what_the_loss_compares() -> None:
    """layer_states at the loss's ratio gives the layer outputs beacon_loss compares with the
    teacher: their distance is the loss's; at ratio 0 they are the teacher's."""
    model = tiny_model(tiny_config(num_layers=3), window=16, ratio=4)
    ids = _ids(70)
    labels = _labels(ids)
    teacher = teacher_states(model, ids, labels)
    assert torch.equal(layer_states(model, ids, labels, ratio=0).states, teacher.states)
    mine = layer_states(model, ids, labels)
    assert torch.equal(mine.row, teacher.row)
    per_layer = distill_distance(mine.states, teacher.states, per_layer=True)
    assert per_layer.shape == (len(teacher.states), 3) and (per_layer[:, 1:] > 0).all()
    with torch.no_grad():
        out = beacon_loss(model, ids, labels, teacher=teacher)
    assert float(per_layer.mean(1).mean()) == pytest.approx(out.distill(), rel=1e-5)


@pytest.mark.parametrize("distill_on", ["layers", "logits"])
def test_distillation_gradient_matches_finite_differences(distill_on: str) -> None:
    """The distillation term's gradient reaches the beacon parameters (weight 50, so that it dominates)."""
    model = tiny_model(window=16, ratio=4)
    names = [n for n, _ in make_beacon_trainable(model, rank=2, seed=1)]
    ids = _ids(70)
    labels = _labels(ids)
    teacher = teacher_states(model, ids, labels)

    def loss() -> float:
        with torch.no_grad():
            return float(beacon_loss(model, ids, labels, teacher=teacher, distill=50.0, distill_on=distill_on).loss)

    beacon_loss(model, ids, labels, checkpoint="window", teacher=teacher, distill=50.0,
                distill_on=distill_on).loss.backward()
    check_gradient_by_finite_differences(model, [n for n in names if "layers.0." in n and "lora_B" in n], loss)


def test_bad_teacher() -> None:
    model = tiny_model(window=16, ratio=4)
    with pytest.raises(ValueError, match="teacher: states of a 40-token sequence, ids has 70"):
        beacon_loss(model, _ids(70), teacher=teacher_states(model, _ids(40)))


def test_trainer_distills_the_samples_full_attention_can_read() -> None:
    """A step over two samples: the one within the trained context gets a teacher, the longer
    one only CE; the log says so, and a run with weight 0 logs the same CE."""
    config = tiny_config(max_position_embeddings=100)
    samples = [Sample(_ids(90).tolist(), _labels(_ids(90)).tolist(), "passkey", fact_positions=[10], answer_start=40),
               Sample(_ids(120, seed=2).tolist(), _ids(120, seed=2).tolist(), "lm")]
    logs = {}
    for weight in (0.0, 2.0):
        model = tiny_model(config, window=16, ratio=4)
        trainer = Trainer(model, TrainConfig(steps=1, lr=1e-3, rank=2, batch_size=2, ratios=(4,), distill=weight),
                          lambda i: samples[i % 2])
        logs[weight] = trainer.train_step()
    assert (logs[0.0].distilled, logs[2.0].distilled) == (0, 1)
    assert logs[0.0].distill == 0.0 and logs[2.0].distill > 0
    assert logs[2.0].loss == pytest.approx(logs[0.0].loss, rel=1e-6)  # the CE, measured before the step
    with pytest.raises(ValueError, match="distill must be >= 0"):
        Trainer(tiny_model(config, window=16, ratio=4), TrainConfig(steps=1, distill=-1.0), lambda i: samples[0])
    with pytest.raises(ValueError, match="distill_on must be one of"):
        Trainer(tiny_model(config, window=16, ratio=4), TrainConfig(steps=1, distill_on="x"), lambda i: samples[0])


def test_train_distill_flag(tmp_path, capsys) -> None:
    base = ["train", "--tiny", "--steps", "1", "--window", "64", "--min-len", "130", "--max-len", "140",
            "--rank", "2"]
    log = tmp_path / "log.jsonl"
    code, printed, _ = run_cli(base + ["--distill", "0.5", "--out", str(tmp_path / "a.safetensors"),
                                       "--log", str(log)], capsys)
    assert code == 0 and "distilled from full attention (layers, weight 0.5" in printed
    step = json.loads(log.read_text().splitlines()[0])
    assert step["distilled"] == 1 and step["distill"] > 0
    assert_usage_error(base + ["--distill", "-1"], capsys, "--distill", "[0.0")
    assert_usage_error(base + ["--distill", "1", "--reader-rank", "2"], capsys, "--distill", "--reader-rank")
    assert_usage_error(base + ["--distill-on", "logits"], capsys, "--distill-on", "--distill WEIGHT")
    assert_usage_error(base + ["--distill", "1", "--distill-on", "states"], capsys, "--distill-on", "logits")
    code, printed, _ = run_cli(base + ["--distill", "0.5", "--distill-on", "logits",
                                       "--out", str(tmp_path / "b.safetensors")], capsys)
    assert code == 0 and "distilled from full attention (logits, weight 0.5" in printed


def test_logit_divergence_by_hand() -> None:
    """KL(teacher || student) of the softmaxes, written out in fp64; 0 for equal logits and for
    logits that differ by a constant (the same distribution)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 9, generator=g) * 3, torch.randn(4, 9, generator=g) * 2
    want = torch.zeros(4, dtype=torch.float64)
    for i in range(4):
        p = torch.exp(t[i].double()) / torch.exp(t[i].double()).sum()
        q = torch.exp(s[i].double()) / torch.exp(s[i].double()).sum()
        want[i] = sum(float(p[v] * (torch.log(p[v]) - torch.log(q[v]))) for v in range(9))
    assert torch.allclose(logit_divergence(s, t).double(), want, rtol=1e-5, atol=1e-7)
    assert (want > 0).all()
    assert logit_divergence(s, s + 5.0).abs().max() <= 1e-5


@pytest.mark.parametrize("checkpoint", [None, "window"])
def test_loss_adds_the_weighted_logit_divergence(checkpoint: str | None) -> None:
    """distill_on="logits": CE + weight x mean KL from full attention's next-token distribution,
    the teacher's logits its last layer's output through the final norm and the LM head; 0 at ratio 0; the KL of each
    target against a hand-made fp64 reference from the two models' full logits."""
    model = tiny_model(window=16, ratio=4)
    make_beacon_trainable(model, rank=2, seed=1)
    ids = _ids(70)
    labels = _labels(ids)
    teacher = teacher_states(model, ids, labels)
    same = beacon_loss(model, ids, labels, ratio=0, teacher=teacher, distill=3.0, distill_on="logits")
    assert same.distill() <= 1e-6
    plain = beacon_loss(model, ids, labels, checkpoint=checkpoint)
    out = beacon_loss(model, ids, labels, checkpoint=checkpoint, teacher=teacher, distill=3.0, distill_on="logits")
    assert out.cross_entropy() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(out.cross_entropy() + 3.0 * out.distill(), rel=1e-6)
    with torch.no_grad():
        student = model.logits(model.model.norm(layer_states(model, ids, labels).states[:, -1])).double()
        full = hf_twin(model)(ids[None]).logits[0].double()
    positions = [t for t in range(70) if t + 1 < 70 and labels[t + 1] != -100]
    p = torch.softmax(full[positions], -1)
    want = (p * (p.log() - torch.log_softmax(student, -1))).sum(-1).mean()
    assert out.distill() == pytest.approx(float(want), rel=1e-4)
    assert float(want) > 1e-4
    with pytest.raises(ValueError, match="distill_on must be one of"):
        beacon_loss(model, ids, labels, teacher=teacher, distill_on="states")


def test_last_layer_only_teacher() -> None:
    """teacher_states(last_layer_only=True) keeps the last layer's rows alone, bit for bit those of
    the full teacher; distill_on="logits" reads the same loss from it; "layers" refuses it."""
    model = tiny_model(tiny_config(num_layers=3), window=16, ratio=4)
    make_beacon_trainable(model, rank=2, seed=1)
    ids = _ids(70)
    labels = _labels(ids)
    full = teacher_states(model, ids, labels)
    last = teacher_states(model, ids, labels, last_layer_only=True)
    assert last.states.shape == (full.states.shape[0], 1, full.states.shape[2])
    assert torch.equal(last.states[:, 0], full.states[:, -1]) and torch.equal(last.row, full.row)
    a = beacon_loss(model, ids, labels, teacher=full, distill=2.0, distill_on="logits")
    b = beacon_loss(model, ids, labels, teacher=last, distill=2.0, distill_on="logits")
    assert a.loss.item() == b.loss.item() and b.distill() > 0
    with pytest.raises(ValueError, match="teacher: 1 layer\\(s\\) of states; distill_on='layers' compares all 3"):
        beacon_loss(model, ids, labels, teacher=last, distill=2.0)
    empty = teacher_states(model, ids, torch.full_like(labels, -100), last_layer_only=True)
    assert empty.states.shape == (0, 1, 48)
