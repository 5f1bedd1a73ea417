"""Tokenizer backends: sentencepiece .model, HF dir with tokenizer.model, HF dir with tokenizer.json."""

import json
import shutil

import pytest
import sentencepiece as spm

from data_support import small_demo
from fnllama.data import demo
from fnllama.data.tokenizer import load_tokenizer
from fnllama.errors import DataError

TEXTS = ["Hello world", "Sort the words alphabetically.\n\n### Input:\nzebra, apple",
         "tabs\tand  double  spaces", "ünïcödé 漢字 🙂", "123456 + 7 = 123463"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("tok"))


def _hf_dir(tmp_path, model, config):
    d = tmp_path / "hf"
    d.mkdir()
    shutil.copy(model, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return str(d)


def test_sentencepiece_model_matches_sentencepiece(paths):
    tok = load_tokenizer("SentencePieceTokenizer", paths.tokenizer_model)
    sp = spm.SentencePieceProcessor(model_file=paths.tokenizer_model)
    assert tok.vocab_size == sp.get_piece_size() == 800
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)  # no BOS/EOS added
        assert tok.decode(tok.encode(text)) == text  # byte fallback: lossless
    assert tok.encode_batch(TEXTS) == [sp.encode(t) for t in TEXTS]


def test_hf_dir_with_sentencepiece_reads_bos_eos_settings(paths, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=paths.tokenizer_model)
    d = _hf_dir(tmp_path, paths.tokenizer_model,
                {"add_bos_token": True, "add_eos_token": True,
                 "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"})
    tok = load_tokenizer("PretrainedFromHF", d)
    assert tok.encode("Hello world") == [1] + sp.encode("Hello world") + [2]
    assert tok.encode_batch(["a b", "c"]) == [[1] + sp.encode("a b") + [2], [1] + sp.encode("c") + [2]]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_hf_dir_without_config_defaults_to_llama_add_bos(paths, tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(paths.tokenizer_model, d / "tokenizer.model")
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = load_tokenizer("PretrainedFromHF", str(d))
    assert tok.encode("abc")[0] == tok.bos_id == 1 and tok.encode("abc")[-1] != 2
    assert tok.eos_id == 2


def test_hf_dir_matches_transformers(paths, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _hf_dir(tmp_path, paths.tokenizer_model,
                {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                 "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"})
    ref = transformers.AutoTokenizer.from_pretrained(d)
    ours = load_tokenizer("PretrainedFromHF", d)
    # Texts that start with a non-space character: for a leading space, transformers' converted
    # fast tokenizer and raw sentencepiece (what Megatron uses, and we) disagree by one piece.
    texts = TEXTS + [r["text"] for r in demo.make_records(100, seed=7)]
    for text in texts:
        assert ours.encode(text) == ref(text)["input_ids"], text
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)


def test_hf_dir_with_only_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    hf.train_from_iterator([r["text"] for r in demo.make_records(300, seed=1)], trainer)
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "json_only"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    tok = load_tokenizer("PretrainedFromHF", str(d))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, hf.get_vocab_size())
    ids = tok.encode("Add the two numbers.")
    assert ids == hf.encode("Add the two numbers.").ids and ids[0] == 1
    assert tok.encode_batch(["Add", "Count"]) == [hf.encode("Add").ids, hf.encode("Count").ids]
    assert tok.decode(ids).replace(" ", "") == "Addthetwonumbers."


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer("PretrainedFromHF", str(empty))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(DataError, match="junk.model"):
        load_tokenizer("SentencePieceTokenizer", str(junk))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer("PretrainedFromHF", str(broken))
    with pytest.raises(DataError, match="unknown"):
        load_tokenizer("GPT2BPETokenizer", str(junk))
