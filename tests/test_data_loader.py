"""Packed dataset + loader: dp sharding, resume, seeding, epochs, splits, blending, cache."""

import os

import numpy as np
import pytest
import torch

from data_support import small_demo, unique_token_docs
from fnllama.data import gpt_dataset, loader
from fnllama.data.indexed import IndexedDataset, IndexedDatasetWriter
from fnllama.data.preprocess import preprocess
from fnllama.data.tokenizer import load_tokenizer
from fnllama.errors import ConfigError, DataError

T = 8


def write_docs(prefix, docs):
    w = IndexedDatasetWriter(str(prefix), np.int32)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return str(prefix)


@pytest.fixture
def unique(tmp_path):
    """97 documents of 3..9 tokens (one longer), all tokens distinct; the epoch's sample
    count is a multiple of 4 (= micro batch 2 x 2 ranks)."""
    lengths = np.random.default_rng(0).integers(3, 10, size=97)
    lengths[-1] += (4 * T - (lengths.sum() - 1) % (4 * T)) % (4 * T)
    docs = unique_token_docs(lengths)
    return write_docs(tmp_path / "u", docs), docs


def packed(prefix, seed=0, **kw):
    ds = IndexedDataset(prefix)
    return gpt_dataset.PackedDataset(ds, np.arange(len(ds)), seq_length=T, seed=seed, **kw)


def take(ld, steps):
    return [next(ld) for _ in range(steps)]


def test_two_dp_ranks_cover_an_epoch_exactly_once(unique):
    prefix, docs = unique
    ds = packed(prefix)
    n_tokens = sum(len(d) for d in docs)
    assert ds.samples_per_epoch == (n_tokens - 1) // T
    B = 2
    steps = ds.samples_per_epoch // (2 * B)
    seen = []
    for rank in (0, 1):
        ld = loader.Loader(ds, micro_batch_size=B, dp_rank=rank, dp_size=2)
        seen.append(torch.cat([b["tokens"] for b in take(ld, steps)]).reshape(-1).tolist())
    assert not set(seen[0]) & set(seen[1])
    everything = seen[0] + seen[1]
    # Inputs of all samples of an epoch tile the shuffled token stream: no token twice.
    assert len(set(everything)) == len(everything) == steps * 2 * B * T
    assert set(everything) <= set(np.concatenate(docs).tolist())
    assert ds.samples_per_epoch % (2 * B) == 0 and len(everything) == ds.samples_per_epoch * T


def test_labels_positions_segments_follow_documents(unique):
    prefix, docs = unique
    doc_start = {int(d[0]) for d in docs}
    doc_end = {int(d[-1]) for d in docs}
    batch = next(loader.Loader(packed(prefix), micro_batch_size=4, eod_mask_loss=True))
    tokens, labels, seg, pos = (batch[k] for k in ("tokens", "labels", "segment_ids", "positions"))
    assert tokens.shape == (4, T) and tokens.dtype == seg.dtype == pos.dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    for b in range(4):
        for t in range(T):
            if t == 0:
                assert seg[b, t] == 0 and pos[b, t] == 0
            elif seg[b, t] == seg[b, t - 1]:  # same document: consecutive tokens
                assert tokens[b, t] == tokens[b, t - 1] + 1 and pos[b, t] == pos[b, t - 1] + 1
            else:  # a new document starts: positions restart, id goes up by one
                assert int(tokens[b, t]) in doc_start
                assert pos[b, t] == 0 and seg[b, t] == seg[b, t - 1] + 1
            crosses = labels[b, t] != tokens[b, t] + 1  # see unique_token_docs
            assert crosses == (int(tokens[b, t]) in doc_end and int(labels[b, t]) in doc_start)
            assert batch["loss_mask"][b, t] == (0.0 if crosses else 1.0)
    plain = next(loader.Loader(packed(prefix), micro_batch_size=4))
    assert torch.all(plain["loss_mask"] == 1.0)


def test_restore_continues_with_identical_next_batch(unique):
    prefix, _ = unique
    ds = packed(prefix)
    ld = loader.Loader(ds, micro_batch_size=3, dp_rank=1, dp_size=2)
    take(ld, 5)
    state = ld.state()
    assert state["consumed_samples"].dtype == torch.int64 and state["consumed_samples"].ndim == 0
    expected = take(ld, 12)  # runs past the end of the first epoch
    fresh = loader.Loader(packed(prefix), micro_batch_size=3, dp_rank=1, dp_size=2)
    fresh.restore(state)
    for want, got in zip(expected, take(fresh, 12)):
        for k in want:
            assert torch.equal(want[k], got[k]), k


def test_same_seed_same_order_different_seed_different_order(unique):
    prefix, _ = unique
    first = lambda seed: next(loader.Loader(packed(prefix, seed), micro_batch_size=4))["tokens"]
    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_epochs_reshuffle_and_cover_again(unique):
    prefix, _ = unique
    ds = packed(prefix)
    L = ds.samples_per_epoch
    e0 = [tuple(ds.sample(g)[0]) for g in range(L)]
    e1 = [tuple(ds.sample(g)[0]) for g in range(L, 2 * L)]
    assert e0 != e1
    firsts = lambda e: sorted(s[0] for s in e)
    assert len(set(firsts(e0))) == len(set(firsts(e1))) == L


def test_index_cache_reused_and_rebuilt_when_inputs_change(unique, tmp_path):
    prefix, docs = unique
    ds = packed(prefix)
    ds.sample(0)
    cache = prefix + "_index_cache"
    entries = sorted(os.listdir(cache))
    assert len(entries) == 1 and entries[0].endswith("-epoch0")
    mtime = os.path.getmtime(os.path.join(cache, entries[0], "shuffle.npy"))
    again = packed(prefix)
    np.testing.assert_array_equal(again.sample(3)[0], ds.sample(3)[0])
    assert sorted(os.listdir(cache)) == entries
    assert os.path.getmtime(os.path.join(cache, entries[0], "shuffle.npy")) == mtime
    packed(prefix, seed=5).sample(0)
    write_docs(prefix, docs[:-1])  # the data changed under the same name
    packed(prefix).sample(0)
    assert len(os.listdir(cache)) == 3
    uncached = packed(prefix, cache=False)
    np.testing.assert_array_equal(uncached.sample(2)[0], packed(prefix).sample(2)[0])


def test_split_969_30_1_is_megatrons_cut():
    weights = gpt_dataset.parse_split("969,30,1")
    assert gpt_dataset.split_ranges(1000, weights) == [(0, 969), (969, 999), (999, 1000)]
    assert gpt_dataset.split_ranges(10, gpt_dataset.parse_split("98,2")) == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(ConfigError, match="--split"):
        gpt_dataset.parse_split("a,b")


def test_build_split_train_and_valid_use_disjoint_documents(tmp_path):
    docs = unique_token_docs([20] * 100)
    prefix = write_docs(tmp_path / "s", docs)
    train = gpt_dataset.build_split(prefix, seq_length=T, split="90,10,0", which="train", seed=0)
    valid = gpt_dataset.build_split(prefix, seq_length=T, split="90,10,0", which="valid", seed=0)
    tokens = lambda ds: {int(x) for g in range(ds.samples_per_epoch) for x in ds.sample(g)[0]}
    assert max(tokens(train)) < docs[90][0] <= min(tokens(valid))
    with pytest.raises(DataError, match="test split .* holds no documents"):
        gpt_dataset.build_split(prefix, seq_length=T, split="90,10,0", which="test")


def test_blend_follows_weights(tmp_path):
    a = write_docs(tmp_path / "a", unique_token_docs([50] * 20, first=0))
    b = write_docs(tmp_path / "b", unique_token_docs([50] * 20, first=100_000))
    ds = gpt_dataset.build_split(["0.25", a, "0.75", b], seq_length=T, split="1", seed=0)
    assert isinstance(ds, gpt_dataset.BlendedDataset)
    origin = [int(ds.sample(g)[0][0] >= 100_000) for g in range(400)]
    assert sum(origin) == 300
    assert abs(sum(origin[:40]) - 30) <= 1  # spread evenly, not in long runs
    twice = gpt_dataset.build_split([(1, a), (3, b)], seq_length=T, split="1", seed=0)
    np.testing.assert_array_equal(twice.sample(77)[0], ds.sample(77)[0])


def test_too_few_tokens_says_how_many_are_needed(tmp_path):
    prefix = write_docs(tmp_path / "tiny", unique_token_docs([3, 2]))
    with pytest.raises(DataError, match=r"tiny.*5 tokens.*at least 9 tokens"):
        gpt_dataset.build_split(prefix, seq_length=T, split="1")


def test_bad_loader_arguments(unique):
    ds = packed(unique[0])
    with pytest.raises(ConfigError, match="dp_rank"):
        loader.Loader(ds, micro_batch_size=2, dp_rank=2, dp_size=2)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        loader.Loader(ds, micro_batch_size=0)
    with pytest.raises(ConfigError, match="consumed_samples"):
        loader.Loader(ds, micro_batch_size=2).restore({"step": 3})


def test_demo_to_preprocess_to_loader(tmp_path):
    paths = small_demo(tmp_path)
    stats = preprocess(paths.parquet, str(tmp_path / "alpaca"), tokenizer_type="SentencePieceTokenizer",
                       tokenizer_path=paths.tokenizer_model, append_eod=True, workers=2,
                       log=lambda _: None)
    ds = gpt_dataset.build_split(stats["text"].prefix, seq_length=64, split="969,30,1", seed=0)
    batch = next(loader.Loader(ds, micro_batch_size=4))
    tok = load_tokenizer("SentencePieceTokenizer", paths.tokenizer_model)
    tokens, seg = batch["tokens"][0], batch["segment_ids"][0]
    eod_at = (tokens == tok.eos_id).nonzero().flatten().tolist()
    assert eod_at, "a 64-token window of ~50-token documents holds an EOD"
    for t in eod_at:  # each document ends with EOD and the next one starts a new segment
        if t + 1 < 64:
            assert seg[t + 1] == seg[t] + 1 and batch["positions"][0, t + 1] == 0
    assert "### Response:" in tok.decode(batch["tokens"].reshape(-1).tolist())
