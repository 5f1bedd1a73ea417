"""The training loader: micro-batches of packed samples, sharded over data-parallel ranks.

Global sample numbers are dealt out in global batches of `micro_batch_size * dp_size`:
batch step s gives rank r the samples

    consumed + r * B + [0, B),   consumed = s * B * dp_size

so the ranks never overlap and together cover every sample exactly once. The position of
the run is the single number `consumed_samples` (the same on every rank), which is the
loader's whole state: `loader.restore(loader.state())` continues with the identical next
batch, also after a change of dp_size that keeps the global batch.

Each batch is a dict of [B, T] tensors:
  tokens       int64   sample[:T]
  labels       int64   sample[1:]
  loss_mask    float32 1.0, or 0.0 where the label starts a new document (eod_mask_loss)
  positions    int64   0, 1, ... restarting at each document start inside the sample
  segment_ids  int64   0 for the sample's first document, +1 per later document; attention
                       within equal ids keeps packed documents from seeing each other
"""

from __future__ import annotations

import numpy as np
import torch

from fnllama.data.gpt_dataset import SampleSource
from fnllama.errors import ConfigError


def make_example(tokens: np.ndarray, segments: np.ndarray, *,
                 eod_mask_loss: bool = False) -> dict[str, np.ndarray]:
    """One packed sample of T+1 tokens -> model inputs of length T (see module docstring)."""
    T = len(tokens) - 1
    starts = np.flatnonzero(np.diff(segments, prepend=-1))  # first index of each segment
    positions = np.arange(T + 1) - starts[segments]
    loss_mask = np.ones(T, dtype=np.float32)
    if eod_mask_loss:
        loss_mask[segments[1:] != segments[:-1]] = 0.0  # label belongs to the next document
    return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": loss_mask,
            "positions": positions[:-1], "segment_ids": segments[:-1]}


class Loader:
    """Iterator of micro-batches for one data-parallel rank (see module docstring)."""

    def __init__(self, dataset: SampleSource, *, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, eod_mask_loss: bool = False, consumed_samples: int = 0):
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size: expected >= 1, found {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank: expected 0 <= dp_rank < dp_size={dp_size}, "
                              f"found {dp_rank}")
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.dp_rank, self.dp_size, self.eod_mask_loss = dp_rank, dp_size, eod_mask_loss
        self.consumed_samples = int(consumed_samples)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        examples = [make_example(*self.dataset.sample(first + j), eod_mask_loss=self.eod_mask_loss)
                    for j in range(self.micro_batch_size)]
        self.consumed_samples += self.global_batch_size
        return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}

    def state(self) -> dict[str, torch.Tensor]:
        """The position as a pytree of 0-d int64 tensors (save it with the train state)."""
        return {"consumed_samples": torch.tensor(self.consumed_samples, dtype=torch.int64)}

    def restore(self, state: dict) -> None:
        """Continues from a `state()`: the next batch is the one that followed it."""
        if "consumed_samples" not in state:
            raise ConfigError(f"loader state: expected key 'consumed_samples', found {sorted(state)}")
        self.consumed_samples = int(state["consumed_samples"])
