"""Megatron MMIDIDX format: an independent writer/reader built from the spec, both ways."""

import struct

import numpy as np
import pytest

from fnllama.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from fnllama.errors import DataError

CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def spec_write(prefix, docs, dtype):
    """Minimal writer straight from Megatron's layout (one sequence per document)."""
    dtype = np.dtype(dtype)
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    sizes = [len(d) for d in docs]
    pointers, p = [], 0
    for n in sizes:
        pointers.append(p)
        p += n * dtype.itemsize
    doc_idx = list(range(len(docs) + 1))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def spec_read(prefix):
    """Minimal reader from the spec: returns (dtype code, docs, document_indices)."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, nseq, ndoc = struct.unpack_from("<QBQQ", raw, 9)
    assert version == 1
    off = 34
    sizes = struct.unpack_from(f"<{nseq}i", raw, off)
    pointers = struct.unpack_from(f"<{nseq}q", raw, off + 4 * nseq)
    doc_idx = struct.unpack_from(f"<{ndoc}q", raw, off + 12 * nseq)
    assert len(raw) == off + 12 * nseq + 8 * ndoc
    dtype = {8: np.uint16, 4: np.int32}[code]
    data = open(prefix + ".bin", "rb").read()
    docs = [np.frombuffer(data, dtype, n, p).tolist() for n, p in zip(sizes, pointers)]
    return code, docs, list(doc_idx)


def random_docs(rng, n, high):
    return [rng.integers(0, high, size=int(rng.integers(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65000), (np.int32, 150_000)])
def test_reads_spec_written_files(tmp_path, dtype, high):
    docs = random_docs(np.random.default_rng(0), 57, high)
    prefix = str(tmp_path / "spec")
    spec_write(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    assert len(ds) == 57 and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert list(ds.document_indices) == list(range(58))
    for i in (0, 13, 56):
        np.testing.assert_array_equal(ds[i], docs[i])
    np.testing.assert_array_equal(ds.get(13, 1, 2), docs[13][1:3])


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65000), (np.int32, 150_000)])
def test_writes_what_the_spec_reads_byte_for_byte(tmp_path, dtype, high):
    docs = random_docs(np.random.default_rng(1), 33, high)
    w = IndexedDatasetWriter(str(tmp_path / "ours"), dtype)
    w.add_document(docs[0])
    lengths = np.array([len(d) for d in docs[1:]])
    w.add_documents(lengths, np.concatenate(docs[1:]))
    w.finalize()
    code, read_docs, doc_idx = spec_read(str(tmp_path / "ours"))
    assert code == CODES[np.dtype(dtype)] and doc_idx == list(range(34))
    assert read_docs == [d.tolist() for d in docs]
    spec_write(str(tmp_path / "spec"), docs, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / ("ours" + ext)).read_bytes() == (tmp_path / ("spec" + ext)).read_bytes()


def test_optimal_dtype_is_megatrons_rule():
    assert optimal_dtype(32000) is np.uint16
    assert optimal_dtype(65499) is np.uint16
    assert optimal_dtype(65500) is np.int32
    assert optimal_dtype(128256) is np.int32


def test_empty_dataset_round_trips(tmp_path):
    w = IndexedDatasetWriter(str(tmp_path / "empty"), np.uint16)
    w.finalize()
    ds = IndexedDataset(str(tmp_path / "empty"))
    assert len(ds) == 0 and ds.num_tokens == 0


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    spec_write(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    return prefix


def _patch(path, offset, data):
    raw = bytearray(open(path, "rb").read())
    raw[offset:offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


def test_wrong_magic_names_file(good):
    _patch(good + ".idx", 0, b"NOTMAGIC!")
    with pytest.raises(DataError, match=r"good\.idx.*magic"):
        IndexedDataset(good)


def test_wrong_version_names_file(good):
    _patch(good + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match=r"good\.idx.*version 2"):
        IndexedDataset(good)


def test_unknown_dtype_code(good):
    _patch(good + ".idx", 17, struct.pack("<B", 9))
    with pytest.raises(DataError, match="dtype code 9"):
        IndexedDataset(good)


def test_truncated_idx(good):
    raw = open(good + ".idx", "rb").read()
    open(good + ".idx", "wb").write(raw[:-5])
    with pytest.raises(DataError, match=r"good\.idx.*bytes"):
        IndexedDataset(good)


def test_bin_idx_mismatch_names_both_files(tmp_path, good):
    other = str(tmp_path / "other")
    spec_write(other, [[1, 2, 3, 4, 5, 6]], np.uint16)
    (tmp_path / "good.bin").write_bytes((tmp_path / "other.bin").read_bytes())
    with pytest.raises(DataError, match=r"good\.bin.*good\.idx.*do not belong together"):
        IndexedDataset(good)


def test_missing_bin(tmp_path, good):
    (tmp_path / "good.bin").unlink()
    with pytest.raises(DataError, match=r"good\.bin.*not found"):
        IndexedDataset(good)
