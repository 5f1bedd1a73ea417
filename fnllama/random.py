"""Explicit PRNG keys, as in JAX: `key(seed)`, `split`, `fold_in`, and samplers that take a key.

A key is a `Tensor[2]` of int64 holding two 32-bit words. It is an ordinary pytree leaf: it
lives in the TrainState, is saved with checkpoints, and never touches torch's global RNG.

Algorithm
---------
* Key derivation (`split`, `fold_in`) is Threefry-2x32 with 20 rounds (Salmon et al. 2011,
  "Parallel random numbers: as easy as 1, 2, 3"; the counter-based generator JAX uses), run
  on Python integers: a key is the Threefry *key*, and each child is the block cipher applied
  to a distinct counter. `split(k, n)[i] = threefry(k, (i, SPLIT_TAG))` and
  `fold_in(k, d) = threefry(k, (d mod 2^32, (d >> 32) ^ FOLD_TAG))`, so the two never collide.
* Sampling from a key turns its two words into a 64-bit seed for a private CPU
  `torch.Generator` (Mersenne Twister) and draws in float32 on the CPU; the result is then
  cast and moved. The CPU samplers fill serially, so the bits depend only on the key and the
  shape: not on the thread count, the default device, the world size or the global RNG.
  Different devices see the same numbers because they are generated on the CPU first.
"""

from __future__ import annotations

from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
_SPLIT_TAG = 0x53504C54   # "SPLT"
_FOLD_TAG = 0x464F4C44    # "FOLD"

Key = torch.Tensor  # [2] int64, each word in [0, 2**32)


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def threefry2x32(key_words: tuple[int, int], counter: tuple[int, int]) -> tuple[int, int]:
    """Threefry-2x32, 20 rounds: encrypt a 2-word counter under a 2-word key."""
    k0, k1 = key_words
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = (counter[0] + ks[0]) & _MASK32, (counter[1] + ks[1]) & _MASK32
    for block in range(5):  # 5 blocks of 4 rounds, a key injection after each
        for r in _ROTATIONS[block % 2]:
            x0 = (x0 + x1) & _MASK32
            x1 = _rotl32(x1, r) ^ x0
        x0 = (x0 + ks[(block + 1) % 3]) & _MASK32
        x1 = (x1 + ks[(block + 2) % 3] + block + 1) & _MASK32
    return x0, x1


def _words(k: Key) -> tuple[int, int]:
    if not isinstance(k, torch.Tensor) or k.shape != (2,):
        shape = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"expected a PRNG key Tensor[2] from fnllama.random.key, got {shape}")
    w0, w1 = (int(v) for v in k.tolist())
    return w0 & _MASK32, w1 & _MASK32


def _make(words: tuple[int, int]) -> Key:
    return torch.tensor(words, dtype=torch.int64)


def key(seed: int) -> Key:
    """A key from an integer seed (up to 64 bits): the words are (seed >> 32, seed & 0xffffffff)."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed} must be in [0, 2**64)")
    return _make((seed >> 32, seed & _MASK32))


def split(k: Key, num: int = 2) -> torch.Tensor:
    """`num` independent child keys, stacked: Tensor[num, 2]. Index it to get each key."""
    words = _words(k)
    return torch.tensor([threefry2x32(words, (i, _SPLIT_TAG)) for i in range(num)], dtype=torch.int64)


def fold_in(k: Key, data: int) -> Key:
    """A new key mixing `data` (e.g. the step number) into `k`."""
    data = int(data)
    if not 0 <= data < 2**64:
        raise ValueError(f"fold_in data={data} must be in [0, 2**64)")
    return _make(threefry2x32(_words(k), (data & _MASK32, (data >> 32) ^ _FOLD_TAG)))


def _generator(k: Key) -> torch.Generator:
    w0, w1 = _words(k)
    gen = torch.Generator(device="cpu")
    gen.manual_seed((w0 << 32) | w1)
    return gen


def _finish(x: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    return x.to(dtype=dtype, device=device if device is not None else "cpu")


def normal(k: Key, shape: Sequence[int], dtype: torch.dtype = torch.float32,
           device: torch.device | str | None = None, *, std: float = 1.0) -> torch.Tensor:
    """Standard normal samples (times `std`), drawn in float32 on the CPU then cast and moved."""
    x = torch.randn(tuple(shape), generator=_generator(k), dtype=torch.float32)
    return _finish(x * std if std != 1.0 else x, dtype, device)


def uniform(k: Key, shape: Sequence[int], dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None, *, minval: float = 0.0, maxval: float = 1.0) -> torch.Tensor:
    """Uniform samples in [minval, maxval)."""
    x = torch.rand(tuple(shape), generator=_generator(k), dtype=torch.float32)
    return _finish(x * (maxval - minval) + minval, dtype, device)


def randint(k: Key, shape: Sequence[int], low: int, high: int, dtype: torch.dtype = torch.int64,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Integers uniform in [low, high)."""
    x = torch.randint(low, high, tuple(shape), generator=_generator(k), dtype=torch.int64)
    return _finish(x, dtype, device)


def bernoulli(k: Key, p: float, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Booleans that are True with probability `p`."""
    return uniform(k, shape, device=device) < p


def permutation(k: Key, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation of range(n) (int64)."""
    return _finish(torch.randperm(n, generator=_generator(k)), torch.int64, device)
