"""Preprocess: inputs -> Megatron indexed datasets, with workers, CLI flags and bad inputs."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_support import listdir_names, small_demo, write_texts_parquet
from fnllama import cli
from fnllama.data.indexed import IndexedDataset
from fnllama.data.preprocess import preprocess
from fnllama.data.tokenizer import load_tokenizer
from fnllama.errors import DataError


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("pre"))


@pytest.fixture(scope="module")
def tok(demo_paths):
    return load_tokenizer("SentencePieceTokenizer", demo_paths.tokenizer_model)


def run(inputs, prefix, model, **kw):
    kw.setdefault("log", lambda _: None)
    return preprocess(inputs, str(prefix), tokenizer_type="SentencePieceTokenizer",
                      tokenizer_path=model, **kw)


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_round_trip_1_and_4_workers_identical(demo_paths, tok, tmp_path):
    texts = pq.read_table(demo_paths.parquet).column("text").to_pylist()
    out = {}
    for workers in (1, 4):
        stats = run(demo_paths.parquet, tmp_path / f"w{workers}", demo_paths.tokenizer_model,
                    append_eod=True, workers=workers, batch_size=100)
        out[workers] = stats["text"].prefix
        assert stats["text"].documents == len(texts) and stats["text"].skipped == 0
    assert read_docs(out[1]) == [tok.encode(t) + [tok.eos_id] for t in texts]
    for ext in (".bin", ".idx"):
        assert open(out[1] + ext, "rb").read() == open(out[4] + ext, "rb").read()
    assert IndexedDataset(out[1]).dtype == np.uint16
    assert not [n for n in listdir_names(tmp_path) if "tmp" in n]


def test_jsonl_json_dir_glob_and_several_keys(demo_paths, tok, tmp_path):
    records = [{"instruction": f"do {i}", "output": f"done {i}", "text": f"t{i}"} for i in range(7)]
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "a.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records[:4])
    (src / "b.json").write_text(json.dumps(records[4:]))
    (src / "ignored.txt").write_text("not an input")
    for inputs in (str(src), str(src / "*.json*"), [str(src / "a.jsonl"), str(src / "b.json")]):
        stats = run(inputs, tmp_path / "out", demo_paths.tokenizer_model,
                    json_keys=["instruction", "output"])
        assert read_docs(stats["instruction"].prefix) == [tok.encode(r["instruction"]) for r in records]
        assert read_docs(stats["output"].prefix) == [tok.encode(r["output"]) for r in records]
    assert stats["output"].prefix == str(tmp_path / "out_output_document")


def test_json_lines_in_a_dot_json_file(demo_paths, tok, tmp_path):
    path = tmp_path / "hf_style.json"  # what `datasets` writes: JSON lines named .json
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    stats = run(str(path), tmp_path / "o", demo_paths.tokenizer_model)
    assert read_docs(stats["text"].prefix) == [tok.encode("one"), tok.encode("two")]


def test_null_and_empty_documents_are_skipped_and_counted(demo_paths, tok, tmp_path):
    path = write_texts_parquet(tmp_path / "gaps.parquet", ["a", None, "", "b", None], 2)
    stats = run(path, tmp_path / "o", demo_paths.tokenizer_model, append_eod=True)
    assert (stats["text"].documents, stats["text"].skipped) == (2, 3)
    assert read_docs(stats["text"].prefix) == [tok.encode("a") + [2], tok.encode("b") + [2]]


def test_cli_with_megatron_flags(demo_paths, tmp_path, capsys):
    prefix = str(tmp_path / "dataset" / "alpaca")
    argv = ["preprocess", "--input", demo_paths.parquet, "--output-prefix", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            demo_paths.tokenizer_model, "--workers", "2", "--log-interval", "500",
            "--append-eod", "--seq-length", "64", "--json-keys", "text"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    # Progress at chunk granularity once per 500 documents, then the final summary.
    assert len(lines) == 3 and all(line.startswith("processed ") for line in lines)
    assert lines[-1].startswith("processed 1200 documents")
    for unit in ("docs/s", "tokens/s", "MB/s"):
        assert unit in lines[0]
    assert "1200 documents" in captured.out and "packed samples of --seq-length 64" in captured.out
    assert len(IndexedDataset(prefix + "_text_document")) == 1200


def test_cli_reports_bad_input_in_one_line(tmp_path, demo_paths, capsys):
    argv = ["preprocess", "--input", str(tmp_path / "nope.parquet"), "--output-prefix",
            str(tmp_path / "o"), "--tokenizer-type", "PretrainedFromHF",
            "--tokenizer-name-or-path", demo_paths.tokenizer_model]
    assert cli.main(argv) == 2
    assert "nope.parquet: input file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- bad input
def assert_nothing_written(directory):
    leftovers = [n for n in listdir_names(directory) if n.endswith((".bin", ".idx")) or "tmp" in n]
    assert leftovers == []


def test_missing_file(demo_paths, tmp_path):
    with pytest.raises(DataError, match="missing.parquet: input file not found"):
        run(str(tmp_path / "missing.parquet"), tmp_path / "o", demo_paths.tokenizer_model)
    with pytest.raises(DataError, match="glob matches no"):
        run(str(tmp_path / "*.jsonl"), tmp_path / "o", demo_paths.tokenizer_model)


def test_corrupt_parquet(demo_paths, tmp_path):
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(200))
    with pytest.raises(DataError, match="corrupt.parquet: corrupt or truncated"):
        run(str(bad), tmp_path / "o", demo_paths.tokenizer_model)
    assert_nothing_written(tmp_path)


def test_truncated_parquet(demo_paths, tmp_path):
    raw = open(demo_paths.parquet, "rb").read()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.parquet"):
        run(str(cut), tmp_path / "o", demo_paths.tokenizer_model)
    assert_nothing_written(tmp_path)


def test_corrupt_page_mid_file_names_row_and_leaves_nothing(demo_paths, tmp_path):
    texts = [f"document number {i} " * 5 for i in range(400)]
    path = write_texts_parquet(tmp_path / "mid.parquet", texts, row_group_size=100)
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(2).column(0).data_page_offset  # third row group's data page
    raw = bytearray(open(path, "rb").read())
    raw[start:start + 64] = b"\xff" * 64
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DataError, match=r"mid.parquet: corrupt parquet data after row 200"):
        run(path, tmp_path / "o", demo_paths.tokenizer_model, batch_size=100, workers=2)
    assert_nothing_written(tmp_path)


def test_truncated_json_names_line(demo_paths, tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "cut of')
    with pytest.raises(DataError, match="cut.jsonl: line 3: invalid JSON"):
        run(str(path), tmp_path / "o", demo_paths.tokenizer_model)
    array = tmp_path / "cut.json"
    array.write_text('[{"text": "a"},\n {"text": "b"')
    with pytest.raises(DataError, match=r"cut.json: invalid JSON at line 2"):
        run(str(array), tmp_path / "o", demo_paths.tokenizer_model)
    assert_nothing_written(tmp_path)


def test_missing_key_lists_available_columns(demo_paths, tmp_path):
    with pytest.raises(DataError, match=r"\['content'\] not found; available columns: "
                                        r"\['input', 'instruction', 'output', 'text'\]"):
        run(demo_paths.parquet, tmp_path / "o", demo_paths.tokenizer_model, json_keys=["content"])
    path = tmp_path / "k.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"k.jsonl: line 2: .*'text'.*available columns: \['body'\]"):
        run(str(path), tmp_path / "o", demo_paths.tokenizer_model)
    assert_nothing_written(tmp_path)


def test_non_string_field(demo_paths, tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(DataError, match="n.jsonl: line 2: field 'text' is int, expected a string"):
        run(str(path), tmp_path / "o", demo_paths.tokenizer_model)


def test_failure_keeps_previous_output_intact(demo_paths, tok, tmp_path):
    good = write_texts_parquet(tmp_path / "good.parquet", ["keep me"])
    stats = run(good, tmp_path / "o", demo_paths.tokenizer_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(DataError):
        run(str(bad), tmp_path / "o", demo_paths.tokenizer_model)
    assert read_docs(stats["text"].prefix) == [tok.encode("keep me")]
    assert not [n for n in listdir_names(tmp_path) if "tmp" in n]


def test_bad_tokenizer_path_before_any_output(tmp_path, demo_paths):
    with pytest.raises(DataError, match="tokenizer path does not exist"):
        run(demo_paths.parquet, tmp_path / "o", str(tmp_path / "no_tokenizer"))
    assert_nothing_written(tmp_path)


_PEAK_CHILD = """
import sys
from fnllama.data.preprocess import preprocess
preprocess(sys.argv[1], sys.argv[2], tokenizer_type="SentencePieceTokenizer",
           tokenizer_path=sys.argv[3], batch_size=100, log_interval=0, log=lambda _: None)
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_is_flat_in_input_size(demo_paths, tmp_path):
    import subprocess
    import sys

    doc = "Sort the words alphabetically. zebra, apple, mango, kiwi. " * 60  # ~3.5 KB
    peaks = []
    # 20 vs 80 record batches (7 vs 28 MB of text), row groups of 1000 rows: after a few
    # batches the peak (read buffers, allocator pools) reaches a steady state and stays.
    for times in (20, 80):
        path = write_texts_parquet(tmp_path / f"x{times}.parquet",
                                   [f"{i} {doc}" for i in range(100 * times)], 1000)
        out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, path, str(tmp_path / "o"),
                              demo_paths.tokenizer_model], capture_output=True, text=True,
                             check=True).stdout
        peaks.append(int(out) / 1024)
    assert peaks[1] - peaks[0] < 8, f"peak RSS grew from {peaks[0]:.0f} MB to {peaks[1]:.0f} MB"
