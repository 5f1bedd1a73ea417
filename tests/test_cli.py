"""`fnllama train`: flags -> ExperimentConfig, the happy path, and one-line user errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fnllama import cli
from fnllama.config import PRESETS
from fnllama.experiment import ExperimentConfig, TrainConfig
from fnllama.train_cli import build_config, torchrun_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_prefix(tmp_path_factory) -> str:
    from fnllama.data import demo
    return demo.build_demo_dataset(str(tmp_path_factory.mktemp("demo")), seed=0, workers=1)


def _tiny_args(prefix: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny", "--vocab-size", "2048", "--data-path", prefix, "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--log-interval", "2",
            "--lr", "1e-3", "--output-dir", str(out), *extra]


def test_train_happy_path_writes_metrics_and_config(demo_prefix, tmp_path, capsys):
    assert cli.main(_tiny_args(demo_prefix, tmp_path / "run")) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    assert all(r["loss"] > 0 and r["tokens_per_s_per_device"] > 0 for r in records)
    saved = ExperimentConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert saved.model.vocab_size == 2048 and saved.train.global_batch_size == 4
    assert saved.data.data_path == (demo_prefix,)
    out = capsys.readouterr().out
    assert "grad-accum 2" in out and "samples/s/p" in out


def test_flags_override_a_config_file(tmp_path):
    exp_file = tmp_path / "exp.py"
    exp_file.write_text(
        "from fnllama.experiment import ExperimentConfig, TrainConfig, OptimConfig\n"
        "from fnllama.config import get_preset\n"
        "def get_config():\n"
        "    return ExperimentConfig(model=get_preset('small'), optim=OptimConfig(lr=1e-3),\n"
        "                            train=TrainConfig(train_iters=50, seq_length=256))\n")
    exp, _ = build_config(["--config", str(exp_file), "--train-iters", "7", "--num-layers", "3", "--bf16",
                           "--data-path", "0.3", "a_text_document", "0.7", "b_text_document",
                           "--zero-stage", "1", "--clip-grad", "0.5"])
    assert exp.train.train_iters == 7 and exp.train.seq_length == 256 and exp.train.precision == "bf16"
    assert exp.model.n_layers == 3 and exp.model.dim == PRESETS["small"].dim
    assert exp.optim.lr == 1e-3 and exp.optim.clip_grad == 0.5 and exp.parallel.zero_stage == 1
    assert exp.data.blend() == (["a_text_document", "b_text_document"], [0.3, 0.7])


def test_config_json_round_trip():
    exp, _ = build_config(["--model", "tiny", "--seq-length", "64", "--global-batch-size", "16",
                           "--micro-batch-size", "4", "--fp16", "--recompute", "full"])
    assert ExperimentConfig.from_dict(json.loads(exp.to_json())) == exp
    assert exp.grad_accum_steps() == 4 and exp.grad_accum_steps(dp=2) == 2


def test_torchrun_relaunch_command():
    exp, _ = build_config(["--model", "tiny", "--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1",
                           "--master-addr", "10.0.0.1", "--master-port", "6000", "--micro-batch-size", "1"])
    cmd = torchrun_command(exp, ["--model", "tiny"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    for part in ("--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
                 "--master-port=6000"):
        assert part in cmd
    assert cmd[-4:] == ["fnllama.cli", "train", "--model", "tiny"]


def test_dry_run_prints_7b_parameters(capsys):
    argv = ["train", "--model", "llama2-7b", "--dry-run", "--seq-length", "512", "--micro-batch-size", "1",
            "--global-batch-size", "256", "--dp", "8", "--zero-stage", "1", "--bf16", "--recompute", "full"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out and "grad-accum 32" in out and "ZeRO stage 1" in out


# ---------------------------------------------------------------- bad input: one line, exit 2

def _bad_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bad_exp.py"
    path.write_text(body)
    return str(path)


BAD = {
    "preset": (["--model", "llama9"], "unknown model preset 'llama9'; known presets: tiny, small, llama2-7b"),
    "batch": (["--model", "tiny", "--global-batch-size", "10", "--micro-batch-size", "4"],
              "--global-batch-size 10 is not divisible by --micro-batch-size 4 x dp 1 = 4"),
    "no_data": (["--model", "tiny", "--train-iters", "1"], "--data-path is required"),
    "missing_data": (["--model", "tiny", "--data-path", "/nonexistent/alpaca_text_document"],
                     "/nonexistent/alpaca_text_document.bin not found"),
    "precision": (["--model", "tiny", "--fp16", "--bf16"], "argument --bf16: not allowed with argument --fp16"),
    "seq": (["--model", "tiny", "--seq-length", "4096"],
            "--seq-length 4096 exceeds the model's max_seq_len 256; pass --max-position-embeddings 4096"),
    "resume": (["--model", "tiny", "--resume"], "--resume restores from the --save directory"),
    "blend": (["--model", "tiny", "--data-path", "x", "a", "0.5", "b"], "blend weights ['x', '0.5'] must be numbers"),
    "heads": (["--model", "tiny", "--num-attention-heads", "5"], "ModelConfig.dim=64 is not divisible by n_heads=5"),
    "missing_config": (["--config", "/nonexistent/exp.py"], "--config /nonexistent/exp.py: no such file"),
    "no_get_config": ("x = 1\n", "defines no get_config() function"),
    "wrong_type": ("def get_config():\n    return {'lr': 1}\n", "get_config() returned a dict, expected"),
    "syntax": ("def get_config(:\n", "importing it failed: SyntaxError"),
    "raises": ("def get_config():\n    raise KeyError('lr')\n", "get_config() raised KeyError"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                     # nothing a failed run writes lands in the repo
    argv, expected = BAD[case]
    if isinstance(argv, str):                       # a bad experiment file's body
        argv = ["--config", _bad_file(tmp_path, argv)]
    assert cli.main(["train", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fnllama train: error: ") and expected in lines[0], lines[0]


def test_user_error_has_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fnllama.cli", "train", "--model", "tiny",
                           "--global-batch-size", "10", "--micro-batch-size", "4"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fnllama train: error: --global-batch-size 10 is not divisible by "
                                   "--micro-batch-size 4 x dp 1 = 4")


def test_train_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="--save-interval 5: pass --save DIR"):
        TrainConfig(save_interval=5)
    with pytest.raises(ValueError, match="--micro-batch-size 0: expected an integer >= 1"):
        TrainConfig(micro_batch_size=0)


def test_dispatcher_lists_verbs_and_rejects_unknown_ones(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in cli.VERBS)
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'trian'" in err and "train" in err and err.count("\n") == 1
    assert cli.main([]) == 2


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([verb, "--help"])
    assert exit_.value.code == 0
    assert "--" in capsys.readouterr().out          # an options listing


def test_compare_fp32_and_bf16_runs_against_hand_computation(demo_prefix, tmp_path, capsys):
    """Two real runs (fp32, bf16) -> `fnllama compare`: the four figures equal a hand computation."""
    for name, extra in (("fp32", ()), ("bf16", ("--bf16",))):
        args = _tiny_args(demo_prefix, tmp_path / name, *extra)
        args[args.index("--log-interval") + 1] = "1"
        assert cli.main(args) == 0
    losses = {name: {r["iteration"]: r["loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").open())}
              for name in ("fp32", "bf16")}
    assert sorted(losses["fp32"]) == [1, 2, 3, 4]
    rel = [abs(losses["bf16"][s] - losses["fp32"][s]) / abs(losses["fp32"][s]) for s in range(1, 5)]
    absolute = [abs(losses["bf16"][s] - losses["fp32"][s]) for s in range(1, 5)]
    assert 0 < max(rel) < 0.05                     # bf16 really differs, and only a little
    capsys.readouterr()
    out_dir = tmp_path / "compare"
    assert cli.main(["compare", str(tmp_path / "bf16"), str(tmp_path / "fp32"), "--output-dir", str(out_dir)]) == 0
    text = capsys.readouterr().out
    printed = {line.split(":")[0]: float(line.split(":")[1].split()[0]) for line in text.splitlines()
               if line.startswith(("mean ", "max "))}
    assert printed["mean relative error"] == pytest.approx(sum(rel) / 4, rel=1e-5)
    assert printed["max relative error"] == pytest.approx(max(rel), rel=1e-5)
    assert printed["mean absolute error"] == pytest.approx(sum(absolute) / 4, rel=1e-5)
    assert printed["max absolute error"] == pytest.approx(max(absolute), rel=1e-5)
    assert len([p for p in out_dir.iterdir() if p.suffix == ".png"]) == 3
