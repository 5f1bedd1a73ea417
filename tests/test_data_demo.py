"""Demo data: deterministic Alpaca-format parquet + sentencepiece model, cached idempotently."""

import os

import pyarrow.parquet as pq

from fnllama.data import demo
from fnllama.data.indexed import IndexedDataset
from fnllama.data.tokenizer import load_tokenizer


def test_default_demo_is_deterministic_cached_and_learnable(tmp_path):
    a = demo.prepare_demo(str(tmp_path / "a"), seed=0)
    b = demo.prepare_demo(str(tmp_path / "b"), seed=0)
    for path_a, path_b in ((a.parquet, b.parquet), (a.tokenizer_model, b.tokenizer_model)):
        assert open(path_a, "rb").read() == open(path_b, "rb").read()
    table = pq.read_table(a.parquet)
    assert table.column_names == ["instruction", "input", "output", "text"]
    assert table.num_rows >= 5000
    tok = load_tokenizer("SentencePieceTokenizer", a.tokenizer_model)
    assert 1000 <= tok.vocab_size <= 4000 and (tok.bos_id, tok.eos_id) == (1, 2)
    texts = table.column("text").to_pylist()
    assert all(tok.decode(tok.encode(t)) == t for t in texts[:500])
    mtime = os.path.getmtime(a.tokenizer_model)
    assert demo.prepare_demo(str(tmp_path / "a"), seed=0) == a  # reused, not rebuilt
    assert os.path.getmtime(a.tokenizer_model) == mtime
    assert sorted(os.listdir(tmp_path / "a")) == [os.path.basename(a.directory)]


def test_records_are_correct_and_seeded():
    records = demo.make_records(2000, seed=4)
    assert records == demo.make_records(2000, seed=4)
    assert records != demo.make_records(2000, seed=5)
    kinds = {r["instruction"].split()[0] for r in records}
    assert len(kinds) >= 8
    for r in records:
        if r["instruction"] == "Add the two numbers.":
            x, y = r["input"].split(" + ")
            assert int(r["output"]) == int(x) + int(y)
        elif r["instruction"] == "Sort the words alphabetically.":
            assert r["output"].split(", ") == sorted(r["input"].split(", "))
        elif r["instruction"] == "Reverse the letters of the word.":
            assert r["output"] == r["input"][::-1]
        assert r["text"].endswith("### Response:\n" + r["output"])
        assert ("### Input:\n" + r["input"] in r["text"]) == bool(r["input"])


def test_build_demo_dataset_is_idempotent(tmp_path):
    prefix = demo.build_demo_dataset(str(tmp_path), seed=0, workers=1)
    ds = IndexedDataset(prefix)
    assert len(ds) >= 5000 and all(ds[i][-1] == 2 for i in (0, 1, len(ds) - 1))  # EOD
    mtime = os.path.getmtime(prefix + ".bin")
    assert demo.build_demo_dataset(str(tmp_path), seed=0) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime
