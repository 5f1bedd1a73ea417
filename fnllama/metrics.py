"""Training throughput: FLOPs per token, per-device rates, MFU, and the metrics log.

The figures are the seed's, per device: samples/s/p, tokens/s/p, s/step and TFLOP/s, plus
MFU = achieved TFLOP/s / the device's peak dense bf16/fp16 TFLOP/s.

How the train loop uses this module (rank 0 only)::

    fpt = flops_per_token(cfg, seq_len, recompute=recompute)
    log = MetricsLogger(out_dir / "metrics.jsonl", flops_per_token=fpt, global_batch=gbs,
                        seq_len=seq_len, n_devices=world, device=device, log_interval=10,
                        total_steps=train_iters)
    timer = StepTimer(sync=device_sync)
    for it in range(1, train_iters + 1):
        state, m = train_step(state, batch)
        log.log(it, step_time_s=timer.lap(), loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"])
    log.summary()
    log.close()
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, TextIO

import torch

from fnllama import device as devices
from fnllama.config import ModelConfig
from fnllama.errors import ConfigError

RECOMPUTE_MODES = ("none", "selective", "full")

# ---------------------------------------------------------------- FLOPs per token


def _matmul_params_per_layer(cfg: ModelConfig) -> int:
    """Weights that multiply activations in one layer: wq, wk, wv, wo, w_gate, w_up, w_down."""
    D, H, K, Dh, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    return D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F


def flops_per_token(cfg: ModelConfig, seq_len: int, *, recompute: str = "none") -> float:
    """Training FLOPs per token (forward + backward [+ recompute]) of one LLaMA step.

    Follows Megatron (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
    GPU Clusters", appendix): count matrix multiplies only (a [m, k] @ [k, n] product is 2mkn
    FLOPs); norms, RoPE, softmax, SiLU and the embedding lookup are ignored. Per token, with
    T = seq_len and the glossary of `fnllama.config`:

        layer forward  = 2 * (D*H*Dh + 2*D*K*Dh + H*Dh*D + 3*D*F)   # wq, wk, wv, wo; SwiGLU
                       + 2 * 2 * T * H * Dh                          # Q @ K^T and P @ V
        head forward   = 2 * D * V                                   # lm_head logits

    The attention term uses the full T x T score matrix, as Megatron does: the causal mask
    is not halved, so TFLOP/s figures compare with Megatron/AscendSpeed logs (and the seed's).
    GQA shrinks only wk and wv: each K/V head serves H/K query heads, so the score and
    context products still run over all H heads.

    The backward pass costs two forwards (grad w.r.t. the input and w.r.t. the weight of
    every matmul; dQ, dK and dP, dV for attention), so without recompute the total is
    3 * forward. Recompute re-runs part of each layer's forward during the backward:
      - "full":      every layer's forward once more -> 4 * layer + 3 * head (Megatron's
                     96 B s l h^2 formula has this factor 4);
      - "selective": only the attention core (Q @ K^T, softmax, P @ V) -> 3 * layer +
                     4 * T * H * Dh per layer (Korthikanti et al. 2022).
    The lm_head is never recomputed. (torch's non-reentrant checkpoint stops recomputing
    early by default, skipping the region's last matmul, so it does slightly less work than
    counted here; with `set_checkpoint_early_stop(False)` torch's FLOP counter matches exactly.)

    For the tiny preset (V=256, D=64, L=2, H=4, K=2, F=176) at T=32 this is 700,416
    FLOPs per token without recompute; llama2-7b at T=4096 with full recompute, 6.12e10.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute={recompute!r}; expected one of {', '.join(RECOMPUTE_MODES)}")
    if seq_len <= 0:
        raise ConfigError(f"seq_len={seq_len}; expected a positive integer")
    attn_core = 2 * 2 * seq_len * cfg.n_heads * cfg.head_dim          # scores + context
    layer = 2 * _matmul_params_per_layer(cfg) + attn_core
    head = 2 * cfg.dim * cfg.vocab_size
    layer_passes = {"none": 3 * layer, "selective": 3 * layer + attn_core, "full": 4 * layer}
    return float(cfg.n_layers * layer_passes[recompute] + 3 * head)


# ---------------------------------------------------------------- device peaks

# Peak dense (no 2:4 sparsity) bf16/fp16 matrix TFLOP/s, keyed by a substring of the device
# name (lower case, spaces removed; the longest matching key wins).
PEAK_TFLOPS: dict[str, float] = {
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 Tensor Core 1,979 (SXM),
    # 1,671 (NVL), 1,513 (PCIe) TFLOPS "with sparsity"; dense is half.
    "h100": 989.0,
    "h100nvl": 835.0,
    "h100pcie": 756.0,
    # H800 SXM: the export H100 SXM, same tensor cores (reduced NVLink only).
    "h800": 989.0,
    # NVIDIA H200 datasheet: same GH100 compute as H100 SXM, 1,979 TFLOPS BF16 with sparsity.
    "h200": 989.0,
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16/FP16
    # Tensor Core 312 TFLOPS dense (624 with sparsity); A800 is the export A100.
    "a100": 312.0,
    "a800": 312.0,
    # NVIDIA V100 (developer.nvidia.com "Programming Tensor Cores in CUDA 9"): 125 Tensor
    # TFLOPS fp16 (SXM2); no bf16.
    "v100": 125.0,
    # Huawei Ascend 910 (A) (HotChips 2019): 32 Da Vinci cores, 256 TFLOPS fp16.
    "910a": 256.0,
    # Ascend 910B family: fp16 figures as commonly cited by vendors and resellers
    # (910B1 ~414, 910B2 ~376, 910B3 ~313, 910B4 ~280); we found no Huawei primary source,
    # so treat them as approximate and pass --peak-tflops for exact MFU. A bare "910B" falls
    # back to the 910B3 figure (the conservative common part).
    "910b": 313.0,
    "910b1": 414.0,
    "910b2": 376.0,
    "910b3": 313.0,
    "910b4": 280.0,
}


def lookup_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16/fp16 TFLOP/s of a device by name, or None when it is not in the table."""
    name = device_name.lower().replace(" ", "").replace("-", "")
    hits = [key for key in PEAK_TFLOPS if key in name]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0) -> float:
    """Measured CPU matmul TFLOP/s: the best of repeated [n, n] @ [n, n] products.

    Cached per (dtype, n, seconds), so a run measures once. It stands in for a datasheet peak
    on CPU, where MFU is then "fraction of what a plain matmul reaches on this machine".
    """
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)                                                   # warm up the kernel
    best = math.inf
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best / 1e12


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)  # type: ignore[attr-defined]  # torch_npu
    return device.type


def device_peak_tflops(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, *, override: float | None = None
) -> float | None:
    """Peak TFLOP/s for MFU: `override` if given; the table for accelerators; measured on CPU.

    The table holds bf16/fp16 tensor-core peaks, so an fp32 run on an accelerator gets None
    (no MFU) unless `override` is given.
    """
    if override is not None:
        if override <= 0:
            raise ConfigError(f"--peak-tflops {override}: expected a positive number")
        return float(override)
    device = torch.device(device)
    if device.type == "cpu":
        return measure_matmul_peak(dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return lookup_peak_tflops(_device_name(device))


# ---------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Throughput:
    """Per-device rates of a training step (the seed's columns, plus MFU)."""

    samples_per_s_per_device: float
    tokens_per_s_per_device: float
    s_per_step: float
    tflops_per_device: float
    mfu: float | None              # achieved / peak TFLOP/s; None when the peak is unknown

    def seed_line(self) -> str:
        """'4.804 samples/s/p, 2459.6 tokens/s/p, 6.66 s/step, 147.4 TFLOP/s' (+ MFU)."""
        line = (f"{self.samples_per_s_per_device:.3f} samples/s/p, {self.tokens_per_s_per_device:.1f} "
                f"tokens/s/p, {self.s_per_step:.3g} s/step, {self.tflops_per_device:.4g} TFLOP/s")
        return line if self.mfu is None else f"{line}, MFU {100 * self.mfu:.1f}%"


def throughput(
    *, s_per_step: float, global_batch: int, seq_len: int, n_devices: int,
    flops_per_token: float, peak_tflops: float | None = None,
) -> Throughput:
    """Per-device throughput of a step that trains `global_batch` sequences of `seq_len` tokens.

    Every device counts 1/n_devices of the global batch (data parallel), so with the seed's
    8 devices, global batch 256 of 512 tokens and 6.66 s/step: 256 / 6.66 / 8 = 4.804 samples/s/p.
    """
    if s_per_step <= 0:
        raise ValueError(f"s_per_step={s_per_step}: expected > 0")
    samples = global_batch / s_per_step / n_devices
    tokens = samples * seq_len
    tflops = tokens * flops_per_token / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    return Throughput(samples, tokens, s_per_step, tflops, mfu)


class StepTimer:
    """Wall time between calls to `lap()`; `sync` (e.g. torch.cuda.synchronize) runs first so
    queued device work is counted in the step that issued it."""

    def __init__(self, *, sync: Callable[[], None] | None = None):
        self._sync = sync
        self._last = time.perf_counter()

    def reset(self) -> None:
        if self._sync:
            self._sync()
        self._last = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or construction / reset)."""
        if self._sync:
            self._sync()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


# ---------------------------------------------------------------- the metrics log

_JSON_FIELDS = ("iteration", "loss", "lr", "grad_norm", "loss_scale", "skipped",
                "samples_per_s_per_device", "tokens_per_s_per_device", "s_per_step",
                "tflops_per_device", "mfu", "peak_mem_bytes")


def _scalar(value: Any) -> float | None:
    """A Python float from a float, int or 0-d tensor (None stays None)."""
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class MetricsLogger:
    """Per-step metrics: a JSONL record and a human line every `log_interval` steps, a summary.

    Call `log(iteration, step_time_s=..., loss=..., ...)` after every step. Losses may be
    device tensors: they are only read (synchronising) at a log step. A record describes the
    steps since the previous record: `loss` is their mean, `s_per_step` their mean time,
    `skipped` how many were skipped (loss-scale overflow); `lr`, `grad_norm` and `loss_scale`
    are the latest values. With log_interval=1 every step's own loss is written, which is
    what `fnllama compare` wants.

    `summary()` averages the step time over all steps after the first `warmup_steps` (default
    2: the first steps pay for kernel selection, allocator growth and lazy initialisation, and
    would understate steady-state throughput), and prints the seed's line.

    On a terminal (stdout a TTY) and with `total_steps` known, a tqdm bar replaces the lines.
    """

    def __init__(
        self, path: str | os.PathLike | None, *, flops_per_token: float, global_batch: int,
        seq_len: int, n_devices: int = 1, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16, peak_tflops: float | None = None,
        log_interval: int = 1, warmup_steps: int = 2, total_steps: int | None = None,
        stream: TextIO | None = None, progress: bool | None = None,
    ):
        if log_interval < 1:
            raise ConfigError(f"--log-interval {log_interval}: expected >= 1")
        self.flops_per_token, self.global_batch = flops_per_token, global_batch
        self.seq_len, self.n_devices, self.device = seq_len, n_devices, torch.device(device)
        self.peak_tflops = device_peak_tflops(self.device, dtype, override=peak_tflops)
        self.log_interval, self.warmup_steps, self.total_steps = log_interval, warmup_steps, total_steps
        self.stream = sys.stdout if stream is None else stream
        self._file = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a")
        self._pending: list[tuple[Any, float, int]] = []    # (loss, step time, skipped) since last record
        self._times: list[tuple[int, float]] = []           # (iteration, step time), for the summary
        use_bar = progress if progress is not None else (self.stream.isatty() and total_steps is not None)
        self._bar = self._make_bar() if use_bar else None

    def _make_bar(self):
        from tqdm import tqdm
        return tqdm(total=self.total_steps, file=self.stream, unit="step", dynamic_ncols=True)

    def throughput(self, s_per_step: float) -> Throughput:
        return throughput(s_per_step=s_per_step, global_batch=self.global_batch, seq_len=self.seq_len,
                          n_devices=self.n_devices, flops_per_token=self.flops_per_token,
                          peak_tflops=self.peak_tflops)

    def log(
        self, iteration: int, *, step_time_s: float, loss: Any, lr: Any = None, grad_norm: Any = None,
        loss_scale: Any = None, skipped: bool | int = False, peak_mem_bytes: int | None = None,
    ) -> dict[str, Any] | None:
        """Record one step; at every `log_interval`-th iteration write and return the record."""
        self._pending.append((loss, step_time_s, int(skipped)))
        self._times.append((iteration, step_time_s))
        if self._bar is not None:
            self._bar.update(1)
        if iteration % self.log_interval and iteration != self.total_steps:
            return None
        losses = [_scalar(l) for l, _, s in self._pending if not s]
        s_per_step = sum(t for _, t, _ in self._pending) / len(self._pending)
        record = {
            "iteration": iteration,
            "loss": sum(losses) / len(losses) if losses else math.nan,
            "lr": _scalar(lr), "grad_norm": _scalar(grad_norm), "loss_scale": _scalar(loss_scale),
            "skipped": sum(s for _, _, s in self._pending),
            **asdict(self.throughput(s_per_step)),
            "peak_mem_bytes": devices.peak_memory_bytes(self.device) if peak_mem_bytes is None else peak_mem_bytes,
        }
        record = {k: record[k] for k in _JSON_FIELDS}
        self._pending = []
        self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._bar is not None:
            self._bar.set_postfix_str(_short_line(record), refresh=True)
        else:
            print(_human_line(record, self.total_steps), file=self.stream, flush=True)

    def steady_state(self) -> Throughput | None:
        """Mean throughput over the steps after the warm-up (all steps if there are no more)."""
        times = [t for _, t in self._times]
        if not times:
            return None
        steady = times[self.warmup_steps:] or times
        return self.throughput(sum(steady) / len(steady))

    def summary(self) -> Throughput | None:
        """Print the seed-format summary table; return the steady-state throughput."""
        result = self.steady_state()
        if result is None:
            print("no steps were logged", file=self.stream)
            return None
        n, skip = len(self._times), min(self.warmup_steps, len(self._times) - 1)
        first, last = self._times[skip][0], self._times[-1][0]
        mfu = "n/a" if result.mfu is None else f"{100 * result.mfu:.1f}%"
        peak = "unknown" if self.peak_tflops is None else f"{self.peak_tflops:.4g}"
        rows = [
            f"throughput per device, mean over iterations {first}..{last} "
            f"({n - skip} of {n} steps; the first {skip} skipped as warm-up):",
            f"  {'samples/s/p':>12} {'tokens/s/p':>11} {'s/step':>8} {'TFLOP/s':>8} {'MFU':>6}  (peak {peak} TFLOP/s)",
            f"  {result.samples_per_s_per_device:>12.3f} {result.tokens_per_s_per_device:>11.1f} "
            f"{result.s_per_step:>8.3g} {result.tflops_per_device:>8.4g} {mfu:>6}",
            result.seed_line(),
        ]
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        print("\n".join(rows), file=self.stream, flush=True)
        return result

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _short_line(r: dict[str, Any]) -> str:
    return (f"loss {r['loss']:.4f} | {r['tokens_per_s_per_device']:.1f} tok/s/p | "
            f"{r['tflops_per_device']:.2f} TFLOP/s")


def _human_line(r: dict[str, Any], total: int | None) -> str:
    """A Megatron-style log line."""
    it = f"{r['iteration']}/{total}" if total else str(r["iteration"])
    mfu = "" if r["mfu"] is None else f" | MFU {100 * r['mfu']:.1f}%"
    return (f"iteration {it} | loss {r['loss']:.6g} | lr {_fmt(r['lr'], '.3e')} | grad norm "
            f"{_fmt(r['grad_norm'], '.3f')} | loss scale {_fmt(r['loss_scale'], 'g')} | skipped "
            f"{r['skipped']} | {r['samples_per_s_per_device']:.3f} samples/s/p | "
            f"{r['tokens_per_s_per_device']:.1f} tokens/s/p | {r['s_per_step']:.3f} s/step | "
            f"{r['tflops_per_device']:.3f} TFLOP/s{mfu} | peak mem {r['peak_mem_bytes'] / 2**20:.1f} MiB")
