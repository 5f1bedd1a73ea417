"""fnllama.plan: ZeRO-paper memory formulas on the 7B shape, activations, FLOPs, the CLI."""

import json
import subprocess
import sys

import optree
import pytest
import torch

from fnllama import model
from fnllama import random as fr
from fnllama.cli import main
from fnllama.config import get_preset, to_hf
from fnllama.errors import ConfigError
from fnllama.metrics import flops_per_token
from fnllama.plan import activation_bytes, plan

PSI = 6_738_415_616                  # LLaMA2-7B parameters
LLAMA2_7B = get_preset("llama2-7b")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_paper_formulas_7b_8_devices(stage):
    N, K = 8, 12
    p = plan(LLAMA2_7B, n_devices=N, zero_stage=stage, seq_len=4096, micro_batch=1)
    assert p.n_params == PSI
    expected = {                       # (params, grads, optimizer), Rajbhandari et al. 2020
        0: (2 * PSI, 2 * PSI, K * PSI),
        1: (2 * PSI, 2 * PSI, K * PSI // N),
        2: (2 * PSI, 2 * PSI // N, K * PSI // N),
        3: (2 * PSI // N, 2 * PSI // N, K * PSI // N),
    }[stage]
    assert (p.params_bytes, p.grads_bytes, p.optimizer_bytes) == expected
    assert p.total_bytes == sum(expected) + p.activation_bytes


def test_zero_1_7b_numbers_and_fp32():
    p = plan(LLAMA2_7B, n_devices=8, zero_stage=1, seq_len=4096, micro_batch=1)
    assert p.optimizer_bytes == 10_107_623_424                 # 12 * PSI / 8
    assert p.params_bytes == p.grads_bytes == 13_476_831_232   # 2 * PSI
    f = plan(LLAMA2_7B, n_devices=8, zero_stage=1, seq_len=4096, micro_batch=1, dtype="fp32")
    assert (f.params_bytes, f.grads_bytes, f.optimizer_bytes) == (4 * PSI, 4 * PSI, 8 * PSI // 8)


def test_shards_round_up_when_not_divisible():
    tiny = get_preset("tiny")
    n = plan(tiny, n_devices=1, zero_stage=0, seq_len=8, micro_batch=1).n_params
    assert n % 3 != 0
    p = plan(tiny, n_devices=3, zero_stage=3, seq_len=8, micro_batch=1)
    assert p.params_bytes == 2 * (n // 3 + 1) and p.optimizer_bytes == 12 * (n // 3 + 1)


def test_activation_bytes_7b_by_hand():
    s, b, h, a, L, V, F = 4096, 1, 4096, 32, 32, 32000, 11008
    # per layer, 2-byte activations: sbh(12 + 4 kv/h + 8 F/h) + 2 a s^2 b  (kv = h for MHA)
    linear = s * b * h * (12 + 4 + 8 * F / h)
    scores = 2 * a * s * s * b
    output = 2 * 2 * s * b * h + 8 * s * b * V
    by_mode = {m: activation_bytes(LLAMA2_7B, seq_len=s, micro_batch=b, recompute=m) for m in ("none", "selective", "full")}
    assert by_mode["none"] == L * (linear + scores) + output
    assert by_mode["selective"] == L * linear + scores + output
    assert by_mode["full"] == L * 2 * s * b * h + (linear + scores) + output
    # fp32 activations double every per-layer term, the fp32 logits stay as they are
    fp32 = activation_bytes(LLAMA2_7B, seq_len=s, micro_batch=b, recompute="none", act_bytes=4)
    assert fp32 == 2 * L * (linear + scores) + 4 * 2 * s * b * h + 8 * s * b * V
    # GQA shrinks only the K/V term: llama2-70b-like K=8 of H=64
    gqa = get_preset("tiny").replace(n_heads=4, n_kv_heads=1)
    mha = gqa.replace(n_kv_heads=4)
    diff = activation_bytes(mha, seq_len=8, micro_batch=1) - activation_bytes(gqa, seq_len=8, micro_batch=1)
    assert diff == gqa.n_layers * 2 * 2 * 8 * (4 - 1) * gqa.head_dim


def test_activation_formula_is_close_to_the_real_model():
    """Bytes the real model saves for backward vs the formula (loose: implementation details).

    CPU SDPA is a fused kernel (no s^2 probabilities), so compare with the "selective" figure;
    the reference RMSNorm also keeps an fp32 copy of its input that a fused norm does not.
    """
    cfg = get_preset("tiny").replace(n_layers=4)
    params = optree.tree_map(lambda t: t.detach().requires_grad_(), model.init(fr.key(0), cfg, dtype=torch.bfloat16))
    param_storage = {t.untyped_storage().data_ptr() for t in optree.tree_leaves(params)}
    B, T = 2, 64
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storage:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(params, {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(B, T)}, cfg)
    formula = activation_bytes(cfg, seq_len=T, micro_batch=B, recompute="selective")
    assert 0.85 < sum(saved.values()) / formula < 1.3


def test_flops_and_time_for_the_seed_shape():
    # The seed: seq 512, global batch 256 on 8 devices with micro-batch 1 -> 32 accumulation steps.
    p = plan(LLAMA2_7B, n_devices=8, zero_stage=1, seq_len=512, micro_batch=1, grad_accum=32, recompute="full")
    assert p.global_batch == 256
    assert p.flops_per_token == flops_per_token(LLAMA2_7B, 512, recompute="full")
    assert p.flops_per_step_per_device == p.flops_per_token * 512 * 32
    assert p.seconds_per_step(147.4) == pytest.approx(p.flops_per_token * 512 * 32 / 147.4e12)
    assert 5.0 < p.seconds_per_step(147.4) < 7.0          # the seed measured 6.66 s/step


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_devices=0), r"--devices 0: expected an integer >= 1"),
    (dict(zero_stage=4), r"--zero-stage 4: expected 0, 1, 2 or 3"),
    (dict(dtype="fp8"), r"dtype 'fp8'"),
    (dict(recompute="some"), r"--recompute 'some'"),
    (dict(seq_len=0), r"--seq-length 0"),
])
def test_plan_rejects_bad_arguments(kwargs, message):
    args = dict(n_devices=8, zero_stage=1, seq_len=16, micro_batch=1) | kwargs
    with pytest.raises(ConfigError, match=message):
        plan(get_preset("tiny"), **args)


def test_cli_prints_the_7b_plan(capsys):
    argv = ["plan", "--model", "llama2-7b", "--devices", "8", "--zero-stage", "1", "--seq-length", "4096",
            "--micro-batch-size", "1", "--recompute", "full", "--tflops", "147.4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters | 8 devices | ZeRO stage 1 | bf16 | recompute full" in out
    assert "10,107,623,424" in out and "13,476,831,232" in out
    assert "time per step at 147.4 TFLOP/s per device:" in out
    assert "global batch 8 (32,768 tokens/step)" in out


def test_cli_accepts_hf_config_and_global_batch(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(to_hf(get_preset("tiny"))))
    assert main(["plan", "--model", str(tmp_path), "--devices", "2", "--seq-length", "64",
                 "--global-batch-size", "8", "--micro-batch-size", "2", "--fp32"]) == 0
    out = capsys.readouterr().out
    assert "x grad-accum 2 x 2 devices = global batch 8" in out and "| fp32 |" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama9", "--seq-length", "8"],
     "unknown model preset 'llama9'; known presets: tiny, small, llama2-7b"),
    (["--model", "tiny", "--seq-length", "8", "--zero-stage", "5"], "--zero-stage 5: expected 0, 1, 2 or 3"),
    (["--model", "tiny", "--seq-length", "8", "--devices", "3", "--global-batch-size", "4"],
     "--global-batch-size 4 is not divisible by --micro-batch-size 1 x --devices 3 = 3"),
    (["--model", "tiny"], "the following arguments are required: --seq-length"),
    (["--model", "tiny", "--seq-length", "8", "--fp16", "--fp32"], "not allowed with argument --fp16"),
    (["--model", "tiny", "--seq-length", "8", "--tflops", "-1"], "--tflops -1.0: expected a positive number"),
    (["--model", "tiny", "--seq-length", "8", "--devices", "two"], "--devices: invalid int value: 'two'"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fnllama plan: error:") and message in lines[0], captured.err
    assert captured.out == ""


def test_cli_error_in_a_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fnllama.cli", "plan", "--model", "llama9", "--seq-length", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fnllama plan: error: unknown model preset 'llama9'; known presets: "
        "tiny, small, llama2-7b, llama2-13b, llama2-70b, llama3-8b"]
