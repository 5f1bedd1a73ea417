"""fnllama.run.train end to end: resume from a checkpoint, the 7B recipe (dry run, shrunk on 2
gloo processes), and the quickstart (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fnllama.config import ModelConfig
from fnllama.experiment import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from fnllama.run import train
from dist_support import free_port

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_prefix(demo_dir) -> str:
    from fnllama.data import demo
    return demo.build_demo_dataset(demo_dir, seed=0, workers=1)


def _exp(prefix: str, out: Path, **train) -> ExperimentConfig:
    base = dict(seq_length=32, micro_batch_size=2, global_batch_size=4, train_iters=6, log_interval=1,
                output_dir=str(out))
    return ExperimentConfig(
        model=ModelConfig(vocab_size=2048, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32),
        optim=OptimConfig(lr=3e-3, lr_warmup_iters=1),
        data=DataConfig(data_path=(prefix,)),
        train=TrainConfig(**(base | train)),
    )


def _metric_losses(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def test_resume_continues_at_the_next_step_with_the_same_losses(demo_prefix, tmp_path, capsys):
    ckpt = tmp_path / "a" / "ckpt"
    straight = train(_exp(demo_prefix, tmp_path / "a", save=str(ckpt), save_interval=3))
    assert straight["end_step"] == 6 and len(straight["losses"]) == 6
    assert sorted(int(p.stem) for p in (ckpt / "committed").glob("*.json")) == [3, 6]

    resumed = train(_exp(demo_prefix, tmp_path / "b", load=str(ckpt), load_step=3))
    assert "restored step 3" in capsys.readouterr().out
    assert resumed["start_step"] == 3 and resumed["end_step"] == 6
    assert resumed["losses"] == straight["losses"][3:]           # bitwise: same data, params, optimizer
    assert sorted(_metric_losses(tmp_path / "b" / "metrics.jsonl")) == [4, 5, 6]


def test_resume_flag_restores_the_latest_step_of_save(demo_prefix, tmp_path):
    out = tmp_path / "run"
    first = train(_exp(demo_prefix, out, train_iters=4, save=str(out / "ckpt"), save_interval=2))
    again = train(_exp(demo_prefix, out, train_iters=4, save=str(out / "ckpt"), resume=True))
    assert again["start_step"] == 4 and again["losses"] == []                 # nothing left to do
    assert sorted(_metric_losses(out / "metrics.jsonl")) == [1, 2, 3, 4]      # not duplicated
    assert math.isfinite(first["last_loss"])


def test_llama2_7b_dry_run_prints_the_parameter_count_and_plan(capsys):
    assert _load("llama2_7b_zero_8p").main(["--dry-run", "--tflops", "147.4"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out
    assert "8 devices | ZeRO stage 1 | bf16 | recompute full" in out
    assert "global batch 256" in out and "time per step at 147.4 TFLOP/s" in out


def test_llama2_7b_shrunk_trains_on_two_gloo_processes(demo_dir, tmp_path):
    out = tmp_path / "shrunk"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "llama2_7b_zero_8p.py"), "--shrink", "--data-dir", demo_dir,
         "--output-dir", str(out), "--master-port", str(free_port())],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "launching: " in proc.stderr and "--nproc-per-node=2" in proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["parallel"]["zero_stage"] == 1 and config["parallel"]["dp"] == 2
    losses = _metric_losses(out / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
    assert sorted(int(p.stem) for p in (out / "ckpt" / "committed").glob("*.json")) == [4, 8]
    assert {p.name for p in (out / "ckpt").iterdir()} >= {"rank_0", "rank_1"}


@pytest.mark.slow
def test_quickstart_loss_falls_and_writes_its_outputs(tmp_path):
    # A fresh process, as a user runs it (its preprocess workers fork before orbax/JAX threads exist).
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "quickstart.py")], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]  # includes the loss-fall check
    out = tmp_path / "runs" / "quickstart"
    assert (out / "loss.png").stat().st_size > 10_000
    losses = _metric_losses(out / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 301)) and losses[300] < 0.5 * math.log(2048)
    assert (out / "ckpt" / "committed" / "300.json").exists()


def test_init_from_hf_starts_from_those_weights(demo_prefix, tmp_path, capsys):
    import torch

    from fnllama import model
    from fnllama import random as fr
    from fnllama.errors import ConfigError
    from fnllama.hf import save_hf

    exp = _exp(demo_prefix, tmp_path / "hf_run", train_iters=2)
    params = model.init(fr.key(7), exp.model)
    hf_dir = save_hf(params, exp.model, tmp_path / "hf")
    from_hf = train(exp.replace(train=TrainConfig(**{**exp.train.__dict__, "init_from_hf": str(hf_dir)})))
    assert f"initialised from HF weights in {hf_dir}" in capsys.readouterr().out
    from fnllama.data.loader import Loader
    from fnllama.data import gpt_dataset
    batch = next(Loader(gpt_dataset.build_split(demo_prefix, seq_length=32, seed=exp.train.seed),
                        micro_batch_size=4))
    with torch.no_grad():
        expected, _ = model.loss(params, batch, exp.model)
    assert from_hf["first_loss"] == pytest.approx(expected.item(), rel=1e-5)

    wider = exp.replace(model=ModelConfig(**{**exp.model.__dict__, "dim": 64}),
                        train=TrainConfig(**{**exp.train.__dict__, "init_from_hf": str(hf_dir)}))
    with pytest.raises(ConfigError, match="its config.json has dim=32 but the run's model has 64"):
        train(wider)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_like_replicated_in_one_process(demo_prefix, tmp_path, stage):
    """`--zero-stage N` at dp=1 follows the replicated run's losses (stage 3 gathers each layer)."""
    from fnllama.experiment import ParallelConfig

    ref = train(_exp(demo_prefix, tmp_path / "zero0"))["losses"]
    exp = _exp(demo_prefix, tmp_path / f"zero{stage}")
    got = train(exp.replace(parallel=ParallelConfig(zero_stage=stage)))["losses"]
    assert len(got) == len(ref) == 6
    assert max(abs(a - b) / b for a, b in zip(got, ref)) <= 1e-5


def test_zero_stage_3_rejects_recompute_and_checkpoints(demo_prefix, tmp_path):
    import dataclasses

    from fnllama.errors import ConfigError
    from fnllama.experiment import ParallelConfig

    exp = _exp(demo_prefix, tmp_path)
    stage3 = ParallelConfig(zero_stage=3)
    with pytest.raises(ConfigError, match="--zero-stage 3 with --recompute full"):
        exp.replace(parallel=stage3, train=dataclasses.replace(exp.train, recompute="full"))
    with pytest.raises(ConfigError, match="cannot be checkpointed"):
        exp.replace(parallel=stage3, train=dataclasses.replace(exp.train, save=str(tmp_path / "ckpt")))
