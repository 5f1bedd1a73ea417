"""Step time of a toy training loop with and without a checkpoint save every N steps.

The state is ~10M fp32 params plus AdamW moments (fnllama.optim), a 0-d step, a key and a
data position: ~123 MB per save. The step is a small MLP regression (autograd + AdamW) so
that compute and the background write compete for the same CPU cores, as in a run.

    python benchmarks/checkpoint_save.py [--steps 20] [--dir /tmp/ckpt_bench]
"""

import argparse
import shutil
import statistics
import time

import optree
import torch

from fnllama import optim
from fnllama.checkpoint import Checkpointer

D, F, LAYERS = 1024, 1536, 3  # 3 * (2 * 1024 * 1536) + 1024*1024 ≈ 10.5M params


def init_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    layers = [{"up": torch.randn(F, D, generator=g) * D**-0.5,
               "down": torch.randn(D, F, generator=g) * F**-0.5} for _ in range(LAYERS)]
    return {"embed": torch.randn(D, D, generator=g) * D**-0.5, "layers": layers}


def loss_fn(params: dict, x: torch.Tensor) -> torch.Tensor:
    h = x @ params["embed"].T
    for layer in params["layers"]:
        h = h + torch.relu(h @ layer["up"].T) @ layer["down"].T
    return (h - x).pow(2).mean()


def make_step(tx):
    def step(state: dict, x: torch.Tensor) -> dict:
        params = optree.tree_map(lambda p: p.detach().requires_grad_(), state["params"])
        loss = loss_fn(params, x)
        grads = torch.autograd.grad(loss, optree.tree_leaves(params))
        grads = optree.tree_unflatten(optree.tree_structure(params), grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optree.tree_map(lambda p, u: (p + u).detach(), state["params"], updates)
        return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                "key": state["key"], "data": {"pos": state["data"]["pos"] + x.shape[0]}}
    return step


def run(steps: int, every: int | None, async_save: bool, directory: str):
    """(step times, times inside save(), final close() time)."""
    tx = optim.adamw(1e-3)
    params = init_params()
    state = {"params": params, "opt_state": tx.init(params), "step": torch.tensor(0),
             "key": torch.tensor([0, 1]), "data": {"pos": 0}}
    step_fn = make_step(tx)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    shutil.rmtree(directory, ignore_errors=True)
    ckpt = Checkpointer(directory, save_interval=every or 1, max_to_keep=2, async_save=async_save)
    times, in_save = [], []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        state = step_fn(state, x)
        t1 = time.perf_counter()
        if every:
            ckpt.save(i, state)
        times.append(time.perf_counter() - t0)
        in_save.append(time.perf_counter() - t1)
    t0 = time.perf_counter()
    ckpt.close()
    return times, in_save, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dir", default="/tmp/ckpt_bench")
    args = ap.parse_args()
    n = sum(t.numel() for t in optree.tree_leaves(init_params()))
    print(f"params {n / 1e6:.1f}M, saved state ≈ {3 * n * 4 / 1e6:.0f} MB")
    print("| mode | median s/step | mean s/step | median s in save() | close() s |")
    print("|---|---|---|---|---|")
    for label, every, async_save in [("no saving", None, True), ("async, every step", 1, True),
                                     ("sync, every step", 1, False), ("async, every 5 steps", 5, True),
                                     ("no saving (again)", None, True)]:
        times, in_save, tail = run(args.steps, every, async_save, args.dir)
        times, in_save = times[2:], in_save[2:]  # warm-up
        print(f"| {label} | {statistics.median(times):.3f} | {statistics.mean(times):.3f} "
              f"| {statistics.median(in_save):.3f} | {tail:.2f} |", flush=True)


if __name__ == "__main__":
    main()
