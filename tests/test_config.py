import json

import pytest

from fnllama import config, model
from fnllama import random as fr
from fnllama.errors import ConfigError
from fnllama.tree import num_elements


def test_llama2_7b_param_count():
    assert config.num_params(config.get_preset("llama2-7b")) == 6_738_415_616


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_num_params_matches_meta_tree(name):
    cfg = config.get_preset(name)
    params = model.init(fr.key(0), cfg, device="meta")
    assert num_elements(params) == config.num_params(cfg)
    assert params["embed"].device.type == "meta"


def test_tied_embeddings_count():
    cfg = config.get_preset("tiny", tie_embeddings=True)
    assert num_elements(model.init(fr.key(0), cfg, device="meta")) == config.num_params(cfg)


def test_hf_roundtrip(tmp_path):
    for name in config.PRESETS:
        cfg = config.get_preset(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config.to_hf(cfg)))
        assert config.from_hf(path) == cfg
        assert config.from_hf(tmp_path / f"{name}.json") == cfg


def test_transformers_accepts_to_hf():
    transformers = pytest.importorskip("transformers")
    cfg = config.get_preset("tiny")
    hf = transformers.LlamaConfig(**config.to_hf(cfg))
    assert config.from_hf(hf.to_dict()) == cfg


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "mistral", "model_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_bias", True, "attention_bias"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope scaling"),
])
def test_unsupported_hf_fields_are_named(tmp_path, field, value, match):
    hf = config.to_hf(config.get_preset("tiny"))
    hf[field] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=match) as err:
        config.from_hf(tmp_path)
    assert "config.json" in str(err.value)


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        config.get_preset("tiny", n_kv_heads=3)
    with pytest.raises(ConfigError, match="dim"):
        config.get_preset("tiny", dim=0)
    with pytest.raises(ConfigError, match="known presets"):
        config.get_preset("gpt5")
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        config.get_preset("tiny", hidden=3)
    with pytest.raises(ConfigError, match="missing field 'hidden_size'"):
        config.from_hf({"model_type": "llama"})
