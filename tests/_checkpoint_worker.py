"""A process for tests/test_checkpoint.py: `python _checkpoint_worker.py SCENARIO DIR [RANK WORLD]`.

kill:  saves a ~48 MB state as step 1, waits until it is committed, prints "committed 1",
       then saves steps 2, 3, ... forever, so the test can SIGKILL it in the middle of a save.
world: one of two ranks (gloo over a file store for the start-up barrier): saves steps 1-3
       with per-rank values, waits for the world commit and restores its own part; then rank
       1 exits while rank 0 saves step 4, which must not commit. Writes DIR/result_<rank>.json.
"""

import json
import os
import sys

import torch

from fnllama.checkpoint import Checkpointer
from fnllama.errors import CheckpointError


def big_state(step: int) -> dict:
    """Leaves filled with `step` so a restore tells which step it came from."""
    return {"params": {f"w{i}": torch.full((1024, 1024), float(step)) for i in range(12)},
            "step": torch.tensor(step)}


def kill_scenario(directory: str) -> None:
    ckpt = Checkpointer(directory, async_save=True)
    ckpt.save(1, big_state(1))
    ckpt.wait()
    print("committed 1", flush=True)
    step = 2
    while True:
        ckpt.save(step, big_state(step))
        step += 1


def rank_state(rank: int, step: int) -> dict:
    return {"w": torch.full((64, 8), 100.0 * rank + step, dtype=torch.bfloat16),
            "count": torch.tensor(step), "data": {"pos": 10 * step + rank}}


def world_scenario(directory: str, rank: int, world: int) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{directory}.store", rank=rank, world_size=world)
    ckpt = Checkpointer(directory, rank=rank, world_size=world, commit_timeout_s=3.0)
    for step in (1, 2, 3):
        ckpt.save(step, rank_state(rank, step), {"run": "world"})
    ckpt.wait()
    result = {"latest": ckpt.latest_step(), "steps": ckpt.all_steps()}
    state, config = ckpt.restore(rank_state(rank, 0))
    result["restored_ok"] = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                                for a, b in zip(_leaves(state), _leaves(rank_state(rank, 3))))
    result["config"] = config
    torch.distributed.barrier()
    if rank == 0:
        ckpt.save(4, rank_state(rank, 4))
        try:
            ckpt.wait()
            result["step4_error"] = None
        except CheckpointError as e:
            result["step4_error"] = str(e)
        result["latest_after_4"] = ckpt.latest_step()
    ckpt.close()
    with open(os.path.join(os.path.dirname(directory), f"result_{rank}.json"), "w") as f:
        json.dump(result, f)


def _leaves(tree):
    import optree
    return optree.tree_leaves(tree)


if __name__ == "__main__":
    scenario, directory = sys.argv[1], sys.argv[2]
    if scenario == "kill":
        kill_scenario(directory)
    else:
        world_scenario(directory, int(sys.argv[3]), int(sys.argv[4]))
