"""fnllama.checkpoint on real orbax: lossless round trips, template errors, retention,
async snapshots, corrupted files, unwritable paths, SIGKILL mid-save, and a 2-rank commit."""

import json
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import optree
import pytest
import torch

from fnllama import optim
from fnllama.checkpoint import Checkpointer, committed_steps
from fnllama.errors import CheckpointError

WORKER = os.path.join(os.path.dirname(__file__), "_checkpoint_worker.py")


class LossScale(NamedTuple):
    scale: torch.Tensor
    good_steps: torch.Tensor


class State(NamedTuple):
    params: dict
    opt_state: tuple
    step: torch.Tensor
    key: torch.Tensor
    data: dict
    loss_scale: LossScale


def make_state(seed: int = 0) -> State:
    """A TrainState-like tree: every dtype a run holds, 0-d and empty leaves, nested NamedTuples."""
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0e38])
    params = {
        "embed": torch.randn(16, 8, generator=g).bfloat16(),
        "layers": [{"w": torch.randn(8, 8, generator=g), "norm": torch.randn(8, generator=g).half()}
                   for _ in range(2)],
        "special_bf16": special.bfloat16(),
        "special_f32": special,
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "fp8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
    }
    fp32 = optree.tree_map(lambda t: t.float(), {"embed": params["embed"], "layers": params["layers"]})
    opt_state = optim.adamw(1e-3).init(fp32)
    return State(
        params=params, opt_state=opt_state, step=torch.tensor(7),
        key=torch.tensor([1234567890123, -5], dtype=torch.int64),
        data={"epoch": 1, "pos": 2**40 + 3, "frac": 0.1, "shuffle": True, "name": "alpaca",
              "mask": torch.tensor([True, False, True]), "tok": torch.tensor([1, 2], dtype=torch.int32),
              "u8": torch.tensor([255], dtype=torch.uint8)},
        loss_scale=LossScale(torch.tensor(65536.0), torch.tensor(3, dtype=torch.int32)),
    )


def like(state, device="meta"):
    """A template: the structure and shapes of `state`, nothing allocated."""
    return optree.tree_map(lambda x: torch.empty(x.shape, dtype=x.dtype, device=device)
                           if isinstance(x, torch.Tensor) else type(x)(), state)


def bitwise_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return type(a) is type(b) and a == b


def assert_same_tree(got, want):
    assert optree.tree_structure(got) == optree.tree_structure(want)
    for (path, g), w in zip(zip(*optree.tree_flatten_with_path(got)[:2]), optree.tree_leaves(want)):
        assert bitwise_equal(g, w), path


def test_round_trip_is_bitwise_and_keeps_structure(tmp_path):
    state = make_state()
    config = {"model": {"dim": 8, "n_layers": 2}, "lr": 1e-3, "name": "tiny"}
    with Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.save(7, state, config)
        ckpt.wait()
        assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
        restored, got_config = ckpt.restore(like(state))
    assert_same_tree(restored, state)
    assert type(restored) is State and type(restored.loss_scale) is LossScale
    assert type(restored.opt_state[0]).__name__ == type(state.opt_state[0]).__name__
    assert restored.step.ndim == 0 and restored.params["empty"].shape == (0, 4)
    assert got_config == config
    # A fresh process-like reader sees the same, also without a template (flat by path).
    flat, _ = Checkpointer(tmp_path / "ck").restore()
    assert bitwise_equal(flat["params.layers.1.w"], state.params["layers"][1]["w"])
    assert flat["data.pos"] == 2**40 + 3 and flat["loss_scale.good_steps"].dtype == torch.int32


def test_template_that_does_not_fit_names_paths_and_shapes(tmp_path):
    state = {"embed": torch.zeros(16, 8), "layers": [{"w": torch.zeros(8, 8)}], "step": 3}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        bigger = {"embed": torch.zeros(32, 8), "layers": [{"w": torch.zeros(8, 8)}], "step": 0}
        with pytest.raises(CheckpointError, match=r"embed: saved shape \(16, 8\), template shape \(32, 8\)"):
            ckpt.restore(bigger)
        other = {"embed": torch.zeros(16, 8), "layers": [{"w": torch.zeros(8, 8)}, {"w": torch.zeros(8, 8)}]}
        with pytest.raises(CheckpointError) as err:
            ckpt.restore(other)
        msg = str(err.value)
        assert "missing from the checkpoint: ['layers.1.w']" in msg
        assert "unexpected in the checkpoint (not in the template): ['step']" in msg
        assert os.path.join("rank_0", "1") in msg
        with pytest.raises(CheckpointError, match="saved dtype float32, template dtype bfloat16"):
            ckpt.restore(optree.tree_map(lambda x: x.bfloat16() if isinstance(x, torch.Tensor) else x, state))
        with pytest.raises(CheckpointError, match=r"step 2 is not a committed checkpoint .*committed: \[1\]"):
            ckpt.restore(state, step=2)


def test_restore_on_requested_device_and_template_device(tmp_path):
    state = {"w": torch.randn(4, 4).bfloat16()}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        out, _ = ckpt.restore({"w": torch.empty(4, 4, dtype=torch.bfloat16, device="meta")}, device="cpu")
        assert out["w"].device.type == "cpu" and bitwise_equal(out["w"], state["w"])
        out, _ = ckpt.restore({"w": torch.zeros(4, 4, dtype=torch.bfloat16)})
        assert out["w"].device.type == "cpu" and bitwise_equal(out["w"], state["w"])


def test_interval_retention_and_keep_period(tmp_path):
    with Checkpointer(tmp_path, save_interval=2, max_to_keep=2, keep_period=4) as ckpt:
        saved = [step for step in range(1, 11) if ckpt.save(step, {"x": torch.tensor(float(step))})]
        assert saved == [2, 4, 6, 8, 10]
        ckpt.wait()
        assert ckpt.all_steps() == [4, 8, 10]
        assert ckpt.save(11, {"x": torch.tensor(11.0)}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [4, 8, 10, 11]
        # step 10 survives max_to_keep=2 as the newest-but-one; 6 and 2 are gone from disk too.
        assert sorted(os.listdir(tmp_path / "rank_0"), key=lambda n: (len(n), n))[:4] == ["4", "8", "10", "11"]
        out, _ = ckpt.restore({"x": torch.tensor(0.0)}, step=4)
        assert out["x"].item() == 4.0
        assert not ckpt.save(10, {"x": torch.tensor(0.0)}, force=True)  # already committed
        with pytest.raises(CheckpointError, match="older than the newest committed step 11"):
            ckpt.save(9, {"x": torch.tensor(0.0)}, force=True)


def test_async_save_is_a_snapshot(tmp_path):
    """Changing the tensors in place right after save() does not reach the checkpoint."""
    state = {"w": torch.ones(512, 512)}
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state)
        state["w"].mul_(3.0)
        ckpt.wait()
        out, _ = ckpt.restore({"w": torch.empty(512, 512)})
    assert torch.equal(out["w"], torch.ones(512, 512))


def _largest_file(root) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def test_truncated_array_file_names_step_dir_and_item(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {"w": torch.randn(256, 256)})
    victim = _largest_file(tmp_path / "rank_0" / "5" / "arrays")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(CheckpointError) as err:
        Checkpointer(tmp_path).restore({"w": torch.empty(256, 256)})
    assert f"item 'arrays' of checkpoint {tmp_path / 'rank_0' / '5'}" in str(err.value)


def test_corrupted_metadata_names_step_dir_and_item(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {"w": torch.randn(4)})
    with open(tmp_path / "rank_0" / "5" / "meta" / "metadata", "w") as f:
        f.write('{"format": "fnllama-checkpoint/1", "leav')
    with pytest.raises(CheckpointError) as err:
        Checkpointer(tmp_path).restore({"w": torch.empty(4)})
    assert f"item 'meta' of checkpoint {tmp_path / 'rank_0' / '5'}" in str(err.value)


def test_directory_under_a_file_is_an_error_with_the_path(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointError, match=str(tmp_path / "file" / "ck")):
        Checkpointer(tmp_path / "file" / "ck")


@pytest.mark.parametrize("async_save", [True, False])
def test_unwritable_rank_dir_fails_with_path_and_leaves_state_alone(tmp_path, async_save):
    """The rank directory turns into a file mid-run (works as root, unlike chmod)."""
    state = {"w": torch.randn(64, 64), "step": 1}
    before = optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
    ckpt = Checkpointer(tmp_path, async_save=async_save)
    ckpt.save(1, state)
    ckpt.wait()
    os.rename(tmp_path / "rank_0", tmp_path / "moved")
    (tmp_path / "rank_0").write_text("in the way")
    with pytest.raises(CheckpointError, match=str(tmp_path / "rank_0")):
        ckpt.save(2, state)
        ckpt.wait()
    assert_same_tree(state, before)
    assert committed_steps(str(tmp_path)) == [1]
    ckpt.close()


def test_sigkill_mid_save_keeps_previous_step_and_cleans_partial(tmp_path):
    directory = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, WORKER, "kill", str(directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "committed 1"
        deadline = time.monotonic() + 60
        while not any(n.endswith("tmp") and int(n.split(".")[0]) >= 2
                      for n in os.listdir(directory / "rank_0")):
            assert time.monotonic() < deadline, "no second save started"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    committed = committed_steps(str(directory))
    on_disk = set(os.listdir(directory / "rank_0"))
    partial = {n for n in on_disk if not (n.isdigit() and int(n) in committed)}
    assert committed and partial, (committed, on_disk)

    ckpt = Checkpointer(directory)  # a new run: the partial save is ignored and cleaned
    assert ckpt.latest_step() == committed[-1]
    assert set(os.listdir(directory / "rank_0")) == {str(s) for s in committed}
    step = committed[-1]
    out, _ = ckpt.restore({"params": {f"w{i}": torch.empty(1024, 1024, device="meta") for i in range(12)},
                           "step": torch.empty((), dtype=torch.int64)})
    assert out["step"].item() == step
    assert all(torch.equal(w, torch.full((1024, 1024), float(step))) for w in out["params"].values())
    ckpt.save(step + 1, out)  # the run goes on from there
    ckpt.close()
    assert committed_steps(str(directory))[-1] == step + 1


def test_two_ranks_commit_only_complete_steps(tmp_path):
    directory = tmp_path / "ck"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, WORKER, "world", str(directory), str(r), "2"], env=env)
             for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["latest"] == 3 and r["steps"] == [1, 2, 3]
        assert r["restored_ok"] and r["config"] == {"run": "world"}
    assert "step 4 not committed" in results[0]["step4_error"]
    assert "rank(s) [1]" in results[0]["step4_error"]
    assert results[0]["latest_after_4"] == 3
    assert os.path.isdir(directory / "rank_0" / "4")  # rank 0's part, never committed
    ckpt = Checkpointer(directory, rank=0, world_size=1)  # a restart cleans it up
    assert ckpt.latest_step() == 3 and not os.path.exists(directory / "rank_0" / "4")
    ckpt.close()


def test_real_train_state_round_trip_and_other_model_config(tmp_path):
    from fnllama import random as fr
    from fnllama.config import get_preset
    from fnllama.train import TrainState, init_state

    cfg = get_preset("tiny")
    state = init_state(fr.key(0), cfg, optim.adamw(1e-3), compute_dtype=torch.bfloat16)
    state = state._replace(step=torch.tensor(12), data={"epoch": 0, "index": 96})
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(12, state, {"model": {"dim": cfg.dim}})
        ckpt.wait()
        template = init_state(fr.key(1), cfg, optim.adamw(1e-3), compute_dtype=torch.bfloat16)
        template = template._replace(data={"epoch": 0, "index": 0})
        restored, _ = ckpt.restore(template)
        assert type(restored) is TrainState
        assert_same_tree(restored, state)
        wider = init_state(fr.key(0), get_preset("tiny", dim=128), optim.adamw(1e-3))._replace(
            data={"epoch": 0, "index": 0})
        with pytest.raises(CheckpointError, match=r"params\.embed: saved shape \(256, 64\), template shape \(256, 128\)"):
            ckpt.restore(wider)


# ------------------------------------------------------------------ resharding (in one process)

def _parts(full: torch.Tensor, dp: int) -> list[torch.Tensor]:
    """ZeRO's split of a logical flat buffer: padded to a multiple of dp, S elements per rank."""
    s = -(-full.numel() // dp)
    padded = torch.cat([full, torch.zeros(s * dp - full.numel())])
    return [padded[r * s:(r + 1) * s].clone() for r in range(dp)]


def _save_world(directory, dp: int, mu: torch.Tensor, nu: torch.Tensor, step: int = 3) -> None:
    """Each of `dp` ranks saves its shards; rank 0 last, so its wait() commits the step."""
    total, s = mu.numel(), -(-mu.numel() // dp)
    ckpts = []
    for rank in reversed(range(dp)):
        ckpt = Checkpointer(directory, rank=rank, world_size=dp, barrier=lambda: None, async_save=False)
        state = {"params": {"w": torch.arange(6.0)}, "opt": {"count": torch.tensor(step),
                 "mu": {"flat": _parts(mu, dp)[rank]}, "nu": {"flat": _parts(nu, dp)[rank]}}}
        shards = {f"opt.{g}.flat": (f"opt.{g}", rank * s, total) for g in ("mu", "nu")}
        ckpt.save(step, state, {"dp": dp}, shards=shards)
        ckpts.append(ckpt)
    for ckpt in reversed(ckpts):  # rank 0 first: it commits, then the others see the commit
        ckpt.close()


def _restore_rank(directory, rank: int, dp: int, total: int):
    s = -(-total // dp)
    template = {"params": {"w": torch.empty(6, device="meta")}, "opt": {
        "count": torch.empty((), dtype=torch.int64, device="meta"),
        "mu": {"flat": torch.empty(s, device="meta")}, "nu": {"flat": torch.empty(s, device="meta")}}}
    shards = {f"opt.{g}.flat": (f"opt.{g}", rank * s, total) for g in ("mu", "nu")}
    ckpt = Checkpointer(directory, rank=rank, world_size=dp, read_only=True)
    return ckpt.restore(template, shards=shards)


@pytest.mark.parametrize("old_dp,new_dp", [(2, 1), (2, 3), (1, 2), (3, 2), (2, 2)])
def test_sharded_leaves_restore_into_another_world_size(tmp_path, old_dp, new_dp):
    total = 11                                                   # not a multiple of 2 or 3: padding
    mu, nu = torch.randn(total), torch.randn(total)
    _save_world(tmp_path, old_dp, mu, nu)
    for rank in range(new_dp):
        state, config = _restore_rank(tmp_path, rank, new_dp, total)
        assert config == {"dp": old_dp} and state["opt"]["count"].item() == 3
        assert torch.equal(state["params"]["w"], torch.arange(6.0))
        assert bitwise_equal(state["opt"]["mu"]["flat"], _parts(mu, new_dp)[rank])   # padding is zero
        assert bitwise_equal(state["opt"]["nu"]["flat"], _parts(nu, new_dp)[rank])


def test_sharded_leaves_restore_as_a_replicated_tree_and_back(tmp_path):
    """ZeRO's flat shards <-> a params-shaped moment tree (offsets in the same flat layout)."""
    mu, nu = torch.randn(11), torch.randn(11)
    _save_world(tmp_path / "zero", 2, mu, nu)
    shapes = {"a": (2, 3), "b": (5,)}                            # flat layout: a at 0, b at 6
    tree_template = {"params": {"w": torch.empty(6)}, "opt": {"count": torch.tensor(0), **{
        g: {k: torch.empty(v) for k, v in shapes.items()} for g in ("mu", "nu")}}}
    tree_shards = {f"opt.{g}.{k}": (f"opt.{g}", off, 11) for g in ("mu", "nu") for k, off in (("a", 0), ("b", 6))}
    full, _ = Checkpointer(tmp_path / "zero", read_only=True).restore(tree_template, shards=tree_shards)
    assert torch.equal(full["opt"]["mu"]["a"], mu[:6].view(2, 3)) and torch.equal(full["opt"]["nu"]["b"], nu[6:])

    with Checkpointer(tmp_path / "tree") as ckpt:                 # saved replicated, read as dp=3 shards
        ckpt.save(3, full, {"dp": 1}, shards=tree_shards)
    for rank in range(3):
        state, _ = _restore_rank(tmp_path / "tree", rank, 3, 11)
        assert torch.equal(state["opt"]["mu"]["flat"], _parts(mu, 3)[rank])


def test_sharded_leaves_of_another_size_name_the_group_and_totals(tmp_path):
    _save_world(tmp_path, 2, torch.randn(11), torch.randn(11))
    with pytest.raises(CheckpointError, match=r"opt\.mu: saved 11 elements, template 13"):
        _restore_rank(tmp_path, 0, 1, 13)
