"""HF LLaMA checkpoints in and out of the fnllama param tree.

`load_hf(model_dir)` reads an HF LLaMA directory: `config.json` (via `fnllama.config.from_hf`)
and the weights in any layout transformers writes or has written:

    model.safetensors                                    one safetensors file
    model.safetensors.index.json + model-0000X-of-0000N.safetensors
    pytorch_model.bin                                    one torch.save'd state dict
    pytorch_model.bin.index.json + pytorch_model-0000X-of-0000N.bin

It first reads only the headers of every shard (safetensors headers; `.bin` files opened
with `mmap=True`, so no tensor data is read) and checks names and shapes against the
config, so a wrong checkpoint fails in seconds with one error listing every problem. Then
it loads one shard at a time, converts each tensor to the requested dtype/device and drops
the shard before opening the next: peak memory is the param tree plus one shard (often
less: both formats are memory-mapped and copied a tensor at a time, so only the pages of
the shard being read are resident).

`save_hf(params, cfg, out_dir)` writes `config.json` (via `fnllama.config.to_hf`) and
`model.safetensors`, or `model-0000X-of-0000N.safetensors` + `model.safetensors.index.json`
when the weights exceed `max_shard_bytes`. Everything is written into a temporary directory
beside `out_dir` and renamed into place at the end, so a failure never leaves a partial
checkpoint under the final name.

Name mapping (HF name -> fnllama tree path; linear weights are [out, in] in both):

    model.embed_tokens.weight                         embed                 [V, D]
    model.layers.{i}.input_layernorm.weight           layers[i].attn_norm   [D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  layers[i].attn.{wq,wk,wv,wo}
    model.layers.{i}.post_attention_layernorm.weight  layers[i].mlp_norm    [D]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   layers[i].mlp.{w_gate,w_up,w_down}
    model.norm.weight                                 final_norm            [D]
    lm_head.weight                                    lm_head               [V, D] (untied only)

RoPE convention: no permutation happens here. fnllama's RoPE rotates the two *halves* of each
head (`rotate_half`, pairing dim j with j + Dh/2), exactly as transformers' LLaMA does, so HF
q/k projection weights are used as stored. Meta's original `consolidated.*.pth` checkpoints
use the *interleaved* convention (pairing dims 2j and 2j+1); transformers'
`convert_llama_weights_to_hf.py` permutes the rows of wq/wk to turn one into the other.
fnllama reads HF-format directories only: convert Meta checkpoints with that script first.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fnllama.config import ModelConfig, from_hf, to_hf
from fnllama.errors import HFError
from fnllama.tree import path_str, paths_and_leaves

Shape = tuple[int, ...]
TreePath = tuple[Any, ...]          # e.g. ("layers", 0, "attn", "wq")
Params = dict[str, Any]

CONFIG_NAME = "config.json"
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

_ATTN = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
_MLP = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}


# ---------------------------------------------------------------- the name map

def hf_tensors(cfg: ModelConfig) -> dict[str, tuple[TreePath, Shape]]:
    """Every HF tensor name of `cfg`'s model, in HF's order: its fnllama tree path and shape."""
    D, F, V, Dh = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    q_rows, kv_rows = cfg.n_heads * Dh, cfg.n_kv_heads * Dh
    attn_shapes = {"q_proj": (q_rows, D), "k_proj": (kv_rows, D), "v_proj": (kv_rows, D), "o_proj": (D, q_rows)}
    mlp_shapes = {"gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    names: dict[str, tuple[TreePath, Shape]] = {"model.embed_tokens.weight": (("embed",), (V, D))}
    for i in range(cfg.n_layers):
        pre, layer = f"model.layers.{i}.", ("layers", i)
        for hf, ours in _ATTN.items():
            names[f"{pre}self_attn.{hf}.weight"] = (layer + ("attn", ours), attn_shapes[hf])
        for hf, ours in _MLP.items():
            names[f"{pre}mlp.{hf}.weight"] = (layer + ("mlp", ours), mlp_shapes[hf])
        names[f"{pre}input_layernorm.weight"] = (layer + ("attn_norm",), (D,))
        names[f"{pre}post_attention_layernorm.weight"] = (layer + ("mlp_norm",), (D,))
    names["model.norm.weight"] = (("final_norm",), (D,))
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = (("lm_head",), (V, D))
    return names


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """Tensors some checkpoints carry that fnllama recomputes or shares: skipped, not an error."""
    if name.endswith("rotary_emb.inv_freq"):           # old transformers saved the RoPE buffer
        return True
    return cfg.tie_embeddings and name == "lm_head.weight"  # tied: transformers ignores it too


def _empty_tree(cfg: ModelConfig) -> Params:
    """The param tree's skeleton, leaves None, in the order model.py documents."""
    def layer() -> Params:
        return {"attn_norm": None, "attn": dict.fromkeys(_ATTN.values()),
                "mlp_norm": None, "mlp": dict.fromkeys(_MLP.values())}

    tree: Params = {"embed": None, "layers": [layer() for _ in range(cfg.n_layers)], "final_norm": None}
    if not cfg.tie_embeddings:
        tree["lm_head"] = None
    return tree


def _set(tree: Params, path: TreePath, value: torch.Tensor) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


# ---------------------------------------------------------------- reading weights

def find_weight_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF directory, in transformers' order of preference."""
    if (model_dir / SAFE_SINGLE).is_file():
        return [model_dir / SAFE_SINGLE]
    if (model_dir / SAFE_INDEX).is_file():
        return _shards_from_index(model_dir / SAFE_INDEX)
    if (model_dir / BIN_SINGLE).is_file():
        return [model_dir / BIN_SINGLE]
    if (model_dir / BIN_INDEX).is_file():
        return _shards_from_index(model_dir / BIN_INDEX)
    raise HFError(
        f"{model_dir}: no weights found; expected {SAFE_SINGLE}, {SAFE_INDEX} (+ shards), "
        f"{BIN_SINGLE} or {BIN_INDEX} (+ shards)"
    )


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFError(f"{index_path}: not an HF index file with a 'weight_map' ({e!r})") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index_path.parent / f).is_file()]
    if missing:
        raise HFError(f"{index_path}: shard file(s) named by the index are missing: {', '.join(missing)}")
    return [index_path.parent / f for f in files]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, memory-mapped (tensor data is read on first touch)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zipfile" not in str(e):
                raise
            # Pre-1.6 legacy format cannot be mmap'd: read this one shard into memory.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise HFError(f"{path}: cannot read as a PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise HFError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise HFError(f"{path}: expected a dict of tensors; these entries are not tensors: {not_tensors}")
    return state


def _read_shapes(path: Path) -> dict[str, Shape]:
    """Tensor names and shapes of one weight file, without reading tensor data."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise HFError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from None
    return {k: tuple(v.shape) for k, v in _torch_load(path).items()}


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of one file; tensors are views of the mapped file."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:   # get_tensor maps the file, it does not copy
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = _torch_load(path)
        for name in list(state):
            yield name, state.pop(name)


def _check_tensors(found: dict[str, tuple[Path, Shape]], cfg: ModelConfig, model_dir: Path) -> None:
    """One HFError for all missing/unexpected names, then one for all shape mismatches."""
    expected = hf_tensors(cfg)
    present = {n for n in found if not _ignored(n, cfg)}
    missing = [n for n in expected if n not in present]
    unexpected = sorted(present - expected.keys())
    if missing or unexpected:
        raise HFError(
            f"{model_dir}: weights do not match config.json ({cfg.n_layers} layers, "
            f"tie_word_embeddings={cfg.tie_embeddings}): missing tensors {missing}; unexpected tensors {unexpected}"
        )
    bad = [
        f"{name} (in {found[name][0].name}): expected shape {list(shape)}, found {list(found[name][1])}"
        for name, (_, shape) in expected.items()
        if found[name][1] != shape
    ]
    if bad:
        raise HFError(f"{model_dir}: tensor shapes do not match config.json: " + "; ".join(bad))


def load_hf(
    model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[ModelConfig, Params]:
    """Read an HF LLaMA directory into (config, param tree) in `dtype` on `device`.

    Raises:
        ConfigError: config.json is missing or describes an unsupported model.
        HFError: no weights, a missing shard, or tensor names/shapes that do not fit the config.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise HFError(f"{model_dir}: not a directory; expected an HF LLaMA model directory")
    cfg = from_hf(model_dir / CONFIG_NAME)
    files = find_weight_files(model_dir)
    found: dict[str, tuple[Path, Shape]] = {}
    for path in files:
        for name, shape in _read_shapes(path).items():
            if name in found:
                raise HFError(f"{model_dir}: tensor {name} appears in both {found[name][0].name} and {path.name}")
            found[name] = (path, shape)
    _check_tensors(found, cfg, model_dir)

    expected = hf_tensors(cfg)
    params = _empty_tree(cfg)
    for path in files:  # one shard at a time; its tensors are dropped before the next opens
        for name, tensor in _read_tensors(path):
            if name in expected:
                # Always copy: a tensor already in `dtype` would otherwise stay a view of the file.
                converted = tensor.to(device=device, dtype=dtype, copy=True).contiguous()
                _set(params, expected[name][0], converted)
            del tensor
    return cfg, params


# ---------------------------------------------------------------- writing weights

def _hf_state(params: Params, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """{HF name: tensor} for `params`, checked against `cfg` (no copies)."""
    by_path = {path_str(path): (name, shape) for name, (path, shape) in hf_tensors(cfg).items()}
    leaves = dict(paths_and_leaves(params))
    missing = sorted(by_path.keys() - leaves.keys())
    unexpected = sorted(leaves.keys() - by_path.keys())
    if missing or unexpected:
        raise HFError(f"params do not match the config: missing {missing}; unexpected {unexpected}")
    bad = [f"{p}: expected shape {list(s)}, found {list(leaves[p].shape)}"
           for p, (_, s) in by_path.items() if tuple(leaves[p].shape) != s]
    if bad:
        raise HFError("param shapes do not match the config: " + "; ".join(bad))
    return {name: leaves[path] for path, (name, _) in by_path.items()}


def _plan_shards(state: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in HF order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _owned_cpu(tensor: torch.Tensor, dtype: torch.dtype, seen: set[int]) -> torch.Tensor:
    """A CPU tensor in `dtype` with storage of its own (safetensors refuses shared storage)."""
    out = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    if out.untyped_storage().nbytes() != out.numel() * out.element_size() or out.data_ptr() in seen:
        out = out.clone()   # a view into a flat buffer, or the same tensor twice
    seen.add(out.data_ptr())
    return out


def _write_weights(tmp: Path, state: dict[str, torch.Tensor], shards: list[list[str]], dtype: torch.dtype) -> None:
    """The safetensors shard(s) and, when more than one, their index, written into `tmp`."""
    n = len(shards)
    mode = (tmp / CONFIG_NAME).stat().st_mode & 0o777   # safetensors creates 0600 files; use the umask's
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        fname = SAFE_SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        seen: set[int] = set()
        shard = {name: _owned_cpu(state[name], dtype, seen) for name in names}
        save_file(shard, tmp / fname, metadata={"format": "pt"})
        os.chmod(tmp / fname, mode)
        del shard   # one shard of converted tensors in memory at a time
        weight_map.update(dict.fromkeys(names, fname))
    if n > 1:
        total = sum(t.numel() for t in state.values()) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` is swapped out and removed after."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def save_hf(
    params: Params,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write `params` as an HF LLaMA directory that `LlamaForCausalLM.from_pretrained` loads.

    Args:
        params: the fnllama param tree (any device; views into a flat buffer are fine).
        cfg: its config; written as config.json.
        out_dir: the directory to create. It appears complete or not at all.
        dtype: the stored dtype (default: that of `params["embed"]`).
        max_shard_bytes: above this, weights are split into shards plus an index.
        overwrite: replace an existing non-empty `out_dir` (else HFError).

    Returns:
        `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    if max_shard_bytes <= 0:
        raise HFError(f"max_shard_bytes={max_shard_bytes}: expected a positive number of bytes")
    state = _hf_state(params, cfg)
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    if not dtype.is_floating_point:
        raise HFError(f"dtype={dtype}: expected a floating-point dtype (float32, bfloat16, float16)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise HFError(f"{out_dir}: already exists and is not empty; pass overwrite=True to replace it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        config = to_hf(cfg, torch_dtype=str(dtype).removeprefix("torch."))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        _write_weights(tmp, state, _plan_shards(state, dtype, max_shard_bytes), dtype)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def to_transformers(params: Params, cfg: ModelConfig):
    """An in-memory `transformers.LlamaForCausalLM` (fp32, SDPA attention) holding copies of `params`.

    For side-by-side comparisons and benchmarks; `save_hf` is the way to hand weights to other tools.
    """
    import transformers

    hf_cfg = transformers.LlamaConfig(**to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    weights = {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in _hf_state(params, cfg).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise HFError(f"to_transformers: missing {missing}, unexpected {unexpected}")
    return model
