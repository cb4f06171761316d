"""How far each layer's output at a task's answer lies from full attention's, per adapter.

    python bench/distill_layers.py --adapter A.safetensors [--adapter B.safetensors ...] \
        [--samples 4] [--min-len 7000] [--max-len 8000] [--ratio 4] [--seed 999]

Draws passkey prompts from the training mixture's generator (``--seed`` other than the runs'),
reads each with full attention (``beacon_ops.training.teacher_states``) and with the adapter's
beacons at ``--ratio`` (``layer_states``), and prints, per adapter, the cross-entropy of the
answers and ``distill_distance`` (unit-RMS vectors, the measure of ``train --distill``) by layer,
averaged over the answer tokens. The window is the adapter's.
"""
from __future__ import annotations

import argparse

import torch

from beacon_ops.adapter import read_adapter_config
from beacon_ops.checkpoints import load_model
from beacon_ops.llama import BeaconConfig
from beacon_ops.long_tasks import LongTaskMixture, public_domain_texts
from beacon_ops.training import beacon_loss, distill_distance, layer_states, teacher_states


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", action="append", required=True, help="an adapter file (repeat for several)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--min-len", type=int, default=7000)
    p.add_argument("--max-len", type=int, default=8000)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    texts = public_domain_texts()
    for path in args.adapter:
        window = int(read_adapter_config(path)["window"])
        lm = load_model(None, BeaconConfig(window=window, ratio=args.ratio), torch.float32, "cpu", path)
        mix = LongTaskMixture(lm.tokenizer, texts, window, args.min_len, args.max_len, lm_share=0.0,
                              chat_share=0.2, filler_share=0.5, kinds=["passkey"], seed=args.seed)
        per_layer, ces = [], []
        for i in range(args.samples):
            s = mix(i)
            ids, labels = torch.tensor(s.ids), torch.tensor(s.labels)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                teacher = teacher_states(lm.model, ids, labels)
                mine = layer_states(lm.model, ids, labels)
                ces.append(beacon_loss(lm.model, ids, labels).cross_entropy())
            per_layer.append(distill_distance(mine.states, teacher.states, per_layer=True))
        d = torch.cat(per_layer).mean(0)
        print(f"{path}: answer cross-entropy {sum(ces) / len(ces):.3f} "
              f"({', '.join(f'{c:.3f}' for c in ces)}); distance {float(d.mean()):.3f}", flush=True)
        print("  by layer: " + " ".join(f"{x:.3f}" for x in d.tolist()), flush=True)


if __name__ == "__main__":
    main()
