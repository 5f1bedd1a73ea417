"""One rank of a multi-process mesh test; tests/test_mesh.py starts N of these.

The test forks ranks from a multiprocessing forkserver that has imported torch once
(`run_rank`), which is several seconds cheaper per rank than a fresh interpreter on a busy
2-core machine. Each rank still joins through torchrun's environment variables. By hand:

    torchrun --nproc-per-node 2 tests/_mesh_worker.py SCENARIO OUT_DIR

Each scenario saves what the collectives returned to OUT_DIR/rank{R}.pt; the test computes
the expected values itself. "kill" and "stall" make rank 1 die or hang mid-loop so the test
can check that rank 0 fails with a CollectiveError instead of hanging.
"""

import os
import signal
import sys
import time

import torch

from dist_support import become_rank
from fnllama.mesh import Mesh, pad_to_multiple


def rank_input(rank: int, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """The tensor rank `rank` contributes; the test rebuilds it to compute expectations."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(shape, generator=gen).to(dtype)


def collectives(mesh: Mesh) -> dict:
    r, n = mesh.rank("dp"), mesh.size("dp")
    x = rank_input(r, (4, 6))
    b = rank_input(r, (64,), torch.bfloat16)
    odd = rank_input(r, (2 * n + 1,))  # not divisible by dp
    padded = pad_to_multiple(odd, n)
    x_before = x.clone()
    out = {
        "rank": r,
        "size": n,
        "psum": mesh.psum(x, "dp"),
        "pmean": mesh.pmean(x, "dp"),
        "psum_bf16": mesh.psum(b, "dp"),
        "psum_bf16_fp32": mesh.psum(b, "dp", fp32=True),
        "gather0": mesh.all_gather(x, "dp"),
        "gather1": mesh.all_gather(x, "dp", dim=1),
        "scatter_native": mesh.psum_scatter(x.reshape(-1)[: 4 * n], "dp", impl="native"),
        "scatter_fallback": mesh.psum_scatter(x.reshape(-1)[: 4 * n], "dp", impl="allreduce"),
        "odd_native": mesh.psum_scatter(padded, "dp", impl="native"),
        "odd_fallback": mesh.psum_scatter(padded, "dp", impl="allreduce"),
        "scatter_2d": mesh.psum_scatter(rank_input(r, (2 * n, 3)), "dp"),
        "broadcast": mesh.broadcast(x, "dp", src=n - 1),
    }
    try:
        mesh.psum_scatter(odd, "dp")
    except ValueError as e:
        out["indivisible_error"] = str(e)
    mesh.barrier()
    out["input_untouched"] = torch.equal(x, x_before)
    return out


def two_axes(mesh: Mesh) -> dict:
    me = torch.tensor([float(mesh.rank())])
    backend = mesh.group("dp")._get_backend(torch.device("cpu"))  # private: reads the timeout
    return {
        "dp_group_timeout_s": backend.options._timeout.total_seconds(),
        "dp_rank": mesh.rank("dp"),
        "tp_rank": mesh.rank("tp"),
        "psum_dp": mesh.psum(me, "dp"),
        "psum_tp": mesh.psum(me, "tp"),
        "gather_tp": mesh.all_gather(me, "tp"),
        "scatter_dp": mesh.psum_scatter(me.repeat(2), "dp"),
    }


def failing_loop(mesh: Mesh, how: str) -> None:
    """Rank 1 dies (SIGKILL) or hangs at step 3; rank 0 keeps calling psum until it fails.

    Both print the wall-clock time of the event so the test can measure the delay.
    """
    x = torch.ones(1024)
    for step in range(10_000):
        if mesh.rank() == 1 and step == 3:
            print(f"EVENT_AT {time.time()}", flush=True)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        try:
            x = mesh.psum(x, "dp") / mesh.size("dp")
        except Exception:
            print(f"FAILED_AT {time.time()}", flush=True)
            raise
    print("loop ended without an error", flush=True)


def main(scenario: str, out_dir: str) -> int:
    timeout_s = float(os.environ.get("MESH_TEST_TIMEOUT_S", "30"))
    with Mesh.create(device_type="cpu", timeout_s=timeout_s) as mesh:
        if scenario in ("kill", "stall"):
            failing_loop(mesh, scenario)
            return 0
        result = collectives(mesh)
        if scenario == "collectives+2d":  # a second mesh over the same process group
            with Mesh.create({"dp": 2, "tp": -1}, device_type="cpu", timeout_s=timeout_s) as mesh_2d:
                result["2d"] = two_axes(mesh_2d)
    torch.save(result, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    return 0


def run_rank(scenario: str, out_dir: str, rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """A multiprocessing target: become rank `rank` (logging to OUT_DIR/rank{R}.log) and run."""
    become_rank(rank, world_size, port, out_dir, MESH_TEST_TIMEOUT_S=str(timeout_s))
    sys.exit(main(scenario, out_dir))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
