"""Shared helpers for tests/test_data_*.py: small real tokenizers and datasets (no network)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fnllama.data import demo

SMALL_RECORDS = 1200


def small_demo(root) -> demo.DemoPaths:
    """A small demo parquet and a real sentencepiece model trained on it (~0.3 s)."""
    return demo.prepare_demo(str(root), seed=3, num_records=SMALL_RECORDS, vocab_size=800)


def write_texts_parquet(path, texts, row_group_size=64, extra=None) -> str:
    columns = {"text": pa.array(texts, pa.string())}
    for name, values in (extra or {}).items():
        columns[name] = pa.array(values, pa.string())
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return str(path)


def listdir_names(directory) -> list[str]:
    return sorted(os.listdir(directory))


def unique_token_docs(lengths, first=1000) -> list[np.ndarray]:
    """Documents of distinct, consecutive-within-a-document integers, with a gap of one
    between documents: `b == a + 1` exactly when token b follows token a inside a document."""
    out, start = [], first
    for n in lengths:
        out.append(np.arange(start, start + n, dtype=np.int64))
        start += n + 1
    return out
