"""convert: HF -> MLX (float and quantized) round-trips, mlx-lm interoperability, atomic output."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import convert as convert_module
from gemma4_mlx.convert import convert
from gemma4_mlx.errors import UserError
from gemma4_mlx.loading import load_model

X = mx.array([[5, 9, 33, 70, 101, 4, 8, 250, 17, 3, 99, 120]])


def _logits(path):
    model, _ = load_model(path)
    return np.array(model(X))


@pytest.fixture(scope="module")
def source(tiny_chat_model):
    return tiny_chat_model  # E2B-shaped tiny checkpoint with a tokenizer


def test_float_conversion_round_trips_and_loads_in_mlx_lm(source, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    out = convert(source, tmp_path / "float")
    assert np.array_equal(_logits(out), _logits(source))
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config and config["global_head_dim"] == 32  # mlx-lm's form
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    theirs, _ = mlx_lm_load_model(out)
    err = float(np.abs(np.array(theirs(X)) - _logits(out)).max())
    print(f"mlx-lm vs ours on our float conversion: {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("mode, bits", [("affine", 8), ("affine", 4), ("mxfp4", 4)])
def test_quantized_conversion_loads_here_and_in_mlx_lm(source, tmp_path, mode, bits):
    """The written checkpoint reproduces the in-memory quantized model exactly, here and in
    mlx-lm. (Distance to float is measured on real weights by benchmarks/weights.py: tiny random
    models amplify any weight error, 8-bit included.)"""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    out = convert(
        source, tmp_path / f"{mode}{bits}", quantize=True, q_bits=bits, q_mode=mode, q_group_size=32
    )
    in_memory, _ = load_model(source)
    convert_module._quantize(in_memory, bits, 32, mode)
    ours = _logits(out)
    assert np.array_equal(ours, np.array(in_memory(X)))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["mode"] == mode
    if mode == "affine" and bits < 8:  # the mixed recipe: per-layer embeddings kept at 8 bits
        assert config["quantization"]["model.embed_tokens_per_layer"]["bits"] == 8
        weights = mx.load(str(out / "model.safetensors"))
        assert (
            weights["model.embed_tokens_per_layer.weight"].shape[-1] == 160 * 8 // 32
        )  # 8-bit packed
    theirs, _ = mlx_lm_load_model(out)
    err = float(np.abs(np.array(theirs(X)) - ours).max())
    print(f"{mode} {bits}-bit: mlx-lm vs ours {err:.2e}")
    assert err < 1e-4


def test_mlx_lm_conversions_load_here_with_mlx_lm_logits(source, tmp_path):
    from mlx_lm import convert as mlx_lm_convert
    from mlx_lm.utils import load_model as mlx_lm_load_model

    released = tmp_path / "released"
    shutil.copytree(source, released)
    config = json.loads((released / "config.json").read_text())
    (released / "config.json").write_text(json.dumps(convert_module._released_form(config)))
    for quantize in (False, True):
        out = tmp_path / f"mlx-lm-{quantize}"
        mlx_lm_convert(str(released), str(out), quantize=quantize, q_bits=4, q_group_size=32)
        theirs, _ = mlx_lm_load_model(out)
        err = float(np.abs(_logits(out) - np.array(theirs(X))).max())
        print(f"mlx_lm.convert (quantize={quantize}) loaded here vs mlx-lm: {err:.2e}")
        assert err < 1e-4


def test_existing_output_is_refused_unless_forced(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert(source, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(source, out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_save_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(source, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_quantization_values(source, tmp_path):
    with pytest.raises(UserError, match=r"q_bits 3 is not available with mxfp4 \(choose 4\)"):
        convert(source, tmp_path / "a", quantize=True, q_bits=3, q_mode="mxfp4")
    with pytest.raises(UserError, match="q_group_size must be 32, 64 or 128"):
        convert(source, tmp_path / "b", quantize=True, q_group_size=48)
    assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_in_source_is_clear(source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has shape"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
