"""Size a run before allocating it: per-device memory and FLOPs per step.

    fnllama plan --model llama2-7b --devices 8 --zero-stage 1 --seq-length 4096 \\
        --micro-batch-size 1 [--global-batch-size 256] [--recompute full] [--tflops 147.4]

Model states follow the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", sec. 3.1 and 5): mixed-precision Adam keeps 2Ψ
bytes of bf16/fp16 parameters, 2Ψ of gradients and KΨ of optimizer state, K = 12 (fp32 master
weights, momentum and variance). Over N data-parallel devices, per device:

    stage 0: 2Ψ + 2Ψ + KΨ          stage 2: 2Ψ + (2 + K)Ψ / N
    stage 1: 2Ψ + 2Ψ + KΨ / N      stage 3: (2 + 2 + K)Ψ / N

A pure fp32 run keeps 4Ψ parameters, 4Ψ gradients and K = 8 (momentum, variance; the
parameters are their own master copy). Shards are rounded up to whole elements, as the flat
ZeRO buffers are padded to a multiple of N.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

from fnllama.cli import VerbParser
from fnllama.config import PRESETS, ModelConfig, from_hf, get_preset, num_params
from fnllama.errors import ConfigError
from fnllama.metrics import RECOMPUTE_MODES, flops_per_token

DTYPES = ("bf16", "fp16", "fp32")


def activation_bytes(cfg: ModelConfig, *, seq_len: int, micro_batch: int, recompute: str = "none",
                     act_bytes: int = 2) -> int:
    """Bytes of activations saved for the backward pass of one micro-batch on one device.

    Adapts Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", sec. 4.1), whose GPT layer stores sbh(34 + 5as/h) bytes: 11sbh + 5as²b for
    attention, 19sbh for the MLP, 4sbh for the two layer norms (s sequence, b micro-batch,
    h hidden, a heads; 2-byte activations, 1-byte dropout masks). fnllama's LLaMA has no
    dropout (drop the masks and dropout outputs: 2sbh + 3as²b), GQA K/V of width kv = K*Dh,
    and a SwiGLU MLP of width F. Saved tensors per layer, in elements:

        RMSNorm inputs (2)                          2sbh
        Q/K/V projection input, Q, out-proj input   3sbh
        K, V                                        2sb*kv
        softmax probabilities (a per head)          a s² b
        gate/up input                               sbh
        gate out, up out, silu(gate), down input    4sbF

    i.e. sbh(12 + 4kv/h + 8F/h) + 2as²b bytes at 2 bytes each (LLaMA2-7B: 37.5sbh + 2as²b
    against the paper's 34sbh + 5as²b). Recompute (the paper's sec. 5):
      - "selective" drops the a s² b term, except for the one layer being recomputed;
      - "full" keeps each layer's input (sbh elements), plus one layer's full set while that
        layer is recomputed in the backward.
    Fused attention kernels (flash / npu_fusion_attention) never store the s² term, so they
    sit at the "selective" figure even without recompute. The output layer adds the final
    norm and lm_head inputs (2sbh) and the fp32 logits and their log-softmax (8sbV bytes),
    for every mode.
    """
    s, b, h, a = seq_len, micro_batch, cfg.dim, cfg.n_heads
    kv, ffn = cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    linear = 6 * s * b * h + 2 * s * b * kv + 4 * s * b * ffn      # elements, every term but s²
    scores = a * s * s * b
    one_layer = act_bytes * (linear + scores)
    layers = {
        "none": cfg.n_layers * one_layer,
        "selective": cfg.n_layers * act_bytes * linear + act_bytes * scores,
        "full": cfg.n_layers * act_bytes * s * b * h + one_layer,
    }[recompute]
    output = act_bytes * 2 * s * b * h + 8 * s * b * cfg.vocab_size
    return layers + output


@dataclass(frozen=True)
class Plan:
    """Per-device memory (bytes) and compute of one training configuration."""

    cfg: ModelConfig
    n_params: int
    n_devices: int
    zero_stage: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    dtype: str
    recompute: str
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int                                  # for `recompute`
    activations_by_recompute: dict[str, int] = field(compare=False)
    flops_per_token: float                                 # Megatron count, with `recompute`

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.n_devices

    @property
    def flops_per_step_per_device(self) -> float:
        return self.flops_per_token * self.seq_len * self.micro_batch * self.grad_accum

    def seconds_per_step(self, tflops_per_device: float) -> float:
        """Expected step time when every device sustains `tflops_per_device` (Megatron-counted)."""
        return self.flops_per_step_per_device / (tflops_per_device * 1e12)


def _check(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} {value!r}: expected an integer >= {minimum}")


def plan(cfg: ModelConfig, *, n_devices: int, zero_stage: int, seq_len: int, micro_batch: int,
         dtype: str = "bf16", recompute: str = "none", grad_accum: int = 1) -> Plan:
    """Memory per device (ZeRO paper formulas, see the module docstring) and FLOPs per step."""
    _check("--devices", n_devices, 1)
    _check("--seq-length", seq_len, 1)
    _check("--micro-batch-size", micro_batch, 1)
    _check("grad_accum", grad_accum, 1)
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero-stage {zero_stage!r}: expected 0, 1, 2 or 3")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"--recompute {recompute!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    n = num_params(cfg)
    weight_bytes, k = (4, 8) if dtype == "fp32" else (2, 12)
    shard = math.ceil(n / n_devices)                            # elements per device when sharded
    acts = {mode: activation_bytes(cfg, seq_len=seq_len, micro_batch=micro_batch, recompute=mode,
                                   act_bytes=weight_bytes) for mode in RECOMPUTE_MODES}
    return Plan(
        cfg=cfg, n_params=n, n_devices=n_devices, zero_stage=zero_stage, seq_len=seq_len,
        micro_batch=micro_batch, grad_accum=grad_accum, dtype=dtype, recompute=recompute,
        params_bytes=weight_bytes * (shard if zero_stage >= 3 else n),
        grads_bytes=weight_bytes * (shard if zero_stage >= 2 else n),
        optimizer_bytes=k * (shard if zero_stage >= 1 else n),
        activation_bytes=acts[recompute], activations_by_recompute=acts,
        flops_per_token=flops_per_token(cfg, seq_len, recompute=recompute),
    )


# ---------------------------------------------------------------- report

def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:9.2f} GiB"


def format_plan(p: Plan, *, name: str = "model", tflops: float | None = None) -> str:
    """A readable table of the plan."""
    opt_note = ("fp32 m, v" if p.dtype == "fp32" else "fp32 master, m, v")
    rows = [
        f"{name}: {p.n_params:,} parameters | {p.n_devices} devices | ZeRO stage {p.zero_stage} | "
        f"{p.dtype} | recompute {p.recompute}",
        f"batch: seq {p.seq_len} x micro-batch {p.micro_batch} x grad-accum {p.grad_accum} x "
        f"{p.n_devices} devices = global batch {p.global_batch} ({p.global_batch * p.seq_len:,} tokens/step)",
        "",
        "per-device memory" + " " * 32 + "bytes",
        f"  parameters ({p.dtype}{', /N' if p.zero_stage >= 3 else ''}) ".ljust(38)
        + f"{p.params_bytes:>18,} {_gib(p.params_bytes)}",
        f"  gradients ({p.dtype}{', /N' if p.zero_stage >= 2 else ''}) ".ljust(38)
        + f"{p.grads_bytes:>18,} {_gib(p.grads_bytes)}",
        f"  optimizer ({opt_note}{', /N' if p.zero_stage >= 1 else ''}) ".ljust(38)
        + f"{p.optimizer_bytes:>18,} {_gib(p.optimizer_bytes)}",
        f"  activations ({p.recompute}) ".ljust(38) + f"{p.activation_bytes:>18,} {_gib(p.activation_bytes)}",
        "  total".ljust(38) + f"{p.total_bytes:>18,} {_gib(p.total_bytes)}",
        "  activations by recompute: " + " | ".join(
            f"{mode} {v / 2**30:.2f} GiB" for mode, v in p.activations_by_recompute.items()),
        "",
        f"FLOPs per token {p.flops_per_token:.4g} (Megatron count, recompute {p.recompute}); "
        f"per step per device {p.flops_per_step_per_device:.4g}",
    ]
    if tflops is not None:
        rows.append(f"time per step at {tflops:g} TFLOP/s per device: {p.seconds_per_step(tflops):.2f} s")
    return "\n".join(rows)


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = VerbParser(prog="fnllama plan", description="Per-device memory and FLOPs/step of a training run.")
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PRESETS)}) or an HF model directory / config.json")
    p.add_argument("--devices", type=int, default=1, help="data-parallel devices N")
    p.add_argument("--zero-stage", type=int, default=0, help="0, 1, 2 or 3")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch x devices (no gradient accumulation)")
    p.add_argument("--recompute", default="none", help=f"one of {', '.join(RECOMPUTE_MODES)}")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="dtype", action="store_const", const="bf16")
    precision.add_argument("--fp16", dest="dtype", action="store_const", const="fp16")
    precision.add_argument("--fp32", dest="dtype", action="store_const", const="fp32")
    p.add_argument("--tflops", type=float, default=None, help="sustained TFLOP/s per device, for the step time")
    p.set_defaults(dtype="bf16")
    return p


def _model(spec: str) -> ModelConfig:
    if os.path.exists(spec):
        return from_hf(spec)
    return get_preset(spec)                 # ConfigError listing the presets when unknown


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    cfg = _model(args.model)
    _check("--devices", args.devices, 1)
    _check("--micro-batch-size", args.micro_batch_size, 1)
    per_pass = args.micro_batch_size * args.devices
    global_batch = args.global_batch_size or per_pass
    if global_batch % per_pass:
        raise ConfigError(f"--global-batch-size {global_batch} is not divisible by --micro-batch-size "
                          f"{args.micro_batch_size} x --devices {args.devices} = {per_pass}")
    if args.tflops is not None and not args.tflops > 0:
        raise ConfigError(f"--tflops {args.tflops}: expected a positive number")
    p = plan(cfg, n_devices=args.devices, zero_stage=args.zero_stage, seq_len=args.seq_length,
             micro_batch=args.micro_batch_size, dtype=args.dtype, recompute=args.recompute,
             grad_accum=global_batch // per_pass)
    print(format_plan(p, name=args.model, tflops=args.tflops))
    if args.seq_length > cfg.max_seq_len:
        print(f"note: --seq-length {args.seq_length} exceeds the model's max_seq_len {cfg.max_seq_len}")
    return 0
