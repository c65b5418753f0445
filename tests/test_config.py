import json

import pytest
import tiny

from gemma4_mlx.config import load_config, parse_config
from gemma4_mlx.errors import UserError


def _released_form(name):
    """The tiny config in Google's released form: global_head_dim, no per_layer_config."""
    d = dict(tiny.TINY_CONFIGS[name])
    return d


def test_released_and_per_layer_forms_agree(tiny_checkpoints):
    path, _ = tiny_checkpoints("26b")
    written = load_config(path).text  # transformers 5.23 writes per_layer_config
    assert "per_layer_config" in json.loads((path / "config.json").read_text())
    released = parse_config(_released_form("26b")).text
    assert written.layers == released.layers
    full = [spec for spec in released.layers if not spec.is_sliding]
    assert [(s.head_dim, s.n_kv_heads, s.k_eq_v) for s in full] == [(32, 1, True)]


def test_kv_sharing_producers():
    cfg = parse_config(_released_form("e2b")).text
    sources = [spec.kv_source for spec in cfg.layers]
    assert sources == [0, 1, 2, 3, 4, 3, 3, 3, 3, 4]
    assert [spec.mlp_width for spec in cfg.layers] == [96] * 5 + [192] * 5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type='llama' is not supported"),
        (
            {"num_kv_shared_layers": 40},
            "num_kv_shared_layers=40 must be below num_hidden_layers=10",
        ),
        (
            {"layer_types": ["sliding_attention"] * 3},
            "layer_types has 3 entries but num_hidden_layers=10",
        ),
        ({"layer_types": ["sliding_attention"] * 9 + ["local"]}, "unknown type 'local'"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_size": "big"}, "'hidden_size'='big' should be of type int"),
        ({"num_kv_shared_layers": 6}, "no earlier non-shared"),
    ],
)
def test_inconsistent_config_names_the_field(change, message):
    raw = dict(_released_form("e2b"), **change)
    with pytest.raises(UserError, match=message):
        parse_config(raw, source="x/config.json")


def test_moe_fields_required_when_enabled():
    raw = dict(_released_form("26b"))
    del raw["top_k_experts"]
    with pytest.raises(UserError, match="enable_moe_block is true but 'top_k_experts' is missing"):
        parse_config(raw)


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path)
