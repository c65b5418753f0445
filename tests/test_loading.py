"""Broken checkpoints give one clear UserError naming the file or tensor; good ones round-trip."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx.errors import UserError
from gemma4_mlx.loading import load_model, resolve_model_path


@pytest.fixture
def checkpoint(tiny_checkpoints, tmp_path):
    src, _ = tiny_checkpoints("31b")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _reshard(path):
    """Split model.safetensors into two shards with an index, as big checkpoints come."""
    weights = mx.load(str(path / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        mx.save_safetensors(str(path / shard), {k: weights[k] for k in keys})
        weight_map.update({k: shard for k in keys})
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_checkpoint_loads_with_same_logits(checkpoint):
    single, _ = load_model(checkpoint)
    _reshard(checkpoint)
    sharded, _ = load_model(checkpoint)
    x = mx.array([[5, 6, 7, 8]])
    assert np.array_equal(np.array(single(x)), np.array(sharded(x)))


def test_missing_shard_is_named(checkpoint):
    _reshard(checkpoint)
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors.*missing"):
        load_model(checkpoint)


def test_truncated_safetensors_is_named(checkpoint):
    f = checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="model.safetensors: truncated"):
        load_model(checkpoint)


def test_garbage_safetensors_is_named(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(checkpoint)


def test_wrong_shape_names_the_tensor(checkpoint):
    weights = mx.load(str(checkpoint / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = mx.zeros((weights[name].shape[0] + 4, weights[name].shape[1]))
    mx.save_safetensors(str(checkpoint / "model.safetensors"), weights)
    with pytest.raises(UserError, match=r"q_proj.weight' has shape \(68, 64\)"):
        load_model(checkpoint)


def test_config_that_does_not_match_weights(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] *= 2
    config["layer_types"] = config["layer_types"] * 2
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="layers.12.* missing"):
        load_model(checkpoint)


def test_missing_weight_is_named(checkpoint):
    weights = mx.load(str(checkpoint / "model.safetensors"))
    del weights["model.layers.3.post_attention_layernorm.weight"]
    mx.save_safetensors(str(checkpoint / "model.safetensors"), weights)
    with pytest.raises(UserError, match="layers.3.post_attention_layernorm.weight' is missing"):
        load_model(checkpoint)


def test_unknown_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "llama"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model_type='llama' is not supported"):
        load_model(checkpoint)


def test_multimodal_wrapper_names_load(checkpoint, tiny_checkpoints):
    """Gemma4ForConditionalGeneration layout: model.language_model.* plus towers we skip."""
    text, _ = load_model(checkpoint)
    weights = mx.load(str(checkpoint / "model.safetensors"))
    wrapped = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    wrapped["model.vision_tower.patch_embedder.weight"] = mx.zeros((4, 4))
    mx.save_safetensors(str(checkpoint / "model.safetensors"), wrapped)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(
        json.dumps({"model_type": "gemma4", "text_config": config, "vision_config": {}})
    )
    model, cfg = load_model(checkpoint)
    assert cfg.model_type == "gemma4"
    x = mx.array([[9, 10, 11]])
    assert np.array_equal(np.array(model(x)), np.array(text(x)))
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in dict(
        __import__("mlx.utils").utils.tree_flatten(model.parameters())
    )


def test_unknown_local_path_is_clear(tmp_path):
    with pytest.raises(UserError, match="no such model directory"):
        resolve_model_path(str(tmp_path / "nope"))


def test_offline_hub_id_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="google/gemma-4-e2b-it.*pass the path"):
        resolve_model_path("google/gemma-4-e2b-it")


def test_loads_in_mlx_lm_with_same_logits(checkpoint):
    """Our module names are mlx-lm's: the same weights load there with the same logits.

    mlx-lm 0.32 reads only Google's released config form (global_head_dim,
    num_global_key_value_heads), not transformers' newer per_layer_config map.
    """
    from mlx_lm.utils import load_model as mlx_lm_load_model

    ours, _ = load_model(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("per_layer_config")
    config.update(global_head_dim=32, num_global_key_value_heads=1)
    (checkpoint / "config.json").write_text(json.dumps(config))
    theirs, _ = mlx_lm_load_model(checkpoint)
    x = mx.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    err = float(np.abs(np.array(ours(x)) - np.array(theirs(x))).max())
    print(f"max |ours - mlx-lm| = {err:.2e}")
    assert err < 1e-4
