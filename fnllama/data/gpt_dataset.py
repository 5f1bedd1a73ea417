"""Packed GPT samples over indexed datasets: splits, epochs, seeded shuffles, blending.

A `PackedDataset` is an endless stream of samples, addressed by a global sample number `g`:
epoch `g // samples_per_epoch` concatenates the split's documents in an order shuffled for
that epoch, cuts the token stream into samples of `seq_length + 1` tokens (consecutive
samples share one boundary token: inputs and labels are the same slice shifted by one) and
visits them in a shuffled order. Every epoch holds the same number of samples (the token
count does not depend on the order), so `g` alone is the position of a run: the loader's
state is one integer. The last `< seq_length` tokens of each epoch's stream are dropped.

Randomness is a numpy Generator seeded with (seed, epoch): nothing global. The per-epoch
index (document order, sample starts, sample shuffle) is cached as .npy files in
`{data dir}/{name}_index_cache/`, keyed by a hash of everything it depends on (the
document sizes, the split's documents, seq_length, seed, epoch), so changed inputs get a
fresh index and unchanged ones are never rebuilt.

Documents are the `.idx` sequences (preprocess writes one sequence per document).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Protocol, Sequence

import numpy as np

from fnllama.data.indexed import IndexedDataset
from fnllama.errors import ConfigError, DataError

_INDEX_VERSION = "fnllama-packed-v1"
_SPLIT_NAMES = ("train", "valid", "test")


class SampleSource(Protocol):
    """What the loader reads: `sample(g)` -> (tokens [T+1] int64, segment_ids [T+1] int64)."""

    seq_length: int

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]: ...


class _EpochIndex:
    """One epoch's arrays: doc_order[D], sample_doc[L], sample_offset[L], shuffle[L]."""

    def __init__(self, doc_order, sample_doc, sample_offset, shuffle):
        self.doc_order, self.sample_doc = doc_order, sample_doc
        self.sample_offset, self.shuffle = sample_offset, shuffle


class PackedDataset:
    """Samples of `seq_length + 1` tokens packed from the documents `doc_ids` of `indexed`."""

    def __init__(self, indexed: IndexedDataset, doc_ids: np.ndarray, *, seq_length: int,
                 seed: int, cache: bool = True):
        if seq_length < 1:
            raise ConfigError(f"seq_length: expected >= 1, found {seq_length}")
        self.indexed, self.seq_length, self.seed = indexed, seq_length, seed
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.tokens_per_epoch = int(indexed.sizes[self.doc_ids].sum(dtype=np.int64))
        self.samples_per_epoch = max(self.tokens_per_epoch - 1, 0) // seq_length
        if self.samples_per_epoch == 0:
            raise DataError(
                f"{indexed.prefix}: {len(self.doc_ids)} documents with {self.tokens_per_epoch} "
                f"tokens in this split, fewer than one sample needs: at least {seq_length + 1} "
                f"tokens for --seq-length {seq_length}")
        self._key = self._hash_inputs()
        self._cache_dir = _cache_dir(indexed.prefix) if cache else None
        self._epochs: OrderedDict[int, _EpochIndex] = OrderedDict()

    def _hash_inputs(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for part in (_INDEX_VERSION, self.seq_length, self.seed, len(self.indexed)):
            h.update(repr(part).encode())
        h.update(np.ascontiguousarray(self.indexed.sizes).tobytes())
        h.update(self.doc_ids.tobytes())
        return h.hexdigest()

    def epoch_index(self, epoch: int) -> _EpochIndex:
        if epoch not in self._epochs:
            self._epochs[epoch] = self._load_or_build(epoch)
            if len(self._epochs) > 2:  # the current epoch and the one before it
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _build(self, epoch: int) -> _EpochIndex:
        rng = np.random.default_rng([self.seed, epoch])
        doc_order = rng.permutation(self.doc_ids)
        lengths = self.indexed.sizes[doc_order].astype(np.int64)
        ends = np.cumsum(lengths)
        starts = np.arange(self.samples_per_epoch, dtype=np.int64) * self.seq_length
        sample_doc = np.searchsorted(ends, starts, side="right")  # doc holding each start
        sample_offset = starts - (ends[sample_doc] - lengths[sample_doc])
        shuffle = rng.permutation(self.samples_per_epoch)
        return _EpochIndex(doc_order, sample_doc, sample_offset, shuffle)

    def _load_or_build(self, epoch: int) -> _EpochIndex:
        if self._cache_dir is None:
            return self._build(epoch)
        path = os.path.join(self._cache_dir, f"{self._key}-epoch{epoch}")
        names = ("doc_order", "sample_doc", "sample_offset", "shuffle")
        if os.path.isdir(path):
            try:
                return _EpochIndex(*(np.load(os.path.join(path, n + ".npy"), mmap_mode="r")
                                     for n in names))
            except (OSError, ValueError):
                pass  # unreadable cache entry: rebuild it below
        index = self._build(epoch)
        _save_atomically(path, {n: getattr(index, n) for n in names})
        return index

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample number `g` (any epoch): tokens and per-token document number, [T+1] each."""
        epoch, i = divmod(int(g), self.samples_per_epoch)
        index = self.epoch_index(epoch)
        s = int(index.shuffle[i])
        pos, offset = int(index.sample_doc[s]), int(index.sample_offset[s])
        need = self.seq_length + 1
        tokens, segments, segment = [], [], 0
        while need > 0:
            piece = self.indexed.get(int(index.doc_order[pos]), offset)[:need]
            tokens.append(piece)
            segments.append(np.full(len(piece), segment, dtype=np.int64))
            need -= len(piece)
            pos, offset, segment = pos + 1, 0, segment + 1
        return np.concatenate(tokens).astype(np.int64), np.concatenate(segments)


def _cache_dir(prefix: str) -> str | None:
    path = f"{prefix}_index_cache"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # read-only data directory: build in memory every time
    return path if os.access(path, os.W_OK) else None


def _save_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes the arrays into a temporary directory renamed to `path` (ranks may race)."""
    parent = os.path.dirname(path)
    work = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        for name, array in arrays.items():
            np.save(os.path.join(work, name + ".npy"), array)
        os.rename(work, path)
    except OSError:
        pass  # another rank renamed first, or no space: the in-memory index is still valid
    finally:
        shutil.rmtree(work, ignore_errors=True)


class BlendedDataset:
    """Several sample sources mixed by weight, deterministically (no randomness needed).

    Within each period of `period` samples, source d gets round(period * w_d) samples
    (largest remainder), spread evenly; source d's k-th sample is its own sample k, so each
    source walks through its own epochs at its own pace.
    """

    def __init__(self, sources: Sequence[SampleSource], weights: Sequence[float], *,
                 period: int = 4096):
        if len(sources) != len(weights) or not sources:
            raise ConfigError(f"blend: {len(sources)} datasets but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"blend weights: expected non-negative with a positive sum, "
                              f"found {list(weights)}")
        lengths = {s.seq_length for s in sources}
        if len(lengths) != 1:
            raise ConfigError(f"blend: datasets have different seq_length {sorted(lengths)}")
        self.sources, self.seq_length, self.period = list(sources), lengths.pop(), period
        self.counts = _largest_remainder(np.asarray(weights, float) / sum(weights), period)
        self.table, self.rank = _interleave(self.counts)

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        block, pos = divmod(int(g), self.period)
        d = int(self.table[pos])
        return self.sources[d].sample(block * int(self.counts[d]) + int(self.rank[pos]))


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _interleave(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spread: source d's k-th slot sits at 'time' (k + 0.5) / counts[d]."""
    source = np.concatenate([np.full(c, d) for d, c in enumerate(counts)])
    rank = np.concatenate([np.arange(c) for c in counts])
    times = (rank + 0.5) / np.maximum(counts[source], 1)
    order = np.argsort(times, kind="stable")
    return source[order], rank[order]


# ---------------------------------------------------------------------------- builders
def parse_split(split: str) -> list[float]:
    """Megatron's "969,30,1" (or "98/2/0"): train/valid/test weights, normalized."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--split: expected numbers like 969,30,1, found {split!r}") from e
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"--split: expected 1-3 non-negative weights, found {split!r}")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_ranges(num_docs: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges [start, end) for train/valid/test, as Megatron cuts them."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * num_docs)))
    excess = bounds[-1] - num_docs
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return list(zip(bounds[:-1], bounds[1:]))


def parse_data_path(items: Sequence[str] | str) -> list[tuple[float, str]]:
    """Megatron's `--data-path`: "prefix" or "w1 prefix1 w2 prefix2 ..." -> [(w, prefix)]."""
    items = items.split() if isinstance(items, str) else list(items)
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ConfigError(f"--data-path: expected a prefix or weight/prefix pairs, found {items}")
    try:
        return [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
    except ValueError as e:
        raise ConfigError(f"--data-path: weights must be numbers, found {items}") from e


def build_split(data: str | Sequence[str] | Sequence[tuple[float, str]], *, seq_length: int,
                split: str = "969,30,1", which: str = "train", seed: int = 1234,
                cache: bool = True) -> SampleSource:
    """The `which` split of one dataset prefix, or a weighted blend of several.

    Args:
      data: a prefix (`.../alpaca_text_document`), a Megatron `--data-path` list
        (["0.3", "a", "0.7", "b"]) or [(weight, prefix), ...].
      seq_length: tokens per sample fed to the model (each sample reads seq_length + 1).
      split: train/valid/test weights over each dataset's documents.
      which: "train", "valid" or "test".
      seed: shuffling seed.
      cache: keep the index next to the data (see module docstring).
    """
    if which not in _SPLIT_NAMES:
        raise ConfigError(f"split: expected one of {_SPLIT_NAMES}, found {which!r}")
    if isinstance(data, str) or (data and isinstance(data[0], str)):
        blend = parse_data_path(data)
    else:
        blend = [(float(w), p) for w, p in data]
    weights = parse_split(split)
    sources = []
    for n, (_, prefix) in enumerate(blend):
        indexed = IndexedDataset(prefix)
        start, end = split_ranges(len(indexed), weights)[_SPLIT_NAMES.index(which)]
        if end <= start:
            raise DataError(f"{prefix}: the {which} split of --split {split} holds no documents "
                            f"({len(indexed)} in total)")
        sources.append(PackedDataset(indexed, np.arange(start, end), seq_length=seq_length,
                                     seed=seed + n, cache=cache))
    if len(sources) == 1:
        return sources[0]
    return BlendedDataset(sources, [w for w, _ in blend])
