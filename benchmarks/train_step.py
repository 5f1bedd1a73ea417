"""fnllama's train step vs transformers + torch.optim.AdamW(foreach=True), side by side.

Same config, same initial weights (fnllama's tree loaded into `LlamaForCausalLM`), same
batch, AdamW + global-norm clipping, fp32 on CPU. Runs eager and `torch.compile` variants in
one process, alternating between the two trainers each repetition so drifting machine load
hits both alike. Prints tokens/s of each, the ratio, and achieved FLOP/s against a measured
fp32 matmul peak of this machine (MFU).

    python benchmarks/train_step.py                       # the issue's config (slow on 2 cores)
    python benchmarks/train_step.py --dim 256 --layers 4 --seq 256 --vocab 8000 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fnllama import config, hf, metrics, optim, train
from fnllama import random as fr



def make_fnllama(cfg, params, compile_: bool):
    opt = optim.adamw(1e-4, weight_decay=0.1)
    state = train.init_state(fr.key(0), cfg, opt, params=params)
    step = train.make_train_step(cfg, opt, clip_grad=1.0, compile=compile_)
    box = {"state": state}

    def run(batch):
        box["state"], m = step(box["state"], batch)
        return m["loss"]
    return run


def make_reference(cfg, params, compile_: bool):
    model = hf.to_transformers(params, cfg)
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)

    def run(batch):
        logits = forward(input_ids=batch["tokens"]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), batch["labels"].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        return loss.item()
    return run


def time_steps(fn, batch, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(batch)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per trainer per repetition")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions")
    ap.add_argument("--modes", default="eager,compiled")
    args = ap.parse_args()

    ffn = int(2 * 4 * args.dim / 3 / 64 + 0.999) * 64
    cfg = config.ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                             n_kv_heads=args.heads, ffn_dim=ffn, max_seq_len=args.seq)
    params = train.model.init(fr.key(0), cfg)
    seqs = fr.randint(fr.key(1), (args.batch, args.seq + 1), 0, cfg.vocab_size)
    batch = {"tokens": seqs[:, :-1], "labels": seqs[:, 1:]}
    tokens = args.batch * args.seq
    flops = metrics.flops_per_token(cfg, args.seq) * tokens
    peak = metrics.measure_matmul_peak(torch.float32) * 1e12
    print(f"config: dim {cfg.dim}, layers {cfg.n_layers}, heads {cfg.n_heads}, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, "
          f"seq {args.seq}, micro-batch {args.batch}; fp32; {torch.get_num_threads()} threads; "
          f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")

    for mode in args.modes.split(","):
        compiled = mode == "compiled"
        trainers = {"fnllama": make_fnllama(cfg, params, compiled), "reference": make_reference(cfg, params, compiled)}
        for fn in trainers.values():      # warm-up (compilation happens here)
            fn(batch)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(args.reps):
            for name, fn in trainers.items():
                times[name] += time_steps(fn, batch, args.steps)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in trainers:
            print(f"[{mode:8}] {name:9}: {med[name]:7.3f} s/step  {tokens / med[name]:9.1f} tokens/s  "
                  f"{flops / med[name] / 1e9:6.1f} GFLOP/s  MFU {flops / med[name] / peak:5.1%}")
        print(f"[{mode:8}] ratio fnllama/reference tokens/s = {med['reference'] / med['fnllama']:.3f}")


if __name__ == "__main__":
    main()
