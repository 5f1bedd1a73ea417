"""One dp rank of a ZeRO test run; tests/test_zero.py starts N of these.

The test forks ranks from a multiprocessing forkserver that imported torch once (`run_rank`);
each rank joins through torchrun's environment variables. The two-"node" test launches this
file under torchrun itself:

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank R \
        --master-addr 127.0.0.1 --master-port P tests/_zero_worker.py SCENARIO OUT_DIR

Every rank trains on its own contiguous block of rows of each global batch (rank r of dp
takes rows [r*B/dp, (r+1)*B/dp)) and saves losses, final params and its optimizer-state
facts to OUT_DIR/rank{R}.pt; the test compares them with a dp=1 run it does itself.
"""

import os
import sys

import optree
import torch

from fnllama import config, optim, train, zero, zero3
from fnllama import random as fr
from fnllama.mesh import Mesh
from dist_support import become_rank
from synthetic import counting_batches

CFG = config.get_preset("tiny")
# dim 66 = 2 mod 4: the flat size is not a multiple of 4, so dp=4 shards end in padding.
PADDED_CFG = config.get_preset("tiny", dim=66, n_heads=3, n_kv_heads=1, ffn_dim=90)
STEPS = 20
ROWS, SEQ = 8, 16
BUCKET_BYTES = 64 * 1024   # small, so the tiny model's shards span several buckets


def global_batches(n: int = STEPS, rows: int = ROWS, seq: int = SEQ, seed: int = 0) -> list[dict]:
    return counting_batches(seed, n, rows=rows, seq=seq)


def rank_rows(batch: dict, rank: int, dp: int) -> dict:
    rows = batch["tokens"].shape[0] // dp
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}


def optimizer_factory(mask):
    schedule = optim.make_schedule("cosine", lr=3e-3, min_lr=3e-4, warmup_iters=3, decay_iters=STEPS)
    return optim.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask)


def train_run(cfg, rule, mesh, steps: int = STEPS) -> tuple[train.TrainState, list[float]]:
    """`steps` steps of the global batches, this rank's rows only; returns state and losses."""
    dp, rank = (1, 0) if mesh is None else (mesh.size("dp"), mesh.rank("dp"))
    state = train.init_state(fr.key(0), cfg, rule)
    extra = {}
    if isinstance(rule, zero3.Zero3Rule):
        state, extra = rule.shard_train_state(state), {"loss_fn": rule.loss_fn}
    step = train.make_train_step(cfg, rule, mesh=mesh, clip_grad=1.0, **extra)
    losses = []
    for batch in global_batches(steps):
        state, metrics = step(state, rank_rows(batch, rank, dp))
        losses.append(metrics["loss"])
    return state, losses


def zero_facts(rule: zero.ZeroRule, state: train.TrainState) -> dict:
    full = rule.gather_state(state.opt_state)
    again = rule.shard_state(full)
    same = all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(again), optree.tree_leaves(state.opt_state)))
    return {"opt_bytes": zero.optimizer_state_bytes(state.opt_state), "full_state": full,
            "roundtrip_equal": same, "padding_zero": padding_is_zero(rule, state), "shard_len": rule.plan.shard_len,
            "total": rule.plan.layout.total, "n_buckets": len(rule.plan.buckets()), "gather": rule.gather}


def padding_is_zero(rule: zero.ZeroRule, state: train.TrainState) -> bool:
    """The padded tail (past `total`) of the param buffer and of this rank's state shards is 0."""
    total, (lo, _) = rule.plan.layout.total, rule.plan.shard_range
    leaf = optree.tree_leaves(state.params)[0]
    flat = torch.tensor([], dtype=leaf.dtype).set_(leaf.untyped_storage())  # the whole buffer
    tails = [flat[total:]] + [t[max(total - lo, 0):] for t in optree.tree_leaves(state.opt_state) if t.ndim]
    return flat.numel() == rule.plan.layout.padded_total and all(bool((t == 0).all()) for t in tails)


def run_stages(mesh: Mesh, cfg, stages) -> dict:
    out = {}
    for stage in stages:
        rule = zero.make_rule(optimizer_factory, mesh, stage=stage, bucket_bytes=BUCKET_BYTES)
        state, losses = train_run(cfg, rule, mesh)
        out[stage] = {"losses": losses, "params": state.params}
        if stage:
            out[stage].update(zero_facts(rule, state))
    return out


def run_stage3(mesh: Mesh, cfg) -> dict:
    rule = zero3.Zero3Rule(optimizer_factory, mesh, bucket_bytes=BUCKET_BYTES)
    state, losses = train_run(cfg, rule, mesh)
    full = rule.gather_state(state.opt_state)
    again = rule.shard_state(full)
    same = all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(again), optree.tree_leaves(state.opt_state)))
    return {"losses": losses, "params": rule.gather_params(state.params), "stats": dict(rule.stats),
            "full_state": full, "roundtrip_equal": same,
            "opt_bytes": zero.optimizer_state_bytes(state.opt_state),
            "param_bytes": zero.optimizer_state_bytes(state.params),
            "unit_shards": [u.plan.shard_len for u in rule.units],
            "unit_totals": [u.plan.layout.total for u in rule.units]}


def scenario(name: str, mesh: Mesh) -> dict:
    if name == "stages":
        out = run_stages(mesh, CFG, (0, 1, 2))
        # Stage 2 through the mesh's all-reduce fallback for reduce-scatter, and all_gather in
        # place of broadcasts: the same sums and exact copies, so bitwise the same run.
        out[3] = run_stage3(mesh, CFG)
        mesh.reduce_scatter = "allreduce"
        rule = zero.ZeroRule(optimizer_factory, mesh, stage=2, bucket_bytes=BUCKET_BYTES, gather="all_gather")
        _, out["fallback_losses"] = train_run(CFG, rule, mesh, steps=5)
        return out
    if name == "padded":
        return run_stages(mesh, PADDED_CFG, (2,))
    if name == "twonode":
        rule = zero.ZeroRule(optimizer_factory, mesh, stage=2, bucket_bytes=BUCKET_BYTES)
        state, losses = train_run(CFG, rule, mesh, steps=5)
        return {"losses": losses, "params": state.params}
    raise ValueError(f"unknown scenario {name!r}")


def main(name: str, out_dir: str) -> int:
    timeout_s = float(os.environ.get("ZERO_TEST_TIMEOUT_S", "120"))
    with Mesh.create(device_type="cpu", timeout_s=timeout_s) as mesh:
        result = scenario(name, mesh)
        result["dp"] = mesh.size("dp")
    torch.save(result, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    return 0


def run_rank(name: str, out_dir: str, rank: int, world_size: int, port: int) -> None:
    """A multiprocessing target: become rank `rank` (logging to OUT_DIR/rank{R}.log) and run."""
    become_rank(rank, world_size, port, out_dir)
    sys.exit(main(name, out_dir))


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1], sys.argv[2]))
