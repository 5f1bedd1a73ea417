"""Model configuration: frozen dataclasses, named presets, HF config.json in and out.

Glossary (used across fnllama for shapes and names):
    B batch, T sequence, D model dim, H query heads, K key/value heads,
    Dh head dim (D // H), F MLP hidden dim, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from fnllama.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256          # V
    dim: int = 64                  # D
    n_layers: int = 2              # L
    n_heads: int = 4               # H
    n_kv_heads: int = 2            # K (== H: multi-head; < H: grouped-query)
    ffn_dim: int = 176             # F, SwiGLU hidden size
    norm_eps: float = 1e-5         # RMSNorm epsilon
    rope_theta: float = 10000.0    # RoPE base
    max_seq_len: int = 256         # longest position the RoPE tables cover
    tie_embeddings: bool = False   # lm_head shares the embedding matrix
    init_std: float = 0.02         # std of the normal init (Megatron / HF default)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name}={value!r}: expected a positive integer")
        if self.dim % self.n_heads:
            raise ConfigError(f"ModelConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig head_dim={self.head_dim} (dim / n_heads) must be even for RoPE")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ConfigError("ModelConfig.norm_eps, rope_theta and init_std must be positive")

    @property
    def head_dim(self) -> int:  # Dh
        return self.dim // self.n_heads

    def replace(self, **overrides: Any) -> "ModelConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}; known: {field_names(ModelConfig)}")
        return dataclasses.replace(self, **overrides)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


PRESETS: dict[str, ModelConfig] = {
    # CPU tests: a few hundred thousand parameters.
    "tiny": ModelConfig(),
    # CPU quickstart: ~3M parameters with a 2k vocabulary.
    "small": ModelConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688, max_seq_len=512),
    # Touvron et al. 2023, Llama 2 (table 1); HF meta-llama/Llama-2-*-hf config.json.
    "llama2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             ffn_dim=11008, max_seq_len=4096),
    "llama2-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                              ffn_dim=13824, max_seq_len=4096),
    "llama2-70b": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              ffn_dim=28672, max_seq_len=4096),
    # Meta Llama 3 8B config.json.
    "llama3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             ffn_dim=14336, rope_theta=500000.0, max_seq_len=8192),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with field overrides applied (and validated)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def num_params(cfg: ModelConfig) -> int:
    """Exact parameter count of the tree `fnllama.model.init` builds."""
    D, F, V, Dh = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    attn = D * cfg.n_heads * Dh * 2 + D * cfg.n_kv_heads * Dh * 2   # wq, wo, wk, wv
    mlp = 3 * D * F                                                  # w_gate, w_up, w_down
    layer = attn + mlp + 2 * D                                       # + two RMSNorm scales
    head = 0 if cfg.tie_embeddings else V * D
    return V * D + cfg.n_layers * layer + D + head


# ---------------------------------------------------------------- HF config.json

_HF_SUPPORTED_ACT = "silu"


def from_hf(source: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from an HF LLaMA `config.json` (a path, a model directory, or the parsed dict)."""
    where = "config dict"
    if not isinstance(source, Mapping):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        where = path
        try:
            with open(path) as f:
                source = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; expected an HF LLaMA config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    hf = dict(source)

    def need(field: str) -> Any:
        if field not in hf:
            raise ConfigError(f"{where}: missing field {field!r}")
        return hf[field]

    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{where}: model_type={model_type!r} is not supported; expected 'llama'")
    if hf.get("hidden_act", _HF_SUPPORTED_ACT) != _HF_SUPPORTED_ACT:
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported; expected 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{where}: {flag}=true is not supported; fnllama's LLaMA has no biases")
    rope = hf.get("rope_scaling") or {}
    rope_params = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or rope_params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"{where}: rope scaling type {rope_type!r} is not supported; expected none/'default'")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim != dim // n_heads:
        raise ConfigError(f"{where}: head_dim={head_dim} != hidden_size / num_attention_heads; not supported")
    return ModelConfig(
        vocab_size=need("vocab_size"),
        dim=dim,
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_dim=need("intermediate_size"),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def to_hf(cfg: ModelConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
    """The HF `LlamaConfig` dict (config.json contents) describing `cfg`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }
