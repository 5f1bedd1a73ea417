"""Helpers for the multi-process tests: free ports and turning a spawned process into a rank."""

import os
import socket

import torch


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (ask again per launch; tests run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world_size: int, port: int, out_dir: str, **env: str) -> None:
    """Set torchrun's variables (plus `env`), send stdout/stderr to OUT_DIR/rank{R}.log, one thread."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    torch.set_num_threads(1)
