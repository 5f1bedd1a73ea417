"""Megatron-LM's memory-mapped indexed dataset (`.bin` + `.idx`), read and written byte-for-byte.

`.bin` holds the token ids of every sequence back to back (little-endian, one dtype).
`.idx` layout (all little-endian), as megatron/core/datasets/indexed_dataset.py writes it:

    b"MMIDIDX\\x00\\x00"          9-byte magic
    <Q version                   always 1
    <B dtype code                1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                 7 float32, 8 uint16
    <Q sequence_count            S
    <Q document_count            D + 1 (the length of document_indices, not the documents)
    int32[S]  sequence_lengths   tokens per sequence
    int64[S]  sequence_pointers  byte offset of each sequence in .bin
    int64[D+1] document_indices  0, then the sequence index one past each document's end

Preprocessing writes one sequence per document, so document_indices is 0..S.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from fnllama.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Megatron's rule: uint16 when every id fits with room to spare, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_paths(prefix: str) -> tuple[str, str]:
    """(`{prefix}.bin`, `{prefix}.idx`)."""
    return prefix + ".bin", prefix + ".idx"


def write_index(idx_path: str, sequence_lengths: np.ndarray, document_indices: np.ndarray,
                dtype) -> None:
    """Writes an `.idx` file for sequences stored back to back in the `.bin`."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", _CODE_OF[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_idx.astype("<i8").tobytes())


class IndexedDatasetWriter:
    """Streams documents into `{prefix}.bin` and writes `{prefix}.idx` on `finalize()`.

    Only sizes are kept in memory (4 bytes per document); tokens go straight to disk.
    Callers wanting atomic output write to a temporary prefix and rename (see preprocess).
    """

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"{prefix}: dtype {self.dtype} has no Megatron dtype code")
        self._bin = open(prefix + ".bin", "wb")
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0

    def add_documents(self, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Appends documents given their lengths and their tokens concatenated."""
        lengths = np.asarray(lengths, dtype=np.int32)
        tokens = np.asarray(tokens)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens given")
        self._bin.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._lengths.append(lengths)
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens)
        self.add_documents(np.array([len(tokens)], dtype=np.int32), tokens)

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        write_index(self.prefix + ".idx", lengths, np.arange(len(lengths) + 1), self.dtype)

    def abort(self) -> None:
        """Closes and deletes whatever was written."""
        self._bin.close()
        for path in data_paths(self.prefix):
            if os.path.exists(path):
                os.remove(path)


def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    try:
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{idx_path}: cannot read index file ({e.strerror})") from e
    if len(head) < _HEADER_BYTES or head[:9] != MAGIC:
        raise DataError(f"{idx_path}: not a Megatron indexed dataset (magic {head[:9]!r}, "
                        f"expected {MAGIC!r})")
    version, code, seq_count, doc_count = struct.unpack("<QBQQ", head[9:])
    if version != VERSION:
        raise DataError(f"{idx_path}: index version {version}, expected {VERSION}")
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown dtype code {code}, expected one of "
                        f"{sorted(DTYPE_CODES)}")
    return np.dtype(DTYPE_CODES[code]).newbyteorder("<"), seq_count, doc_count


class IndexedDataset:
    """Memory-mapped reader: `ds[i]` is sequence i's tokens (a read-only numpy view), O(1)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        bin_path, idx_path = data_paths(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DataError(f"{path}: file not found (dataset prefix {prefix!r})")
        self.dtype, seq_count, doc_count = _read_header(idx_path)
        expected = _HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
        idx_size = os.path.getsize(idx_path)
        if idx_size not in (expected, expected + seq_count):  # + int8 modes when multimodal
            raise DataError(f"{idx_path}: {idx_size} bytes, but its header ({seq_count} "
                            f"sequences, {doc_count} document indices) needs {expected}")
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.sizes = np.frombuffer(idx, "<i4", seq_count, _HEADER_BYTES)
        self.pointers = np.frombuffer(idx, "<i8", seq_count, _HEADER_BYTES + 4 * seq_count)
        self.document_indices = np.frombuffer(idx, "<i8", doc_count, _HEADER_BYTES + 12 * seq_count)
        self._check_bin(bin_path, idx_path)
        self._bin = (np.memmap(bin_path, dtype=self.dtype, mode="r")
                     if os.path.getsize(bin_path) else np.zeros(0, self.dtype))

    def _check_bin(self, bin_path: str, idx_path: str) -> None:
        bin_size = os.path.getsize(bin_path)
        itemsize = self.dtype.itemsize
        needed = int(self.pointers[-1] + self.sizes[-1] * itemsize) if len(self.sizes) else 0
        if needed != bin_size:
            raise DataError(f"{bin_path}: {bin_size} bytes, but {idx_path} describes {needed} "
                            f"bytes ({self.dtype} tokens); .bin and .idx do not belong together")
        if len(self.document_indices) == 0 or self.document_indices[0] != 0 or \
                self.document_indices[-1] != len(self.sizes):
            raise DataError(f"{idx_path}: document_indices must run from 0 to the sequence "
                            f"count {len(self.sizes)}")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i."""
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start:start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(int(i))
