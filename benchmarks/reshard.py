"""Restore cost of a ZeRO checkpoint: same layout vs resharded to another dp (fnllama.checkpoint).

    python benchmarks/reshard.py [--elements 25000000]

Saves a dp=2 ZeRO-style state (params [N] fp32 replicated, AdamW mu/nu sharded [N/2] per rank)
as two in-process ranks, then times rank 0's restore into dp=2 (its own part, read directly),
dp=1 (both old parts), dp=4 (half of one old part) and reports the wall time of each.
"""

import argparse
import tempfile
import time

import torch

from fnllama.checkpoint import Checkpointer


def _state(n: int, dp: int, rank: int, device: str = "cpu") -> tuple[dict, dict]:
    s = -(-n // dp)
    make = (lambda *shape: torch.empty(*shape, device="meta")) if device == "meta" else torch.randn
    state = {"params": {"w": make(n)}, "opt": {"count": torch.tensor(1), "mu": {"flat": make(s)},
                                               "nu": {"flat": make(s)}}}
    shards = {f"opt.{g}.flat": (f"opt.{g}", rank * s, n) for g in ("mu", "nu")}
    return state, shards


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--elements", type=int, default=25_000_000)
    n = p.parse_args().elements
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        ckpts = []
        for rank in (1, 0):
            ckpt = Checkpointer(d, rank=rank, world_size=2, barrier=lambda: None, async_save=False)
            ckpt.save(1, *_state(n, 2, rank)[:1], shards=_state(n, 2, rank)[1])
            ckpts.append(ckpt)
        for ckpt in reversed(ckpts):
            ckpt.close()
        print(f"{n:,} params: save of 2 ranks {time.perf_counter() - t0:.2f} s")
        for dp in (2, 1, 4):
            template, shards = _state(n, dp, 0, device="meta")
            t0 = time.perf_counter()
            Checkpointer(d, rank=0, world_size=dp, read_only=True).restore(template, shards=shards)
            print(f"restore rank 0 of dp={dp}: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
