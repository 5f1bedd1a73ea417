"""fnllama.hf against real transformers checkpoints of a random tiny LlamaForCausalLM.

Fixtures save each model variant in all four HF weight layouts. transformers 5.x only writes
safetensors, so the `.bin` layouts are written here with `torch.save`, sharded by
huggingface_hub's `split_torch_state_dict_into_shards` (what transformers 4.x used); a test
checks transformers itself still loads them, so they are genuine HF layouts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import fnllama.hf as hf
from fnllama import model
from fnllama import random as fr
from fnllama.config import ModelConfig
from fnllama.errors import ConfigError, HFError
from fnllama.hf import hf_tensors, load_hf, save_hf
from fnllama.tree import paths_and_leaves

transformers = pytest.importorskip("transformers")

VARIANTS = {  # name: (num_key_value_heads, tie_word_embeddings)
    "gqa": (2, False),
    "mha": (4, False),
    "tied": (2, True),
}
FORMATS = ("safetensors", "safetensors_sharded", "bin", "bin_sharded")


def _hf_model(kv_heads: int, tied: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        vocab_size=128, intermediate_size=176, rms_norm_eps=1e-5, rope_theta=5000.0,
        max_position_embeddings=64, tie_word_embeddings=tied,
    )
    m = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():   # non-trivial weights everywhere, norms included
        for p in m.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return m


def _save_bin(m: transformers.LlamaForCausalLM, out: Path, *, shard: bool) -> None:
    """The HF `.bin` layout (all tensors, tied lm_head included, as transformers 4.x did)."""
    out.mkdir()
    m.config.save_pretrained(out)
    state = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    if not shard:
        torch.save(state, out / "pytorch_model.bin")
        return
    split = huggingface_hub.split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size="100KB")
    assert split.is_sharded and len(split.filename_to_tensors) > 2
    for fname, names in split.filename_to_tensors.items():
        torch.save({n: state[n] for n in names}, out / fname)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[transformers.LlamaForCausalLM, dict[str, Path]]]:
    """variant -> (the HF model, {format: directory})."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (kv_heads, tied) in VARIANTS.items():
        m = _hf_model(kv_heads, tied)
        dirs = {f: root / f"{name}-{f}" for f in FORMATS}
        m.save_pretrained(dirs["safetensors"])
        m.save_pretrained(dirs["safetensors_sharded"], max_shard_size="100KB")
        _save_bin(m, dirs["bin"], shard=False)
        _save_bin(m, dirs["bin_sharded"], shard=True)
        assert (dirs["safetensors_sharded"] / "model.safetensors.index.json").is_file()
        out[name] = (m, dirs)
    return out


def _tokens(seed: int = 0, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- mapping and layouts

@pytest.mark.parametrize("tied", [False, True])
def test_name_map_covers_the_model_tree(tied):
    cfg = ModelConfig(tie_embeddings=tied)
    tree = model.init(fr.key(0), cfg, device="meta")
    ours = {".".join(map(str, path)): shape for path, shape in hf_tensors(cfg).values()}
    theirs = {p: tuple(t.shape) for p, t in paths_and_leaves(tree)}
    assert ours == theirs


def test_bin_fixture_is_a_layout_transformers_loads(saved):
    m, dirs = saved["gqa"]
    x = _tokens()
    for fmt in ("bin", "bin_sharded"):
        again = transformers.LlamaForCausalLM.from_pretrained(dirs[fmt], dtype=torch.float32)
        assert torch.equal(again(x).logits, m(x).logits), fmt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_load_matches_transformers_logits(saved, variant, fmt):
    m, dirs = saved[variant]
    cfg, params = load_hf(dirs[fmt])
    assert cfg.n_kv_heads == VARIANTS[variant][0] and cfg.tie_embeddings == VARIANTS[variant][1]
    assert cfg.rope_theta == 5000.0 and cfg.norm_eps == 1e-5
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    # Every leaf equals the HF weight it came from, bitwise.
    hf_state = m.state_dict()
    for name, (path, _) in hf_tensors(cfg).items():
        leaf = params
        for k in path:
            leaf = leaf[k]
        assert leaf.dtype == torch.float32 and torch.equal(leaf, hf_state[name]), name
    x = _tokens()
    with torch.no_grad():
        ref = m(x).logits
        ours = model.forward(params, x, cfg)
    assert ref.abs().max() > 1.0  # the check below is not trivially met by tiny logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bin_sharded", "safetensors"])
def test_loaded_params_own_their_memory(saved, tmp_path, fmt):
    """Both formats are read memory-mapped; params must be copies, not views of the files."""
    m, dirs = saved["gqa"]
    d = _copy(dirs[fmt], tmp_path / "m")
    cfg, params = load_hf(d)
    for f in list(d.glob("*.bin")) + list(d.glob("*.safetensors")):
        with open(f, "r+b") as fh:   # overwrite every byte in place (same size, same inode)
            fh.write(b"\xff" * f.stat().st_size)
    for name, (path, _) in hf_tensors(cfg).items():
        leaf = params
        for k in path:
            leaf = leaf[k]
        assert torch.equal(leaf, m.state_dict()[name]), name


def test_legacy_bin_format(saved, tmp_path):
    """Pre-zipfile `.bin` files cannot be memory-mapped; they are read whole, one at a time."""
    m, dirs = saved["tied"]
    d = _copy(dirs["bin"], tmp_path / "m")
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save(state, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    cfg, params = load_hf(d)
    assert torch.equal(params["embed"], m.state_dict()["model.embed_tokens.weight"])
    torch.save(dict(state, step=3), d / "pytorch_model.bin")
    with pytest.raises(HFError, match=r"pytorch_model.bin: .*not tensors: \['step'\]"):
        load_hf(d)


def test_load_in_bfloat16(saved):
    m, dirs = saved["gqa"]
    cfg, params = load_hf(dirs["bin_sharded"], dtype=torch.bfloat16)
    leaves = paths_and_leaves(params)
    assert {t.dtype for _, t in leaves} == {torch.bfloat16}
    assert torch.equal(params["layers"][1]["mlp"]["w_down"],
                       m.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("variant", VARIANTS)
def test_grads_match_transformers_autograd(saved, variant):
    m, dirs = saved[variant]
    cfg, params = load_hf(dirs["safetensors"])
    tokens = _tokens(seed=3, B=2, T=16)
    B, T = tokens.shape
    # fnllama: labels aligned to positions (labels[t] = tokens[t+1]); last position masked out,
    # and a few more, to check the mask lines up with HF's -100 after its internal shift.
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(B, T)
    loss_mask[:, -1] = 0
    loss_mask[0, 4] = loss_mask[1, 9] = 0
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
             "positions": torch.arange(T).expand(B, T), "segment_ids": torch.zeros(B, T, dtype=torch.long)}
    grads, (value, num_tokens) = torch.func.grad_and_value(
        lambda p: model.loss(p, batch, cfg), has_aux=True)(params)
    # transformers: labels are the inputs, shifted inside; -100 marks ignored targets.
    hf_labels = tokens.clone()
    hf_labels[:, 1:][loss_mask[:, :-1] == 0] = -100
    m.zero_grad()
    out = m(input_ids=tokens, labels=hf_labels)
    out.loss.backward()
    assert num_tokens.item() == (hf_labels[:, 1:] != -100).sum().item() == B * (T - 1) - 2
    torch.testing.assert_close(value, out.loss.detach(), rtol=1e-6, atol=0)
    hf_params = dict(m.named_parameters())
    for name, (path, _) in hf_tensors(cfg).items():
        g = grads
        for k in path:
            g = g[k]
        ref = hf_params[name].grad
        rel = ((g - ref).norm() / ref.norm()).item()
        assert ref.norm() > 0 and rel < 1e-5, f"{name}: relative grad error {rel:.2e}"


# ---------------------------------------------------------------- export

@pytest.mark.parametrize("variant", VARIANTS)
def test_save_then_transformers_from_pretrained(saved, variant, tmp_path):
    m, dirs = saved[variant]
    cfg, params = load_hf(dirs["bin_sharded"])
    out = save_hf(params, cfg, tmp_path / "export", max_shard_bytes=100_000)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "config.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_tensors(cfg)) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for _, t in paths_and_leaves(params))
    assert all(sum(t.numel() * 4 for t in load_file(out / s).values()) <= 100_000 for s in shards)
    again, info = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert again.config.rope_parameters["rope_theta"] == 5000.0
    x = _tokens(seed=5)
    with torch.no_grad():
        assert torch.equal(again(x).logits, m(x).logits)
    # ... and fnllama reads its own export back bit for bit.
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(paths_and_leaves(params), paths_and_leaves(params2)))
    assert not list(tmp_path.glob(".export*")), "temporary directories left behind"


def test_save_single_file_and_dtype(saved, tmp_path):
    m, dirs = saved["tied"]
    cfg, params = load_hf(dirs["safetensors"])
    out = save_hf(params, cfg, tmp_path / "bf16", dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # safetensors creates 0600 files; exported ones get the umask's mode, like config.json.
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    state = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in state and {t.dtype for t in state.values()} == {torch.bfloat16}
    _, params_bf16 = load_hf(out, dtype=torch.bfloat16)
    assert torch.equal(params_bf16["embed"], params["embed"].to(torch.bfloat16))


def test_save_from_views_of_a_flat_buffer(saved, tmp_path):
    """Params that are views into one buffer (as after ZeRO's unflatten) export fine."""
    from fnllama.tree import flatten, make_layout, unflatten
    m, dirs = saved["gqa"]
    cfg, params = load_hf(dirs["safetensors"])
    layout = make_layout(params)
    views = unflatten(flatten(params, layout), layout)
    out = save_hf(views, cfg, tmp_path / "flat")
    assert torch.equal(load_file(out / "model.safetensors")["lm_head.weight"], params["lm_head"])


def test_save_failure_leaves_nothing_partial(saved, tmp_path, monkeypatch):
    m, dirs = saved["gqa"]
    cfg, params = load_hf(dirs["safetensors"])
    real_save, calls = hf.save_file, []

    def save_then_fail(tensors, filename, metadata=None):  # the disk "fills up" after one shard
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_hf(params, cfg, tmp_path / "new", max_shard_bytes=100_000)
    assert len(calls) == 2 and not Path(calls[0]).exists()   # the first shard was cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # Replacing an existing export: a failure keeps the old one intact.
    old = _copy(dirs["safetensors_sharded"], tmp_path / "old")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    calls.clear()
    with pytest.raises(OSError):
        save_hf(params, cfg, old, max_shard_bytes=100_000, overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_save_overwrite(saved, tmp_path):
    m, dirs = saved["gqa"]
    cfg, params = load_hf(dirs["safetensors"])
    target = _copy(dirs["bin_sharded"], tmp_path / "target")
    with pytest.raises(HFError, match="already exists"):
        save_hf(params, cfg, target)
    save_hf(params, cfg, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_save_rejects_params_that_do_not_fit(saved, tmp_path):
    m, dirs = saved["gqa"]
    cfg, params = load_hf(dirs["safetensors"])
    wrong = dict(params, final_norm=torch.ones(65), extra=torch.zeros(1))
    with pytest.raises(HFError, match=r"final_norm: expected shape \[64\], found \[65\]"):
        save_hf(dict(params, final_norm=torch.ones(65)), cfg, tmp_path / "a")
    with pytest.raises(HFError, match=r"missing \['lm_head'\]; unexpected \['extra'\]"):
        save_hf({k: v for k, v in wrong.items() if k != "lm_head"}, cfg, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("fmt", ["bin_sharded", "safetensors_sharded"])
def test_missing_shard_is_named(saved, tmp_path, fmt):
    d = _copy(saved["gqa"][1][fmt], tmp_path / "m")
    victim = sorted(d.glob("*-of-*"))[1]
    victim.unlink()
    with pytest.raises(HFError, match=victim.name):
        load_hf(d)


def test_wrong_tensor_shape_names_tensor_and_shapes(saved, tmp_path):
    d = _copy(saved["gqa"][1]["safetensors"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight .*"
                                      r"expected shape \[32, 64\], found \[16, 64\]"):
        load_hf(d)


def test_shape_check_against_config(saved, tmp_path):
    """config.json says something the weights are not: every mismatching tensor is listed."""
    d = _copy(saved["gqa"][1]["bin_sharded"], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, intermediate_size=192)))
    with pytest.raises(HFError) as err:
        load_hf(d)
    msg = str(err.value)
    for i in range(2):
        for proj in ("gate_proj", "up_proj"):
            assert f"model.layers.{i}.mlp.{proj}.weight (in pytorch_model-" in msg
        assert f"model.layers.{i}.mlp.down_proj.weight" in msg
    assert "expected shape [192, 64], found [176, 64]" in msg and "self_attn" not in msg


def test_missing_and_unexpected_names_in_one_error(saved, tmp_path):
    d = _copy(saved["gqa"][1]["bin"], tmp_path / "m")
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    state["model.extra_adapter.weight"] = state.pop("model.norm.weight")
    del state["model.layers.0.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)   # ignored, not reported
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(HFError) as err:
        load_hf(d)
    msg = str(err.value)
    assert "missing tensors ['model.layers.0.mlp.up_proj.weight', 'model.norm.weight']" in msg
    assert "unexpected tensors ['model.extra_adapter.weight']" in msg and "inv_freq" not in msg


def test_more_layers_in_config_than_weights(saved, tmp_path):
    d = _copy(saved["gqa"][1]["safetensors"], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    with pytest.raises(HFError, match=r"3 layers.*missing tensors \['model\.layers\.2\.self_attn\.q_proj"):
        load_hf(d)


@pytest.mark.parametrize("field, value, named", [
    ("model_type", "mistral", "model_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope scaling type 'linear'"),
    ("attention_bias", True, "attention_bias"),
])
def test_unsupported_config_is_named(saved, tmp_path, field, value, named):
    d = _copy(saved["gqa"][1]["safetensors"], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config.pop("rope_parameters") if field == "rope_scaling" else None
    (d / "config.json").write_text(json.dumps(dict(config, **{field: value})))
    with pytest.raises(ConfigError, match=named) as err:
        load_hf(d)
    assert "config.json" in str(err.value)


def test_directory_without_weights(saved, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(saved["gqa"][1]["safetensors"] / "config.json", d)
    with pytest.raises(HFError, match="no weights found"):
        load_hf(d)
    with pytest.raises(HFError, match="not a directory"):
        load_hf(tmp_path / "absent")
    (d / "config.json").unlink()
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="config.json: no such file"):
        load_hf(d)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_weight_file_is_named(saved, tmp_path, name):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(saved["gqa"][1]["safetensors"] / "config.json", d)
    (d / name).write_bytes(b"this is not a checkpoint")
    with pytest.raises(HFError, match=name):
        load_hf(d)
