"""fnllama.mesh on real gloo process groups.

Multi-process tests start one process per rank (forked from a forkserver that imported
torch once) that joins through torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT on a free port); the test compares what the ranks saved with values
computed here. A world of one runs in this process.
"""

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fnllama.errors import ConfigError
from fnllama.mesh import CollectiveError, Mesh, _is_unsupported, pad_to_multiple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _mesh_worker  # noqa: E402
from _mesh_worker import rank_input  # noqa: E402
from dist_support import free_port

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "fnllama.mesh", "_mesh_worker"])



def launch(scenario: str, nprocs: int, out_dir: Path, *, timeout_s: float = 30, deadline_s: float = 60):
    """Start one process per rank; returns them and the monotonic deadline for `collect`."""
    port = free_port()
    procs = [
        _CTX.Process(target=_mesh_worker.run_rank,
                     args=(scenario, str(out_dir), rank, nprocs, port, timeout_s), daemon=True)
        for rank in range(nprocs)
    ]
    for p in procs:
        p.start()
    return procs, out_dir, time.monotonic() + deadline_s


def collect(procs, out_dir: Path, deadline: float, ranks=None) -> dict[int, tuple[int | None, str]]:
    """Wait for `ranks` (default all) until the deadline, then kill every rank still running.

    Returns {rank: (exit code, log)}; the code is None for a waited-for rank that had to be
    killed at the deadline.
    """
    codes = {}
    try:
        for rank in range(len(procs)) if ranks is None else ranks:
            procs[rank].join(timeout=max(deadline - time.monotonic(), 0.1))
            codes[rank] = procs[rank].exitcode
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    logs = {r: (out_dir / f"rank{r}.log").read_text() for r in range(len(procs))}
    return {r: (codes.get(r, procs[r].exitcode), logs[r]) for r in range(len(procs))}


def run_ok(scenario: str, nprocs: int, out_dir: Path) -> list[dict]:
    results = collect(*launch(scenario, nprocs, out_dir))
    for rank, (code, out) in results.items():
        assert code == 0, f"rank {rank} exited {code}:\n{out}"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(nprocs)]


def check_collectives(saved: list[dict]) -> None:
    n = len(saved)
    xs = [rank_input(r, (4, 6)) for r in range(n)]
    bs = [rank_input(r, (64,), torch.bfloat16) for r in range(n)]
    total = torch.stack(xs).sum(0)
    for r, got in enumerate(saved):
        assert (got["rank"], got["size"]) == (r, n)
        torch.testing.assert_close(got["psum"], total)
        torch.testing.assert_close(got["pmean"], total / n)
        assert got["psum_bf16"].dtype == torch.bfloat16
        exact = torch.stack([b.float() for b in bs]).sum(0)
        assert torch.equal(got["psum_bf16_fp32"], exact.bfloat16())  # one rounding at the end
        torch.testing.assert_close(got["psum_bf16"].float(), exact, atol=0.1, rtol=0.02)
        assert torch.equal(got["gather0"], torch.cat(xs, 0))
        assert torch.equal(got["gather1"], torch.cat(xs, 1))
        flat_total = torch.stack([x.reshape(-1)[: 4 * n] for x in xs]).sum(0)
        torch.testing.assert_close(got["scatter_native"], flat_total[4 * r: 4 * r + 4])
        block_2d = torch.stack([rank_input(q, (2 * n, 3)) for q in range(n)]).sum(0)[2 * r: 2 * r + 2]
        torch.testing.assert_close(got["scatter_2d"], block_2d)
        assert torch.equal(got["broadcast"], xs[n - 1])
        assert got["input_untouched"]
        assert f"must divide by the axis size {n}" in got["indivisible_error"]


def check_fallback_exact(saved: list[dict]) -> None:
    n = len(saved)
    odd = pad_to_multiple(torch.stack([rank_input(r, (2 * n + 1,)) for r in range(n)]).sum(0), n)
    for r, got in enumerate(saved):
        assert torch.equal(got["scatter_native"], got["scatter_fallback"])
        assert torch.equal(got["odd_native"], got["odd_fallback"])  # 2n+1 padded to 3n
        torch.testing.assert_close(got["odd_native"], odd[3 * r: 3 * r + 3])


def test_two_ranks(tmp_path):
    saved = run_ok("collectives", 2, tmp_path)
    check_collectives(saved)
    check_fallback_exact(saved)


def test_four_ranks_and_2d_mesh(tmp_path):
    saved = run_ok("collectives+2d", 4, tmp_path)
    check_collectives(saved)
    check_fallback_exact(saved)
    # {"dp": 2, "tp": 2}: rank = dp * 2 + tp, so dp groups are {0,2},{1,3}; tp groups {0,1},{2,3}.
    for r, got in enumerate(s["2d"] for s in saved):
        dp, tp = divmod(r, 2)
        assert (got["dp_rank"], got["tp_rank"]) == (dp, tp)
        assert got["psum_dp"].item() == tp + (tp + 2)
        assert got["psum_tp"].item() == 2 * dp + (2 * dp + 1)
        assert got["gather_tp"].tolist() == [2 * dp, 2 * dp + 1]
        assert got["scatter_dp"].item() == tp + (tp + 2)
        assert got["dp_group_timeout_s"] == 30  # subgroups get the mesh's timeout, not 30 min


def event_times(output: str, tag: str) -> list[float]:
    return [float(line.split()[1]) for line in output.splitlines() if line.startswith(tag)]


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_dead_or_stalled_peer_fails_survivor(tmp_path, how):
    """Rank 1 is SIGKILLed (or hangs) mid-loop; rank 0 must fail fast with a CollectiveError."""
    timeout_s = 4
    # Wait for rank 0 only; rank 1 (sleeping, in the stall case) is killed afterwards.
    results = collect(*launch(how, 2, tmp_path, timeout_s=timeout_s, deadline_s=40), ranks=[0])
    code, out = results[0]
    assert code not in (0, None), f"survivor exited {code}:\n{out}"
    assert "CollectiveError: psum over mesh axis 'dp' failed on rank 0" in out, out
    (failed_at,) = event_times(out, "FAILED_AT")
    (event_at,) = event_times(results[1][1], "EVENT_AT")
    assert 0 <= failed_at - event_at < timeout_s + 3, (failed_at - event_at, out)


# ------------------------------------------------------------- world of one


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")


def test_world_of_one_is_a_real_mesh(no_torchrun_env):
    x = torch.arange(6.0).reshape(3, 2)
    with Mesh.create(device_type="cpu", timeout_s=20) as mesh:
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert (mesh.world_size, mesh.size("dp"), mesh.rank("dp"), mesh.rank()) == (1, 1, 0, 0)
        assert (mesh.backend, mesh.device, mesh.shape) == ("gloo", torch.device("cpu"), {"dp": 1})
        for out in (mesh.psum(x, "dp"), mesh.pmean(x, "dp"), mesh.broadcast(x, "dp"),
                    mesh.all_gather(x, "dp", dim=1), mesh.psum_scatter(x, "dp"),
                    mesh.psum_scatter(x, "dp", impl="allreduce")):
            assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
        assert mesh.all_gather(torch.tensor(5.0), "dp").tolist() == [5.0]
        mesh.barrier()
        mesh.barrier("dp")
        with pytest.raises(TypeError, match="floating-point"):
            mesh.pmean(torch.ones(2, dtype=torch.int64), "dp")
        with pytest.raises(ValueError, match="no axis 'tp'"):
            mesh.psum(x, "tp")
        with pytest.raises(ValueError, match="src=1"):
            mesh.broadcast(x, "dp", src=1)
    assert not dist.is_initialized()


def test_world_of_one_with_inferred_and_unit_axes(no_torchrun_env):
    with Mesh.create({"dp": -1, "tp": 1}) as mesh:  # this machine's device kind
        assert mesh.shape == {"dp": 1, "tp": 1}
        assert mesh.psum(torch.ones(3, device=mesh.device), "tp").tolist() == [1, 1, 1]
    assert not dist.is_initialized()


def test_axes_that_do_not_fit_the_world_raise_and_clean_up(no_torchrun_env):
    with pytest.raises(ConfigError, match=r"multiply to 2, but the world has 1"):
        Mesh.create({"dp": 2})
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        Mesh.create({"dp": -1, "tp": -1})
    assert not dist.is_initialized()


def test_incomplete_torchrun_env_names_the_missing_vars(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT unset"):
        Mesh.create()
    assert not dist.is_initialized()


def test_pad_to_multiple():
    x = torch.arange(5.0)
    padded = pad_to_multiple(x, 4)
    assert padded.tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert pad_to_multiple(x, 5) is x
    assert pad_to_multiple(torch.ones(3, 2), 2).shape == (4, 2)


def test_unsupported_detection_only_matches_missing_collectives():
    assert _is_unsupported(RuntimeError("ProcessGroupGloo does not support reduce_scatter"))
    assert _is_unsupported(NotImplementedError("x"))
    assert not _is_unsupported(RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    assert not _is_unsupported(RuntimeError("Timed out waiting 3000ms for recv operation"))
    assert issubclass(CollectiveError, RuntimeError)


@pytest.mark.slow
def test_under_real_torchrun(tmp_path):
    """The same worker under torchrun itself (slow: torchrun's agent plus 2 fresh interpreters)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(Path(_mesh_worker.__file__)), "collectives", str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    check_collectives(saved)
    check_fallback_exact(saved)
