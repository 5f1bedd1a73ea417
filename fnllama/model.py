"""LLaMA as pure functions over a parameter tree: `init`, `forward`, `loss`.

Shapes: B batch, T sequence, D model dim, H query heads, K key/value heads, Dh head dim,
F MLP hidden, V vocabulary, L layers.

The parameter tree (a nested dict of tensors; linear weights are `[out, in]` as in
`torch.nn.functional.linear` and as HF stores them, so HF weights import without a copy):

    params = {
      "embed":      [V, D]                 token embedding
      "layers": [                          a list of L dicts
        {
          "attn_norm": [D]                 RMSNorm scale before attention
          "attn": {"wq": [H*Dh, D], "wk": [K*Dh, D], "wv": [K*Dh, D], "wo": [D, H*Dh]},
          "mlp_norm":  [D]                 RMSNorm scale before the MLP
          "mlp":  {"w_gate": [F, D], "w_up": [F, D], "w_down": [D, F]},
        }, ...],
      "final_norm": [D]
      "lm_head":    [V, D]                 absent when cfg.tie_embeddings (the embedding is reused)
    }

RoPE uses HF's half-split ("rotate_half") layout of each head's dims.

Init follows Megatron-LM: every matrix is normal(0, init_std); the two projections that write
into the residual stream (`wo`, `w_down`) use std / sqrt(2 L) (Megatron's
`scaled_init_method_normal`, GPT-2's residual scaling); norm scales are ones. Each leaf draws
from its own key, so init is the same on any device and world size.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fnllama import kernels
from fnllama import random as fr
from fnllama.config import ModelConfig

Params = dict[str, Any]
Recompute = Literal["none", "full", "selective"]
RECOMPUTE_MODES = ("none", "full", "selective")


# ------------------------------------------------------------------ init

def _normal(key: fr.Key, shape: tuple[int, ...], std: float, dtype: torch.dtype, device) -> torch.Tensor:
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    return fr.normal(key, shape, dtype=dtype, device=device, std=std)


def _ones(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    return torch.ones(shape, dtype=dtype, device=device)


def init_layer(key: fr.Key, cfg: ModelConfig, *, dtype: torch.dtype, device) -> Params:
    D, F_, H, K, Dh = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    kq, kk, kv, ko, kg, ku, kd = fr.split(key, 7)
    return {
        "attn_norm": _ones((D,), dtype, device),
        "attn": {
            "wq": _normal(kq, (H * Dh, D), std, dtype, device),
            "wk": _normal(kk, (K * Dh, D), std, dtype, device),
            "wv": _normal(kv, (K * Dh, D), std, dtype, device),
            "wo": _normal(ko, (D, H * Dh), out_std, dtype, device),
        },
        "mlp_norm": _ones((D,), dtype, device),
        "mlp": {
            "w_gate": _normal(kg, (F_, D), std, dtype, device),
            "w_up": _normal(ku, (F_, D), std, dtype, device),
            "w_down": _normal(kd, (D, F_), out_std, dtype, device),
        },
    }


def init(key: fr.Key, cfg: ModelConfig, *, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> Params:
    """A fresh parameter tree. `device="meta"` gives shapes only, instantly (7B included)."""
    k_embed, k_layers, k_head = fr.split(key, 3)
    layer_keys = fr.split(k_layers, cfg.n_layers)
    params: Params = {
        "embed": _normal(k_embed, (cfg.vocab_size, cfg.dim), cfg.init_std, dtype, device),
        "layers": [init_layer(layer_keys[i], cfg, dtype=dtype, device=device) for i in range(cfg.n_layers)],
        "final_norm": _ones((cfg.dim,), dtype, device),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = _normal(k_head, (cfg.vocab_size, cfg.dim), cfg.init_std, dtype, device)
    return params


# ------------------------------------------------------------------ forward

def attention_block(p: Params, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    segment_ids: torch.Tensor | None, cfg: ModelConfig, recompute: Recompute) -> torch.Tensor:
    """Pre-norm attention sublayer; returns the residual update `[B, T, D]`."""
    B, T, _ = x.shape
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = kernels.rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = F.linear(h, p["attn"]["wq"]).view(B, T, H, Dh)                       # [B, T, H, Dh]
    k = F.linear(h, p["attn"]["wk"]).view(B, T, K, Dh)                       # [B, T, K, Dh]
    v = F.linear(h, p["attn"]["wv"]).view(B, T, K, Dh)                       # [B, T, K, Dh]
    q, k = kernels.rotary(q, cos, sin), kernels.rotary(k, cos, sin)
    if recompute == "selective":   # keep q/k/v, recompute the attention core in backward
        out = checkpoint(kernels.attention, q, k, v, segment_ids, use_reentrant=False)
    else:
        out = kernels.attention(q, k, v, segment_ids)                        # [B, T, H, Dh]
    return F.linear(out.reshape(B, T, H * Dh), p["attn"]["wo"])              # [B, T, D]


def mlp_block(p: Params, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Pre-norm SwiGLU MLP sublayer; returns the residual update `[B, T, D]`."""
    h = kernels.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    gate, up = F.linear(h, p["mlp"]["w_gate"]), F.linear(h, p["mlp"]["w_up"])   # [B, T, F]
    return F.linear(kernels.swiglu(gate, up), p["mlp"]["w_down"])               # [B, T, D]


def layer(p: Params, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          segment_ids: torch.Tensor | None, cfg: ModelConfig, recompute: Recompute = "none") -> torch.Tensor:
    x = x + attention_block(p, x, cos, sin, segment_ids, cfg, recompute)
    return x + mlp_block(p, x, cfg)


def forward(params: Params, tokens: torch.Tensor, cfg: ModelConfig, *,
            positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
            recompute: Recompute = "none") -> torch.Tensor:
    """Logits `[B, T, V]` for `tokens [B, T]`, in the dtype of the params.

    Args:
      positions: `[B, T]` RoPE positions (default 0..T-1); packed documents restart at 0.
      segment_ids: `[B, T]` document ids; tokens attend only within their own segment.
      recompute: "none"; "full" recomputes each layer in backward (stores only layer inputs);
        "selective" recomputes just the attention core (softmax(QK^T)V), as Megatron.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}; expected one of {RECOMPUTE_MODES}")
    B, T = tokens.shape
    if positions is None:
        positions = torch.arange(T, device=tokens.device).expand(B, T)
    x = F.embedding(tokens, params["embed"])                                  # [B, T, D]
    cos, sin = kernels.rope_tables(positions, cfg.head_dim, cfg.rope_theta, x.dtype)  # [B, T, 1, Dh]
    for p in params["layers"]:
        if recompute == "full":
            x = checkpoint(layer, p, x, cos, sin, segment_ids, cfg, use_reentrant=False)
        else:
            x = layer(p, x, cos, sin, segment_ids, cfg, recompute)
    x = kernels.rms_norm(x, params["final_norm"], cfg.norm_eps)
    head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return F.linear(x, head)                                                  # [B, T, V]


# ------------------------------------------------------------------ loss

def loss(params: Params, batch: dict[str, torch.Tensor], cfg: ModelConfig, *,
         recompute: Recompute = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy, averaged over tokens where `loss_mask` is 1.

    `batch` holds `tokens [B, T]`, `labels [B, T]` (the token that follows each position),
    and optionally `loss_mask [B, T]`, `positions`, `segment_ids`.
    Returns `(mean_loss, num_tokens)`, both 0-d fp32 tensors; the softmax runs in fp32.
    """
    logits = forward(params, batch["tokens"], cfg, positions=batch.get("positions"),
                     segment_ids=batch.get("segment_ids"), recompute=recompute)
    V = logits.shape[-1]
    nll = F.cross_entropy(logits.float().reshape(-1, V), batch["labels"].reshape(-1), reduction="none")
    mask = batch.get("loss_mask")
    mask = torch.ones_like(nll) if mask is None else mask.reshape(-1).float()
    num_tokens = mask.sum()
    return (nll * mask).sum() / num_tokens.clamp(min=1.0), num_tokens
