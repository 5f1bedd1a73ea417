"""`fnllama convert-hf` / `export-hf`: HF dir -> train --init-from-hf -> export -> transformers loads
it with fnllama's logits; convert-hf -> train --load starts from those weights; bad paths/steps."""

from __future__ import annotations

import json

import pytest
import torch

from fnllama import cli, model
from fnllama import random as fr
from fnllama.config import get_preset
from fnllama.convert import load_params

CFG = get_preset("tiny", vocab_size=2048)


@pytest.fixture(scope="module")
def demo_prefix(tmp_path_factory) -> str:
    from fnllama.data import demo
    return demo.build_demo_dataset(str(tmp_path_factory.mktemp("demo")), seed=0, workers=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from fnllama.hf import save_hf
    return save_hf(model.init(fr.key(7), CFG), CFG, tmp_path_factory.mktemp("hf") / "model")


def _train(prefix: str, out, *extra: str) -> list[str]:
    return ["train", "--data-path", prefix, "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
            "--output-dir", str(out), *extra]


def test_hf_to_training_to_export_loads_in_transformers_with_the_same_logits(demo_prefix, hf_dir, tmp_path):
    from transformers import LlamaForCausalLM

    ckpt = tmp_path / "ckpt"
    assert cli.main(_train(demo_prefix, tmp_path / "run", "--init-from-hf", str(hf_dir), "--train-iters", "5",
                           "--save", str(ckpt), "--zero-stage", "1")) == 0
    assert cli.main(["export-hf", "--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "out")]) == 0
    params, cfg, step = load_params(ckpt)
    assert step == 5 and cfg == CFG
    initial = model.init(fr.key(7), CFG)
    assert not torch.equal(params["embed"], initial["embed"])                   # it did train
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.forward(params, tokens, CFG)
        got = hf(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_convert_hf_then_train_load_starts_from_those_weights(demo_prefix, hf_dir, tmp_path, capsys):
    ckpt = tmp_path / "converted"
    assert cli.main(["convert-hf", "--input-model-dir", str(hf_dir), "--output-dir", str(ckpt)]) == 0
    params, cfg, step = load_params(ckpt)
    assert step == 0 and cfg == CFG
    assert torch.equal(params["layers"][1]["mlp"]["w_up"], model.init(fr.key(7), CFG)["layers"][1]["mlp"]["w_up"])

    # No --model: the shape comes from the checkpoint; a fresh state (step 0) from its params.
    assert cli.main(_train(demo_prefix, tmp_path / "run", "--load", str(ckpt), "--train-iters", "2")) == 0
    assert f"initialised from the params of step 0 in {ckpt}" in capsys.readouterr().out
    from fnllama.data import gpt_dataset
    from fnllama.data.loader import Loader
    batch = next(Loader(gpt_dataset.build_split(demo_prefix, seq_length=32, seed=1234), micro_batch_size=4))
    with torch.no_grad():
        expected, _ = model.loss(params, batch, CFG)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-5)


def _error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_errors_naming_path_or_step(hf_dir, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert str(missing) in _error(capsys, ["export-hf", "--checkpoint", str(missing), "--output-dir", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["export-hf", "--checkpoint", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")])
    assert f"no committed checkpoint in {tmp_path / 'empty'}" in err
    ckpt = tmp_path / "ck"
    assert cli.main(["convert-hf", "--input-model-dir", str(hf_dir), "--output-dir", str(ckpt)]) == 0
    capsys.readouterr()
    err = _error(capsys, ["export-hf", "--checkpoint", str(ckpt), "--step", "7", "--output-dir", str(tmp_path / "o")])
    assert f"step 7 is not a committed checkpoint in {ckpt} (committed: [0])" in err
    err = _error(capsys, ["convert-hf", "--input-model-dir", str(hf_dir), "--output-dir", str(ckpt)])
    assert f"--output-dir {ckpt}: already exists and is not empty" in err
    assert "--input-model-dir" in _error(capsys, ["convert-hf", "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "o").exists()
