"""fnllama ZeRO-1/2/3 vs torch DDP + ZeroRedundancyOptimizer(AdamW), dp=2 on gloo, in one run.

Both sides train the same LLaMA (fnllama's param tree loaded into
`transformers.LlamaForCausalLM`) on the same per-rank batch, fp32 on CPU, with AdamW
(weight decay on every tensor, as torch's AdamW does) and global-norm clipping at 1.0:

  fnllama ZeRO-1 / ZeRO-2   train.make_train_step(cfg, zero.ZeroRule(..., stage=1|2))
  fnllama ZeRO-3            zero3.Zero3Rule: params sharded too, gathered layer by layer
  torch                     DistributedDataParallel(model) + clip_grad_norm_ +
                            ZeroRedundancyOptimizer(optimizer_class=torch.optim.AdamW)

Each timed repetition runs one step of every trainer in turn (so drifting machine load hits
all alike), each step starting after a barrier; rank 0 prints the median seconds per step,
the ratio torch / fnllama (> 1: fnllama is faster; "paired": the median of the per-repetition
ratios, steadier under drifting load) and the per-rank optimizer-state bytes
(largest rank; 0-d step counters excluded).

    PYTHONPATH=. python benchmarks/zero.py                     # "small" preset, 4 x 128 tokens per rank
    PYTHONPATH=. python benchmarks/zero.py --preset tiny --steps 5
    PYTHONPATH=. python benchmarks/zero.py --tune-malloc       # glibc keeps freed blocks (both sides)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fnllama import config, hf, optim, train, zero
from fnllama import random as fr
from fnllama.mesh import Mesh

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 0.1
TORCH = "torch DDP+ZeRO"



def fnllama_trainer(cfg, params, mesh, stage: int, bucket_bytes: int):
    opt = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)   # decay all, as torch
    rule = zero.make_rule(opt, mesh, stage=stage, bucket_bytes=bucket_bytes)
    state = train.init_state(fr.key(0), cfg, rule, params=params)
    extra = {}
    if stage == 3:   # params sharded; the loss gathers them layer by layer
        state, extra = rule.shard_train_state(state), {"loss_fn": rule.loss_fn}
    box = {"state": state}
    step = train.make_train_step(cfg, rule, mesh=mesh, clip_grad=1.0, **extra)

    def run(batch):
        box["state"], metrics = step(box["state"], batch)
        return metrics["loss"]
    return run, lambda: zero.optimizer_state_bytes(box["state"].opt_state)


def torch_trainer(cfg, params):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel
    model = DistributedDataParallel(hf.to_transformers(params, cfg))
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                  lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def run(batch):
        logits = model(input_ids=batch["tokens"]).logits                       # [B, T, V]
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch["labels"].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()                                                         # DDP all-reduces grads
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()                                                              # + broadcast of params
        return loss.item()

    def state_bytes():
        return sum(t.numel() * t.element_size() for s in opt.optim.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.ndim > 0)
    return run, state_bytes


def tune_glibc_malloc() -> None:
    """Keep freed blocks in the heap (glibc's maximum mmap threshold, no trimming), so the
    pure optimizer's fresh [S] buffers reuse memory instead of page-faulting new pages."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 * 1024 * 1024)   # M_MMAP_THRESHOLD
    libc.mallopt(-1, 2**31 - 1)          # M_TRIM_THRESHOLD


def rank_batch(cfg, rows: int, seq: int, rank: int, step: int) -> dict:
    k = fr.fold_in(fr.fold_in(fr.key(1), rank), step)
    tokens = fr.randint(k, (rows, seq + 1), 0, cfg.vocab_size)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def rank_main(rank: int, args, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    if args.tune_malloc:
        tune_glibc_malloc()
    cfg = config.get_preset(args.preset)
    with Mesh.create({"dp": 2}, device_type="cpu", timeout_s=600, reduce_scatter=args.reduce_scatter) as mesh:
        params = train.init_state(fr.key(0), cfg, optim.sgd(0.0)).params
        trainers = {f"fnllama ZeRO-{s}": fnllama_trainer(cfg, params, mesh, s, args.bucket_mb << 20)
                    for s in args.stages}
        trainers[TORCH] = torch_trainer(cfg, params)
        times = {name: [] for name in trainers}
        losses = {name: [] for name in trainers}
        for i in range(args.warmup + args.steps):
            batch = rank_batch(cfg, args.rows, args.seq, rank, i)
            for name, (run, _) in trainers.items():
                mesh.barrier()
                t0 = time.perf_counter()
                losses[name].append(run(batch))
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        # fnllama reports the global-batch loss; average torch's per-rank losses to match.
        losses[TORCH] = mesh.pmean(torch.tensor(losses[TORCH]), "dp").tolist()
        peaks = {name: int(mesh.all_gather(torch.tensor(nbytes()), "dp").max())
                 for name, (_, nbytes) in trainers.items()}
        if rank == 0:
            report(cfg, args, times, losses, peaks)


def report(cfg, args, times, losses, peaks) -> None:
    n = config.num_params(cfg)
    print(f"preset {args.preset}: {n / 1e6:.2f} M params; dp=2 gloo; per rank {args.rows} x {args.seq} tokens; "
          f"{args.threads} thread(s)/rank; tune_malloc={args.tune_malloc}; reduce_scatter={args.reduce_scatter}; "
          f"bucket {args.bucket_mb} MiB; "
          f"{args.steps} timed steps after {args.warmup} warm-up; load avg before: {args.load}")
    ref = statistics.median(times[TORCH])
    print(f"{'trainer':<18} {'s/step (median)':>16} {'min':>8} {'torch/this':>11} {'paired':>7} "
          f"{'opt bytes/rank':>15} {'last loss':>10}")
    for name in times:
        med = statistics.median(times[name])
        paired = statistics.median(t / x for t, x in zip(times[TORCH], times[name]))
        print(f"{name:<18} {med:>16.4f} {min(times[name]):>8.4f} {ref / med:>11.3f} {paired:>7.3f} "
              f"{peaks[name]:>15,d} {losses[name][-1]:>10.4f}")
    # Same start and data, so the curves should agree to fp32 round-off.
    print(f"ceil(params / 2) x 2 x 4 = {-(-n // 2) * 8:,d} bytes; first/last losses (global batch): "
          + "; ".join(f"{k} {v[0]:.5f}/{v[-1]:.5f}" for k, v in losses.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stages", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 3],
                        help="fnllama ZeRO stages to time, e.g. 1,2")
    parser.add_argument("--reduce-scatter", default="auto", choices=("auto", "native", "allreduce"),
                        help="the mesh's reduce-scatter (ZeRO-2/3): gloo's own or all-reduce + slice")
    parser.add_argument("--tune-malloc", action="store_true", help="raise glibc's mmap/trim thresholds (all trainers)")
    parser.add_argument("--bucket-mb", type=int, default=zero.DEFAULT_BUCKET_BYTES >> 20)
    args = parser.parse_args()
    args.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args, port), nprocs=2, join=True)


if __name__ == "__main__":
    main()
