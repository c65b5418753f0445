"""convert keeps the audio tower and the feature-extractor settings (mlx-vlm conversions lost
the latter, and audio was then silently dropped)."""

import json

import mlx.core as mx
import numpy as np
import pytest
import tiny_audio
import tiny_multimodal as tmm
from mlx.utils import tree_flatten

from gemma4_mlx.convert import convert
from gemma4_mlx.loading import load_model
from gemma4_mlx.media.audio import LogMelConfig, log_mel_features, token_count

FEATURE_EXTRACTOR = {  # Google's processor_config.json entry (E2B/E4B), mel_floor changed
    "feature_extractor_type": "Gemma4AudioFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "frame_length": 320,
    "hop_length": 160,
    "fft_length": 512,
    "min_frequency": 0.0,
    "max_frequency": 8000.0,
    "mel_floor": 0.002,
    "preemphasis": 0.0,
    "dither": 0.0,
    "input_scale_factor": 1.0,
    "per_bin_mean": None,
    "per_bin_stddev": None,
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path, _ = tiny_audio.write_full_checkpoint(tmp_path_factory.mktemp("tiny-e2b-audio-src"))
    processor = {"feature_extractor": FEATURE_EXTRACTOR, "audio_seq_length": 750}
    (path / "processor_config.json").write_text(json.dumps(processor))
    return path


def _logits(model):
    t = np.arange(12000) / 16000
    feats, mask = log_mel_features([(0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)])
    n = token_count(mask[0])
    ids = [2, 7, tmm.BOA] + [tmm.AUD] * n + [tmm.EOA, 9, 11]
    out = model(mx.array([ids]), input_features=feats, input_features_mask=mask)
    return np.array(out)


def test_float_convert_keeps_audio_tower_and_feature_config(source, tmp_path):
    out = convert(source, tmp_path / "mlx")
    ref, _ = load_model(source)
    model, _ = load_model(out)
    assert model.has_audio
    assert model.feature_extractor == LogMelConfig(mel_floor=0.002)
    err = float(np.abs(_logits(model) - _logits(ref)).max())
    print(f"converted vs source, audio prompt: max |logit diff| {err:.2e}")
    assert err <= 1e-5


def test_quantized_convert_keeps_the_audio_tower_in_float(source, tmp_path):
    out = convert(source, tmp_path / "mlx-q4", quantize=True, q_bits=4, q_group_size=32)
    model, _ = load_model(out)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not [k for k in names if k.startswith("audio_tower") and k.endswith(".scales")]
    assert any(k.startswith("language_model") and k.endswith(".scales") for k in names)
    ref, _ = load_model(source)
    got, want = _logits(model), _logits(ref)
    print(
        f"4-bit text + float audio tower vs float: max |logit diff| {np.abs(got - want).max():.2e}"
    )
    assert np.isfinite(got).all()
