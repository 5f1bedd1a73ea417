"""Op dispatch: one door for RMSNorm, RoPE, SwiGLU and attention.

Each op has a reference PyTorch version (used on CPU and CUDA; attention is SDPA) and, for
tensors on an Ascend NPU with torch_npu importable, the fused torch_npu kernel:

=========== ==================================== =========================================
op          reference                            NPU (torch_npu)
=========== ==================================== =========================================
rms_norm    fp32 mean-square, cast, * weight     ``npu_rms_norm(x, gamma, epsilon)[0]``
rotary      x*cos + rotate_half(x)*sin           ``npu_rotary_mul(x, cos, sin)``
swiglu      silu(gate) * up                      ``npu_swiglu(cat([gate, up], -1), dim=-1)``
attention   ``F.scaled_dot_product_attention``   ``npu_fusion_attention(q, k, v, H, "BSND")``
=========== ==================================== =========================================

All ops take the model's layout: activations `[B, T, H, Dh]` for q/k/v (BSND, which is what
npu_fusion_attention and npu_rotary_mul expect), `[B, T, D]` elsewhere.

`_npu_module()` and `_on_npu(x)` are the only places that look at the backend; tests replace
them with a test double (torch_npu is not installed on CPU machines).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F

from fnllama import device


def _npu_module() -> ModuleType | None:
    return device.torch_npu()


def _on_npu(x: torch.Tensor) -> bool:
    return x.device.type == "npu"


def _npu_for(x: torch.Tensor) -> ModuleType | None:
    """The torch_npu module when `x` should use fused NPU kernels, else None."""
    return _npu_module() if _on_npu(x) else None


# ------------------------------------------------------------------ RMSNorm

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / rms(x)` with the mean-square in fp32 and the cast back before the scale (as HF)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    npu = _npu_for(x)
    if npu is not None:
        return npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]
    return rms_norm_reference(x, weight, eps)


# ------------------------------------------------------------------ RoPE

def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[B, T, 1, Dh]` for integer `positions [B, T]` (HF's half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))                         # [Dh/2]
    angles = positions.float()[..., None] * inv_freq                          # [B, T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]              # [B, T, 1, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, T, H, Dh]` by the tables `[B, T, 1, Dh]`."""
    npu = _npu_for(x)
    if npu is not None:
        return npu.npu_rotary_mul(x, cos, sin)
    return rotary_reference(x, cos, sin)


# ------------------------------------------------------------------ SwiGLU

def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. npu_swiglu takes both halves in one tensor split on `dim`."""
    npu = _npu_for(gate)
    if npu is not None:
        return npu.npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)
    return swiglu_reference(gate, up)


# ------------------------------------------------------------------ attention

def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool `[B, 1, T, T]`, True where query t may attend key s: s <= t and same segment."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]            # [B, T, T]
    return (causal & same_doc)[:, None]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA; q `[B, T, H, Dh]`, k/v `[B, T, K, Dh]` -> `[B, T, H, Dh]`."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                         # [B, heads, T, Dh]
    gqa = q.shape[1] != k.shape[1]
    if segment_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = attention_mask(segment_ids)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)                                               # [B, T, H, Dh]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal self-attention; packed documents (distinct `segment_ids [B, T]`) do not see each other."""
    npu = _npu_for(q)
    if npu is None:
        return attention_reference(q, k, v, segment_ids)
    B, T, H, Dh = q.shape
    if segment_ids is None:
        # sparse_mode=2 (left-up causal) takes a compressed 2048x2048 upper-triangular mask.
        mask = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(diagonal=1)
        sparse_mode = 2
    else:
        mask = ~attention_mask(segment_ids)                                  # True = masked out
        sparse_mode = 0
    return npu.npu_fusion_attention(
        q, k, v, H, "BSND", atten_mask=mask, scale=1.0 / math.sqrt(Dh),
        keep_prob=1.0, sparse_mode=sparse_mode,
    )[0]
