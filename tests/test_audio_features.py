"""Log-mel features and audio decoding against transformers' Gemma4AudioFeatureExtractor on real
speech synthesised with espeak-ng (22.05 kHz mono), converted with sox."""

import shutil
import subprocess

import numpy as np
import pytest

from gemma4_mlx.errors import UserError
from gemma4_mlx.media import audio as media

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="needs espeak-ng and sox (Debian packages) to make real speech",
)
TOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog. Gemma listens to sixteen kilohertz speech."


def _run(*args):
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """name -> path: espeak-ng's 22.05 kHz output, 16 kHz, stereo, 45 s and 0.2 s versions."""
    d = tmp_path_factory.mktemp("speech")
    files = {"22k": d / "speech22k.wav", "other": d / "other22k.wav"}
    _run("espeak-ng", "-w", str(files["22k"]), TEXT)
    _run(
        "espeak-ng",
        "-s",
        "140",
        "-v",
        "en-us",
        "-w",
        str(files["other"]),
        "Testing, one two three.",
    )
    files["16k"] = d / "speech16k.wav"
    _run("sox", str(files["22k"]), "-r", "16000", str(files["16k"]))
    files["stereo"] = d / "stereo.wav"  # left: the sentence, right: another voice, quieter
    _run("sox", "-M", str(files["22k"]), "-v", "0.5", str(files["other"]), str(files["stereo"]))
    files["45s"] = d / "long45.wav"
    _run("sox", str(files["16k"]), str(files["45s"]), "repeat", "12", "trim", "0", "45")
    files["short"] = d / "short.wav"
    _run("sox", str(files["16k"]), str(files["short"]), "trim", "0.5", "0.2")
    return files


def _reference(clips):
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    out = Gemma4AudioFeatureExtractor()(list(clips), return_tensors="np")
    return out["input_features"], out["input_features_mask"]


def _reference_token_count(mask) -> int:
    # Gemma4Processor.replace_audio_token's rule: two stride-2 conv blocks on the mask.
    t = len(mask)
    for _ in range(2):
        mask = mask[::2][: (t + 2 - 3) // 2 + 1]
        t = len(mask)
    return int(mask.sum())


@pytest.mark.parametrize("name", ["22k", "16k", "stereo", "45s", "short"])
def test_log_mel_matches_transformers_on_real_speech(speech, name):
    samples = media.load_audio(speech[name])
    prepared = media.prepare_audio([samples])
    clips = media.split_clips(samples)
    ref_feats, ref_mask = _reference(clips)
    assert prepared.features.shape == ref_feats.shape
    assert (prepared.mask == ref_mask).all()
    err = float(np.abs(prepared.features - ref_feats).max())
    counts = [_reference_token_count(m) for m in ref_mask]
    print(
        f"{name}: {len(samples) / 16000:.2f} s -> {len(clips)} clip(s), frames "
        f"{ref_mask.sum(1).tolist()}, tokens {counts}, max |log-mel diff| {err:.2e}"
    )
    assert err <= TOL
    assert list(prepared.token_counts) == counts


def test_long_audio_is_split_into_30s_clips_not_truncated(speech):
    samples = media.load_audio(speech["45s"])
    prepared = media.prepare_audio([samples, samples[:16000]])
    assert prepared.source_index == (0, 0, 1)
    # 30 s -> 2999 real frames -> 750 tokens; 15 s -> 375; 1 s -> 25.
    assert prepared.token_counts == (750, 375, 25)
    # The reference cuts the same file at 30 s: its one clip equals our first.
    ref_feats, _ = _reference([samples])
    err = float(np.abs(prepared.features[0] - ref_feats[0]).max())
    print(f"45 s: first clip vs transformers' truncated input: max |diff| {err:.2e}")
    assert err <= TOL


def test_loading_downmixes_and_resamples_like_sox(speech, tmp_path):
    ours = media.load_audio(speech["stereo"])
    ref = tmp_path / "sox16k.f32"  # sox: channel average, its own high-quality resampler
    _run("sox", str(speech["stereo"]), "-r", "16000", "-c", "1", "-e", "floating-point", str(ref))
    ref = np.fromfile(ref, dtype=np.float32)
    n = min(len(ours), len(ref))
    assert abs(len(ours) - len(ref)) <= 1
    err = float(np.abs(ours[:n] - ref[:n]).max())
    print(
        f"stereo 22.05 kHz -> 16 kHz mono vs sox: max |diff| {err:.2e} (peak {np.abs(ref).max():.2f})"
    )
    assert err < 2e-3


def _encode(src: np.ndarray, path, codec: str, rate: int = 16000):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        fmt = "fltp" if codec in ("aac", "libmp3lame") else "s16"
        data = src if fmt == "fltp" else (src * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(data[None], format=fmt, layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.mark.parametrize(
    "suffix,codec,lossless",
    [
        (".flac", "flac", True),
        (".wav", "pcm_s16le", True),
        (".mp3", "libmp3lame", False),
        (".m4a", "aac", False),
    ],
)
def test_common_formats_decode_to_the_same_speech(speech, tmp_path, suffix, codec, lossless):
    src = media.load_audio(speech["16k"])
    path = tmp_path / f"speech{suffix}"
    _encode(src, path, codec)
    got = media.load_audio(path)
    if lossless:
        assert len(got) == len(src)
        assert np.abs(got - src).max() <= 1 / 32767 + 1e-6
        return
    # Lossy codecs add encoder delay/padding; align by cross-correlation before comparing.
    assert abs(len(got) - len(src)) < 0.15 * 16000
    lag = int(np.argmax(np.correlate(got[:4000], src[:2000], mode="valid")))
    n = min(len(src), len(got) - lag)
    corr = float(np.corrcoef(got[lag : lag + n], src[:n])[0, 1])
    print(f"{suffix}: delay {lag} samples, correlation with the source {corr:.4f}")
    assert corr > 0.95


def test_unreadable_audio_is_one_clear_error(tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio\n")
    with pytest.raises(UserError, match="notes.wav: not a readable audio file"):
        media.load_audio(bad)
    picture = tmp_path / "picture.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(picture)
    with pytest.raises(UserError, match="picture.png: (has no audio stream|not a readable)"):
        media.load_audio(picture)
    with pytest.raises(UserError, match="no such audio file"):
        media.load_audio(tmp_path / "missing.mp3")
    with pytest.raises(UserError, match="too short"):
        media.prepare_audio([np.zeros(100, dtype=np.float32)])
    with pytest.raises(UserError, match="float samples"):
        media.prepare_audio([np.zeros(16000, dtype=np.int16)])
    with pytest.raises(UserError, match="1-D"):
        media.prepare_audio([np.zeros((2, 16000), dtype=np.float32)])


def test_feature_config_is_read_from_processor_config(tmp_path):
    import json

    cfg = {
        "feature_extractor": {
            "feature_size": 128,
            "sampling_rate": 16000,
            "frame_length": 320,
            "hop_length": 160,
            "fft_length": 512,
            "mel_floor": 0.001,
        }
    }
    (tmp_path / "processor_config.json").write_text(json.dumps(cfg))
    assert media.log_mel_config(tmp_path) == media.LogMelConfig()
    cfg["feature_extractor"]["sampling_rate"] = 24000
    (tmp_path / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="sampling_rate=24000"):
        media.log_mel_config(tmp_path)


def test_a_video_files_soundtrack_loads_as_audio(speech, tmp_path):
    from tiny_audio import write_video_with_sound

    src = media.load_audio(speech["16k"])[:32000]
    path = write_video_with_sound(tmp_path / "clip.mp4", src)
    got = media.load_audio(path)
    assert abs(len(got) - len(src)) < 0.15 * 16000
    lag = int(np.argmax(np.correlate(got[:4000], src[:2000], mode="valid")))
    n = min(len(src), len(got) - lag)
    assert np.corrcoef(got[lag : lag + n], src[:n])[0, 1] > 0.95
