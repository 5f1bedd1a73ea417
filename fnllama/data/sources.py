"""Input files for preprocessing: parquet, JSON lines and JSON, read in bounded record batches.

`iter_batches(paths, keys, batch_size)` yields `{key: list[str | None]}` dicts of at most
`batch_size` rows, file after file in order, so memory stays bounded however big the input:
  * `.parquet`: pyarrow reads one record batch at a time, pages streamed (memory ~ one batch).
  * `.jsonl` / `.json` lines: read line by line.
  * `.json` holding one array (the Alpaca release's shape): loaded whole; prefer jsonl/parquet
    for inputs that do not fit in memory.
Errors name the file and the row (parquet) or line (JSON) where known.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

from fnllama.errors import DataError

EXTENSIONS = (".parquet", ".jsonl", ".json")
Batch = dict[str, list]


def resolve_inputs(spec: str | list[str]) -> list[str]:
    """Expands files, directories (their supported files, sorted) and globs into file paths."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for s in specs:
        if os.path.isdir(s):
            found = sorted(os.path.join(s, n) for n in os.listdir(s) if n.endswith(EXTENSIONS))
            if not found:
                raise DataError(f"{s}: directory has no {'/'.join(EXTENSIONS)} files")
        elif any(c in s for c in "*?["):
            found = sorted(p for p in glob.glob(s) if p.endswith(EXTENSIONS))
            if not found:
                raise DataError(f"{s}: glob matches no {'/'.join(EXTENSIONS)} files")
        elif os.path.isfile(s):
            found = [s]
        else:
            raise DataError(f"{s}: input file not found")
        paths += found
    for p in paths:
        if not p.endswith(EXTENSIONS):
            raise DataError(f"{p}: unsupported input type; expected {', '.join(EXTENSIONS)}")
    return paths


def iter_batches(paths: list[str], keys: list[str], batch_size: int) -> Iterator[Batch]:
    for path in paths:
        if path.endswith(".parquet"):
            yield from _parquet_batches(path, keys, batch_size)
        else:
            yield from _json_batches(path, keys, batch_size)


def _parquet_batches(path: str, keys: list[str], batch_size: int) -> Iterator[Batch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # No pre-buffering (it would read every row group up front) and a buffered page
        # stream (a row group is read page by page): memory stays ~ one record batch even for
        # a file written as one huge row group.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: corrupt or truncated parquet file ({e})") from e
    columns = pf.schema_arrow.names
    _check_keys(path, keys, columns)
    for key in keys:
        typ = pf.schema_arrow.field(key).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)):
            raise DataError(f"{path}: column {key!r} has type {typ}, expected string")
    row = 0
    batches = pf.iter_batches(batch_size=batch_size, columns=keys)
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: corrupt parquet data after row {row} ({e})") from e
        yield {k: rb.column(k).to_pylist() for k in keys}
        row += rb.num_rows


def _check_keys(path: str, keys: list[str], available, where: str = "") -> None:
    missing = [k for k in keys if k not in available]
    if missing:
        raise DataError(f"{path}{where}: json key(s) {missing} not found; available columns: "
                        f"{sorted(available)}")


def _json_batches(path: str, keys: list[str], batch_size: int) -> Iterator[Batch]:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            records = _load_json_array(path, f)
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                yield _columns(path, keys, chunk, range(start, start + len(chunk)), "record")
            return
        batch: list[dict] = []
        lines: list[int] = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: invalid JSON ({e.msg}, column {e.colno})")
            batch.append(record)
            lines.append(lineno)
            if len(batch) == batch_size:
                yield _columns(path, keys, batch, lines, "line")
                batch, lines = [], []
        if batch:
            yield _columns(path, keys, batch, lines, "line")


def _load_json_array(path: str, f) -> list:
    try:
        records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} "
                        f"({e.msg}); truncated file?") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records or JSON lines")
    return records


def _columns(path: str, keys: list[str], records: list, numbers, unit: str) -> Batch:
    """Turns records into columns, checking each record's shape and value types."""
    out: Batch = {k: [] for k in keys}
    for number, record in zip(numbers, records):
        where = f": {unit} {number}"
        if not isinstance(record, dict):
            raise DataError(f"{path}{where}: expected a JSON object, found "
                            f"{type(record).__name__}")
        _check_keys(path, keys, record.keys(), where)
        for k in keys:
            value = record[k]
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}{where}: field {k!r} is {type(value).__name__}, "
                                f"expected a string")
            out[k].append(value)
    return out
