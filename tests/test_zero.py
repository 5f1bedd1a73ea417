"""fnllama.zero: ZeRO-1/2 on real gloo process groups, checked against a dp=1 run in this process.

Multi-process tests fork one process per rank from a forkserver that imported torch once
(tests/_zero_worker.py); each rank joins through torchrun's environment and saves what it
computed. The reduce-scatter fallback's exactness for sizes not divisible by dp is checked
at the collective level in tests/test_mesh.py (`check_fallback_exact`: 2n+1 elements padded
to 3n, native vs all-reduce-then-slice, bitwise); here a whole ZeRO-2 run through the
fallback (and all_gather in place of gloo's default broadcasts) must give bitwise the
native run's losses.
"""

import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import optree
import pytest
import torch

from fnllama import optim, train, tree, zero, zero3
from fnllama.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _zero_worker as worker  # noqa: E402
from dist_support import free_port

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "fnllama.train", "fnllama.zero", "_zero_worker"])



def run_world(scenario: str, nprocs: int, out_dir: Path, deadline_s: float = 240) -> list[dict]:
    """Run `scenario` on `nprocs` ranks; returns each rank's saved dict (fails on any error)."""
    port = free_port()
    procs = [_CTX.Process(target=worker.run_rank, args=(scenario, str(out_dir), r, nprocs, port), daemon=True)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + deadline_s
    try:
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    for r, p in enumerate(procs):
        assert p.exitcode == 0, f"rank {r} exited {p.exitcode}:\n{(out_dir / f'rank{r}.log').read_text()}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


_REFERENCE = {}


def reference(cfg, steps: int = worker.STEPS):
    """dp=1, replicated AdamW with the structured decay mask: the run every dp must match."""
    if (cfg, steps) not in _REFERENCE:
        opt = worker.optimizer_factory(optim.default_decay_mask)
        _REFERENCE[cfg, steps] = worker.train_run(cfg, opt, None, steps=steps)
    return _REFERENCE[cfg, steps]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def assert_matches_reference(losses, params, ref_state, ref_losses, what: str) -> None:
    assert len(losses) == len(ref_losses)
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    assert worst <= 1e-5, f"{what}: loss curve differs by {worst:.2e} relative"
    assert ref_losses[-1] < (0.7 if len(ref_losses) >= 20 else 0.95) * ref_losses[0]   # it really trained
    for (path, got), (_, want) in zip(tree.paths_and_leaves(params), tree.paths_and_leaves(ref_state.params)):
        assert rel(got, want) <= 1e-5, f"{what}: final param {path} differs by {rel(got, want):.2e}"


def assert_ranks_agree(saved: list[dict], losses, params) -> None:
    """Every rank saw the same loss curve and ended with bitwise the same params."""
    for other in saved[1:]:
        assert losses(other) == losses(saved[0])
        for a, b in zip(optree.tree_leaves(params(saved[0])), optree.tree_leaves(params(other))):
            assert torch.equal(a, b)


def check_zero_facts(facts: dict, dp: int, ref_state) -> None:
    shard = math.ceil(facts["total"] / dp)
    assert facts["shard_len"] == shard
    assert facts["opt_bytes"] == shard * 2 * 4          # adam's mu and nu, fp32
    assert facts["n_buckets"] > 1
    assert facts["roundtrip_equal"]                     # shard_state(gather_state(s)) == s
    assert facts["padding_zero"]
    assert facts["gather"] == "broadcast"               # "auto" on gloo
    assert_logical_state(facts["full_state"], ref_state.opt_state)


def assert_logical_state(full, want) -> None:
    """gather_state gave the state a dp=1 replicated optimizer has (structure, counts, moments)."""
    assert optree.tree_structure(full) == optree.tree_structure(want)
    for got, exp in zip(optree.tree_leaves(full), optree.tree_leaves(want)):
        if got.ndim == 0:
            assert torch.equal(got, exp)                # the update counts
        else:
            assert got.shape == exp.shape and rel(got, exp) <= 1e-4


# ------------------------------------------------------------------ multi-process


def test_dp2_stages_0_1_2_3_match_dp1(tmp_path):
    saved = run_world("stages", 2, tmp_path)
    ref_state, ref_losses = reference(worker.CFG)
    for stage in (0, 1, 2):
        assert_ranks_agree(saved, lambda s: s[stage]["losses"], lambda s: s[stage]["params"])
        got = saved[0][stage]
        assert_matches_reference(got["losses"], got["params"], ref_state, ref_losses, f"dp=2 stage {stage}")
    for rank, s in enumerate(saved):
        for stage in (1, 2):
            check_zero_facts(s[stage], 2, ref_state)
        # ZeRO-2 through the mesh's all-reduce fallback and all_gather: the same run bitwise.
        assert s["fallback_losses"] == s[2]["losses"][:5]
    # Stage 3: params sharded per unit (rest, layer 0, layer 1), gathered per layer.
    assert_ranks_agree(saved, lambda s: s[3]["losses"], lambda s: s[3]["params"])
    assert_matches_reference(saved[0][3]["losses"], saved[0][3]["params"], ref_state, ref_losses, "dp=2 stage 3")
    for s in saved:
        z3 = s[3]
        assert z3["unit_shards"] == [math.ceil(t / 2) for t in z3["unit_totals"]]
        assert z3["opt_bytes"] == sum(z3["unit_shards"]) * 2 * 4 and z3["param_bytes"] == sum(z3["unit_shards"]) * 4
        units = 1 + worker.CFG.n_layers
        # Each unit gathered once in forward, once more in backward, never two layers at once.
        assert z3["stats"] == {"gathers": units * worker.STEPS, "regathers": units * worker.STEPS,
                               "max_regathered": 2}
        assert z3["roundtrip_equal"]
        assert_logical_state(z3["full_state"], ref_state.opt_state)
    # A state saved at dp=2 restores at dp=1: resharded, then gathered again, bitwise the same.
    one = zero.ZeroRule(worker.optimizer_factory, None, stage=1)
    one.init(ref_state.params)
    restored = one.shard_state(saved[0][2]["full_state"])
    for a, b in zip(optree.tree_leaves(one.gather_state(restored)), optree.tree_leaves(saved[0][2]["full_state"])):
        assert torch.equal(a, b)
    # Each rank held a different half of the state; together they are the whole (equal) state.
    for a, b in zip(optree.tree_leaves(saved[0][2]["full_state"]), optree.tree_leaves(saved[1][2]["full_state"])):
        assert torch.equal(a, b)


def test_dp4_stage2_with_padded_shards(tmp_path):
    cfg = worker.PADDED_CFG
    saved = run_world("padded", 4, tmp_path)
    ref_state, ref_losses = reference(cfg)
    total = saved[0][2]["total"]
    assert total % 4 != 0                               # the last shard really ends in padding
    assert_ranks_agree(saved, lambda s: s[2]["losses"], lambda s: s[2]["params"])
    assert_matches_reference(saved[0][2]["losses"], saved[0][2]["params"], ref_state, ref_losses, "dp=4 stage 2")
    for s in saved:
        check_zero_facts(s[2], 4, ref_state)


def test_two_node_torchrun_launch_agrees_with_dp1(tmp_path):
    """Two torchrun launches (`--nnodes 2`, one process each) rendezvous on localhost."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1",
               ZERO_TEST_TIMEOUT_S="120")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(Path(worker.__file__)), "twonode", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (p, out) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{out}"
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [s["dp"] for s in saved] == [2, 2]
    assert_ranks_agree(saved, lambda s: s["losses"], lambda s: s["params"])
    ref_state, ref_losses = reference(worker.CFG, steps=5)
    assert_matches_reference(saved[0]["losses"], saved[0]["params"], ref_state, ref_losses, "two nodes")


# ------------------------------------------------------------------ one process


def _tiny_params():
    from fnllama import model
    from fnllama import random as fr
    return model.init(fr.key(0), worker.CFG)


@pytest.mark.parametrize("dp,bucket_len", [(1, 1000), (3, 4096), (4, 777)])
def test_buckets_tile_the_shard_and_read_range_matches_flatten(dp, bucket_len):
    params = _tiny_params()
    layout = tree.make_layout(params, pad_to=dp)
    flat = tree.flatten(params, layout)
    leaves = layout.treespec.flatten_up_to(params)
    for rank in range(dp):
        plan = zero.ShardPlan(layout, dp, rank, bucket_len)
        starts = [(s, n) for s, n in plan.buckets()]
        assert sum(n for _, n in starts) == plan.shard_len == -(-layout.total // dp)
        assert all(s == i * bucket_len for i, (s, _) in enumerate(starts))
        lo, hi = plan.shard_range
        assert torch.equal(zero.shard_of(params, plan), flat[lo:hi])
    for lo, n in [(0, 1), (63, 200), (layout.total - 5, 5 + layout.padded_total - layout.total), (4000, 60000)]:
        out = torch.full((n,), float("nan"))
        assert torch.equal(zero.read_range(leaves, layout, lo, out), flat[lo:lo + n])


def test_decay_multipliers_are_the_flattened_mask():
    params = _tiny_params()
    plan = zero.make_plan(params, dp=1, rank=0, bucket_bytes=1 << 20)
    want = tree.flatten(optim.mask_as_multipliers(optim.default_decay_mask, params), plan.layout)
    got = zero.decay_multipliers(optim.default_decay_mask, params, plan)
    assert torch.equal(got, want) and 0 < got.sum() < got.numel()   # norms exempt, matrices decay
    assert torch.equal(zero.decay_multipliers(None, params, plan), torch.ones(plan.shard_len))


def test_factory_gets_the_flat_mask_and_a_plain_optimizer_is_used_as_given():
    params = _tiny_params()
    seen = []
    rule = zero.ZeroRule(lambda mask: seen.append(mask) or optim.sgd(0.1), None, stage=1)
    state = rule.init(params)
    assert list(seen[0]) == ["flat"] and seen[0]["flat"].shape == (tree.num_elements(params),)
    assert zero.optimizer_state_bytes(state) == 0
    plain = zero.ZeroRule(optim.adamw(1e-3), None, stage=2)
    assert zero.optimizer_state_bytes(plain.init(params)) == tree.num_elements(params) * 8


def test_one_rank_update_equals_replicated_sgd():
    """At dp=1 a ZeRO step is the plain update: p - lr * g, element for element."""
    params = _tiny_params()
    grads = optree.tree_map(torch.randn_like, params)
    rule = zero.ZeroRule(optim.sgd(0.5), None, stage=2, bucket_bytes=4096)
    opt_state = rule.init(params)
    reduced = rule.reduce_grads(grads)
    torch.testing.assert_close(rule.global_norm(reduced), optim.global_norm(grads))
    assert zero.flat_buffer_of(params, rule.plan.layout) is None      # separate leaves
    new, _ = rule.apply(reduced, opt_state, params, grad_scale=torch.tensor(2.0))
    flat = zero.flat_buffer_of(new, rule.plan.layout)                   # views of one buffer
    assert flat is not None and torch.equal(flat, tree.flatten(new, rule.plan.layout))
    for (path, p), (_, g), (_, q) in zip(*(tree.paths_and_leaves(t) for t in (params, grads, new))):
        torch.testing.assert_close(q, p - g, rtol=1e-6, atol=1e-7, msg=path)


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ConfigError, match="stage=3, expected 1 or 2"):
        zero.ZeroRule(optim.sgd(0.1), None, stage=3)
    assert isinstance(zero.make_rule(optim.sgd(0.1), None, stage=3), zero3.Zero3Rule)
    with pytest.raises(ConfigError, match="bucket_bytes"):
        zero.ZeroRule(optim.sgd(0.1), None, bucket_bytes=0)
    rule = zero.ZeroRule(optim.adamw(1e-3), None)
    with pytest.raises(ValueError, match="call rule.init"):
        rule.gather_state(())
    params = _tiny_params()
    rule.init(params)
    with pytest.raises(ValueError, match="structure this optimizer makes"):
        rule.shard_state({"mu": 1})
    with pytest.raises(ValueError, match="leaf 'embed' has shape"):
        rule.reduce_grads({**params, "embed": torch.zeros(3, 3)})


def test_stage3_one_rank_shards_round_trip_and_rejects_recompute():
    params = _tiny_params()
    rule = zero3.Zero3Rule(worker.optimizer_factory, None, bucket_bytes=4096)
    state = rule.shard_train_state(train.init_state(worker.fr.key(0), worker.CFG, rule, params=params))
    assert sorted(state.params) == ["layers", "rest"] and len(state.params["layers"]) == worker.CFG.n_layers
    gathered = rule.gather_params(state.params)
    for (path, a), (_, b) in zip(tree.paths_and_leaves(gathered), tree.paths_and_leaves(params)):
        assert torch.equal(a, b), path
    batch = worker.global_batches(1)[0]
    with pytest.raises(ConfigError, match="recompute='full' is not supported"):
        rule.loss_fn(state.params, batch, worker.CFG, recompute="full")
    with pytest.raises(ValueError, match="full params first"):
        zero3.Zero3Rule(optim.sgd(0.1), None).init(state.params)
