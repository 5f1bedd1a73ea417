"""`fnllama preprocess`: tokenize parquet / JSON into Megatron indexed datasets.

Same flags as Megatron-LM's tools/preprocess_data.py, e.g. for the Alpaca parquet:

    fnllama preprocess --input train-00000-of-00001.parquet \\
        --tokenizer-type PretrainedFromHF --tokenizer-name-or-path ./llama-2-7b-hf \\
        --output-prefix ./dataset/alpaca --workers 4 --log-interval 1000 --append-eod

writes `./dataset/alpaca_text_document.bin/.idx` (one pair per `--json-keys` key).
From Python: `preprocess(inputs, output_prefix, tokenizer_type=..., tokenizer_path=...)`.

How it runs: the main process streams record batches from the inputs, cuts them into chunks
and hands the chunks to `--workers` tokenizer processes, keeping at most a few chunks in
flight and collecting results in submission order, so the output order is the input order
and memory stays flat however large the input. Null and empty documents are skipped and
counted. Output goes to temporary files that are renamed over the final names only after
everything succeeded: a crash or bad input never leaves a half-written dataset behind.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from fnllama.data import sources
from fnllama.data.indexed import IndexedDatasetWriter, data_paths, optimal_dtype
from fnllama.data.tokenizer import TOKENIZER_TYPES, Tokenizer, load_tokenizer
from fnllama.errors import DataError

CHUNK_ROWS = 256  # documents per worker task: big enough to hide IPC, small enough to balance


@dataclass
class KeyStats:
    """Counts for one json key's output dataset."""

    prefix: str
    documents: int = 0
    skipped: int = 0  # null, empty, or encoding to no tokens
    tokens: int = 0


# ---------------------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_path: str, dtype: str, append_eod: bool) -> None:
    tok = load_tokenizer(tokenizer_type, tokenizer_path)
    _WORKER.update(tok=tok, dtype=np.dtype(dtype), eod=tok.eos_id if append_eod else None)


def _encode_column(texts: list) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Encodes one column of a chunk: (lengths, tokens concatenated, skipped, text bytes)."""
    tok: Tokenizer = _WORKER["tok"]
    eod = _WORKER["eod"]
    kept = [t for t in texts if t]
    nbytes = sum(len(t) for t in kept)  # characters; close to bytes for mostly-ASCII text
    ids = [x for x in tok.encode_batch(kept) if x] if kept else []
    if eod is not None:
        for x in ids:
            x.append(eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_WORKER["dtype"],
                       count=int(lengths.sum()))
    return lengths, flat, len(texts) - len(ids), nbytes


def _encode_chunk(chunk: dict[str, list]) -> dict[str, tuple]:
    return {key: _encode_column(texts) for key, texts in chunk.items()}


# ---------------------------------------------------------------------------- main side
def _chunks(batches: Iterable[dict[str, list]], rows: int) -> Iterator[dict[str, list]]:
    for batch in batches:
        n = len(next(iter(batch.values())))
        for start in range(0, n, rows):
            yield {k: v[start:start + rows] for k, v in batch.items()}


def _ordered_map(fn: Callable, items: Iterator, workers: int, init_args: tuple) -> Iterator:
    """`map(fn, items)` over `workers` processes, in order, with a bounded number in flight.

    `Pool.imap` would read the whole input ahead of the workers (its feeder thread does not
    wait), so memory would grow with the file; a window of `AsyncResult`s does not.
    """
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(fn, items)
        return
    # fork: workers start in milliseconds and scripts need no `if __name__ == "__main__"`.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        window: collections.deque = collections.deque()
        for item in items:
            window.append(pool.apply_async(fn, (item,)))
            if len(window) >= 3 * workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


class _Progress:
    """Every `interval` documents: docs/s, tokens/s, MB/s (a tqdm bar when on a terminal)."""

    def __init__(self, interval: int, log: Callable[[str], None]):
        self.interval, self.log = interval, log
        self.start = time.perf_counter()
        self.docs = self.tokens = self.nbytes = 0
        self._next = interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", file=sys.stderr, mininterval=0.5)

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.nbytes += nbytes
        if self.bar is not None:
            self.bar.update(docs)
        if self.interval > 0 and self.docs >= self._next:
            self._next = (self.docs // self.interval + 1) * self.interval
            line = self.summary()
            self.bar.write(line) if self.bar is not None else self.log(line)

    def summary(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return (f"processed {self.docs} documents ({self.docs / dt:.1f} docs/s, "
                f"{self.tokens / dt:.0f} tokens/s, {self.nbytes / dt / 1e6:.2f} MB/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: `{prefix}_{key}_document`."""
    return f"{output_prefix}_{key}_document"


def preprocess(inputs: str | Sequence[str], output_prefix: str, *, tokenizer_type: str,
               tokenizer_path: str, json_keys: Sequence[str] = ("text",),
               append_eod: bool = False, workers: int = 1, log_interval: int = 1000,
               batch_size: int = 1024, log: Callable[[str], None] = print) -> dict[str, KeyStats]:
    """Tokenizes `inputs` into `{output_prefix}_{key}_document.bin/.idx` for each key.

    Args:
      inputs: file, directory or glob (or a list of them) of .parquet/.jsonl/.json files.
      output_prefix: where the datasets go (parent directories are created).
      tokenizer_type, tokenizer_path: as for `load_tokenizer`.
      json_keys: columns / fields to tokenize, one dataset each.
      append_eod: append the tokenizer's EOS id to every document (what the packed loader
        uses to separate documents; Megatron's `--append-eod`).
      workers: tokenizer processes; 1 tokenizes in this process.
      log_interval: log progress every this many documents (0: never).
      batch_size: rows per record batch read from the input; bounds memory.
      log: where progress lines go.

    Returns:
      {key: KeyStats} with the final prefix and the document, skipped and token counts.
    """
    paths = sources.resolve_inputs(inputs if isinstance(inputs, str) else list(inputs))
    keys = list(json_keys)
    tok = load_tokenizer(tokenizer_type, tokenizer_path)
    if append_eod and tok.eos_id is None:
        raise DataError(f"{tokenizer_path}: --append-eod needs an EOS token, the tokenizer has none")
    dtype = np.dtype(optimal_dtype(tok.vocab_size))
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    stats = {k: KeyStats(output_prefix_for(output_prefix, k)) for k in keys}
    tmp = {k: f"{stats[k].prefix}.tmp-{os.getpid()}" for k in keys}
    writers = {k: IndexedDatasetWriter(tmp[k], dtype) for k in keys}
    progress = _Progress(log_interval, log)
    batches = _with_unicode_errors(sources.iter_batches(paths, keys, batch_size))
    init_args = (tokenizer_type, tokenizer_path, dtype.str, append_eod)
    results = _ordered_map(_encode_chunk, _chunks(batches, CHUNK_ROWS), workers, init_args)
    try:
        for result in results:
            _write_chunk(result, writers, stats, progress)
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        results.close()  # stops the worker pool now, also on errors
        progress.close()
    for k in keys:
        for src, dst in zip(data_paths(tmp[k]), data_paths(stats[k].prefix)):
            os.replace(src, dst)
    log(progress.summary())
    return stats


def _write_chunk(result: dict[str, tuple], writers, stats, progress: _Progress) -> None:
    docs = tokens = nbytes = 0
    for key, (lengths, flat, skipped, size) in result.items():
        writers[key].add_documents(lengths, flat)
        s = stats[key]
        s.documents += len(lengths)
        s.skipped += skipped
        s.tokens += len(flat)
        docs = max(docs, len(lengths) + skipped)
        tokens += len(flat)
        nbytes += size
    progress.update(docs, tokens, nbytes)


def _with_unicode_errors(batches: Iterator) -> Iterator:
    try:
        yield from batches
    except UnicodeDecodeError as e:
        raise DataError(f"input is not valid UTF-8 at byte {e.start} ({e.reason})") from e


# ---------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fnllama preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, nargs="+",
                   help="parquet/jsonl/json file(s), directory or glob")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", required=True,
                   choices=list(TOKENIZER_TYPES) + ["Llama2Tokenizer", "HuggingFaceTokenizer"])
    p.add_argument("--tokenizer-name-or-path", default=None, help="HF tokenizer directory")
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece .model file")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=1000)
    p.add_argument("--seq-length", type=int, default=None,
                   help="report how many packed samples of this length the output holds")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per input record batch")
    p.add_argument("--dataset-impl", choices=["mmap"], default="mmap", help="(Megatron compat)")
    return p


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        raise DataError(f"--workers: expected >= 1, found {args.workers}")
    path = args.tokenizer_model or args.tokenizer_name_or_path
    if args.tokenizer_type == "PretrainedFromHF" and args.tokenizer_name_or_path:
        path = args.tokenizer_name_or_path
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    stats = preprocess(args.input, args.output_prefix, tokenizer_type=args.tokenizer_type,
                       tokenizer_path=path, json_keys=args.json_keys, append_eod=args.append_eod,
                       workers=args.workers, log_interval=args.log_interval,
                       batch_size=args.batch_size, log=log)
    for key, s in stats.items():
        print(f"{key}: {s.documents} documents, {s.tokens} tokens, {s.skipped} skipped "
              f"(null/empty) -> {s.prefix}.bin/.idx")
        if args.seq_length:
            samples = max(s.tokens - 1, 0) // args.seq_length
            note = "" if samples else f" (too few tokens: need at least {args.seq_length + 1})"
            print(f"{key}: {samples} packed samples of --seq-length {args.seq_length}{note}")
    return 0
