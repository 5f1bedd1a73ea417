"""Learnable synthetic batches shared by the train and ZeRO tests (and their worker scripts)."""

import torch

from fnllama import random as fr


def counting_batches(seed: int, n: int, rows: int = 8, seq: int = 32) -> list[dict]:
    """`n` batches; each row counts up (mod 64, offset 3) from a random start: easy to learn."""
    out = []
    for i in range(n):
        start = fr.randint(fr.fold_in(fr.key(seed), i), (rows, 1), 0, 64)
        seqs = (start + torch.arange(seq + 1)) % 64 + 3          # [rows, seq + 1]
        out.append({"tokens": seqs[:, :-1], "labels": seqs[:, 1:]})
    return out
