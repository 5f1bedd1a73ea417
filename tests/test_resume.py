"""Resume and reshard across real processes (`python -m fnllama.cli train`, torchrun for dp > 1):
bitwise resume in a new process (fp32, bf16, dp=2 ZeRO-2), a dp=2 ZeRO-2 checkpoint continuing
at dp=1 and a dp=1 one at dp=2 (dp=4: slow), and a model-shape mismatch on --load.

tests/test_run.py covers resume inside one process; here every run is its own process, so
nothing but the checkpoint carries state from one to the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnllama.checkpoint import Checkpointer
from dist_support import free_port

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def demo_prefix(tmp_path_factory) -> str:
    from fnllama.data import demo
    return demo.build_demo_dataset(str(tmp_path_factory.mktemp("demo")), seed=0, workers=1)


def _args(prefix: str, out: Path, iters: int, precision: str) -> list[str]:
    # global batch 4 = micro 1 x accum 4/dp x dp, so dp 1, 2 and 4 see the same batches;
    # the schedule is fixed at 20 steps, so a 10-step run is the first half of a 20-step one.
    return ["--model", "tiny", "--vocab-size", "2048", "--data-path", prefix, "--seq-length", "32",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "1e-3", "--lr-warmup-iters", "2", "--lr-decay-iters", "20", "--log-interval", "1",
            f"--{precision}", "--output-dir", str(out), "--save", str(out / "ckpt"), "--save-interval", "10"]


def train(prefix: str, out: Path, *extra: str, iters: int = 20, dp: int = 1, precision: str = "fp32") -> dict:
    """One `fnllama train` process (torchrun with dp ranks, ZeRO-2, when dp > 1); its stdout and losses.

    One intra-op thread, as torchrun gives each rank: on 2 shared cores a second thread made
    dp=1 steps 10x slower and erratic.
    """
    cmd = [sys.executable, "-m", "fnllama.cli", "train", *_args(prefix, out, iters, precision), *extra]
    if dp > 1:
        cmd += ["--nproc-per-node", str(dp), "--zero-stage", "2", "--master-port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {"stdout": proc.stdout, "losses": {r["iteration"]: r["loss"] for r in records}}


def saved_part(directory: Path, step: int, rank: int = 0, world: int = 1) -> dict:
    flat, _ = Checkpointer(directory, rank=rank, world_size=world, read_only=True).restore(step=step)
    return flat


def assert_bitwise_same_parts(a: Path, b: Path, step: int, world: int = 1) -> None:
    for rank in range(world):
        x, y = saved_part(a, step, rank, world), saved_part(b, step, rank, world)
        assert sorted(x) == sorted(y)
        assert any(p.startswith("opt_state.") and p.endswith(("mu.flat", "mu.embed")) for p in x)
        for path in x:
            if isinstance(x[path], torch.Tensor):
                assert x[path].dtype == y[path].dtype and torch.equal(x[path], y[path]), (rank, path)
            else:
                assert x[path] == y[path], (rank, path)


def assert_close_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    for it in steps:
        assert abs(got[it] - want[it]) <= 1e-6 * abs(want[it]), (it, got[it], want[it])


@pytest.fixture(scope="module")
def runs(demo_prefix, tmp_path_factory) -> dict:
    """20 steps straight at dp=1 (replicated optimizer) and at dp=2 ZeRO-2, saving at 10 and 20."""
    root = tmp_path_factory.mktemp("runs")
    return {"root": root, "dp1": train(demo_prefix, root / "dp1"), "dp2": train(demo_prefix, root / "dp2", dp=2)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ten_steps_then_ten_in_a_new_process_is_bitwise_twenty_straight(demo_prefix, runs, tmp_path, precision):
    straight = runs["dp1"] if precision == "fp32" else train(demo_prefix, tmp_path / "straight", precision=precision)
    straight_dir = runs["root"] / "dp1" if precision == "fp32" else tmp_path / "straight"
    out = tmp_path / "split"
    first = train(demo_prefix, out, iters=10, precision=precision)            # the process exits at step 10
    second = train(demo_prefix, out, "--resume", precision=precision)          # a new one resumes
    assert "restored step 10" in second["stdout"]
    assert sorted(first["losses"]) == list(range(1, 11))
    assert second["losses"] == straight["losses"]                              # 1..20, bit for bit
    assert_bitwise_same_parts(straight_dir / "ckpt", out / "ckpt", 20)         # params, moments, key, data...


def test_dp2_zero2_resume_in_new_processes_is_bitwise(demo_prefix, runs, tmp_path):
    out = tmp_path / "dp2_resumed"
    resumed = train(demo_prefix, out, "--load", str(runs["root"] / "dp2" / "ckpt"), "--ckpt-step", "10", dp=2)
    assert "restored step 10" in resumed["stdout"]
    want = {it: loss for it, loss in runs["dp2"]["losses"].items() if it > 10}
    assert resumed["losses"] == want
    assert_bitwise_same_parts(runs["root"] / "dp2" / "ckpt", out / "ckpt", 20, world=2)


def test_dp2_zero2_checkpoint_continues_at_dp1_like_an_unsharded_run(demo_prefix, runs, tmp_path):
    resumed = train(demo_prefix, tmp_path / "to_dp1", "--load", str(runs["root"] / "dp2" / "ckpt"),
                    "--ckpt-step", "10")
    assert "restored step 10" in resumed["stdout"] and sorted(resumed["losses"]) == list(range(11, 21))
    assert_close_losses(resumed["losses"], runs["dp1"]["losses"], range(11, 21))


def test_dp1_checkpoint_continues_at_dp2_zero2_like_an_unsharded_run(demo_prefix, runs, tmp_path):
    resumed = train(demo_prefix, tmp_path / "to_dp2", "--load", str(runs["root"] / "dp1" / "ckpt"),
                    "--ckpt-step", "10", dp=2)
    assert "restored step 10" in resumed["stdout"] and sorted(resumed["losses"]) == list(range(11, 21))
    assert_close_losses(resumed["losses"], runs["dp1"]["losses"], range(11, 21))


@pytest.mark.slow
def test_dp2_zero2_checkpoint_continues_at_dp4(demo_prefix, runs, tmp_path):
    resumed = train(demo_prefix, tmp_path / "to_dp4", "--load", str(runs["root"] / "dp2" / "ckpt"),
                    "--ckpt-step", "10", dp=4)
    assert_close_losses(resumed["losses"], runs["dp1"]["losses"], range(11, 21))


def test_load_into_another_hidden_size_names_the_parameter_and_both_shapes(demo_prefix, runs, tmp_path, capsys):
    from fnllama import cli

    argv = ["train", "--load", str(runs["root"] / "dp2" / "ckpt"), "--hidden-size", "32", "--data-path",
            demo_prefix, "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--train-iters", "22", "--output-dir", str(tmp_path / "wider")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("fnllama train: error: checkpoint ")
    assert "params.embed: saved shape (2048, 64), template shape (2048, 32)" in err
