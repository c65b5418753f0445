"""Audio in: decode any common file to 16 kHz mono, split into <= 30 s clips, log-mel features.

Decoding goes through PyAV (FFmpeg, bundled in its wheels for macOS and Linux: WAV, FLAC, MP3,
M4A/AAC, Ogg/Opus and the soundtrack of video files alike); channels are averaged to mono and
resampled with libsoxr (``soxr``, its "VHQ" setting), the reference-quality resampler.

The features reproduce transformers 5.24's ``Gemma4AudioFeatureExtractor`` in numpy: 16 kHz samples
-> 160 zeros prepended (semicausal) -> frames of 321 samples every 160, last sample dropped ->
periodic Hann(320) -> |rfft(512)| (magnitude, not power) -> 128 HTK mel filters 0-8 kHz ->
log(x + 1e-3); a frame is real iff the sample one past its window is real audio, and padded frames
are 0.0. The reference silently cuts audio at 30 s; here longer audio becomes several 30 s clips,
each its own ``<|audio>`` block in the prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemma4_mlx.errors import UserError

SAMPLE_RATE = 16_000
MAX_CLIP_SECONDS = 30
PAD_TO_MULTIPLE_OF = 128  # samples; the reference pads each batch to a multiple of this


@dataclass(frozen=True)
class LogMelConfig:
    """The ``feature_extractor`` entry of processor_config.json (defaults: Google's E2B/E4B)."""

    feature_size: int = 128
    sampling_rate: int = SAMPLE_RATE
    frame_length: int = 320
    hop_length: int = 160
    fft_length: int = 512
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    mel_floor: float = 1e-3
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    input_scale_factor: float = 1.0
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None

    @property
    def max_clip_samples(self) -> int:
        return MAX_CLIP_SECONDS * self.sampling_rate


def log_mel_config(model_dir: str | Path) -> LogMelConfig:
    """Read the feature extractor settings a checkpoint ships (processor_config.json's
    ``feature_extractor``, or preprocessor_config.json); defaults where neither exists."""
    model_dir = Path(model_dir)
    for name, key in (
        ("processor_config.json", "feature_extractor"),
        ("preprocessor_config.json", None),
    ):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        section = raw.get(key) if key else raw
        if isinstance(section, dict) and (key or "feature_size" in section):
            return log_mel_config_from_dict(section, str(path))
    return LogMelConfig()


def log_mel_config_from_dict(
    raw: dict[str, Any], source: str = "feature_extractor"
) -> LogMelConfig:
    d = LogMelConfig()
    sr = int(raw.get("sampling_rate", d.sampling_rate))
    if sr != SAMPLE_RATE:
        raise UserError(f"{source}: sampling_rate={sr} is not supported (Gemma 4 audio is 16 kHz)")
    if float(raw.get("dither", 0.0) or 0.0) != 0.0:
        raise UserError(
            f"{source}: dither={raw['dither']} is not supported (features would be random)"
        )
    frame = raw.get("frame_length", round(sr * float(raw.get("frame_length_ms", 20.0)) / 1000))
    hop = raw.get("hop_length", round(sr * float(raw.get("hop_length_ms", 10.0)) / 1000))
    fft = raw.get("fft_length") or 2 ** math.ceil(math.log2(frame)) * (
        2 if raw.get("fft_overdrive") else 1
    )
    values = dict(
        feature_size=raw.get("feature_size", d.feature_size),
        sampling_rate=sr,
        frame_length=frame,
        hop_length=hop,
        fft_length=fft,
    )
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{source}: field {key!r}={value!r} should be a positive int")
    floats = {}
    for key in ("min_frequency", "max_frequency", "mel_floor", "preemphasis", "input_scale_factor"):
        value = raw.get(key, getattr(d, key))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"{source}: field {key!r}={value!r} should be a number")
        floats[key] = float(value)
    per_bin = {}
    for key in ("per_bin_mean", "per_bin_stddev"):
        value = raw.get(key)
        if value is not None and len(value) != values["feature_size"]:
            raise UserError(f"{source}: field {key!r} should have feature_size entries")
        per_bin[key] = None if value is None else tuple(float(v) for v in value)
    return LogMelConfig(
        **values,
        **floats,
        **per_bin,
        preemphasis_htk_flavor=bool(raw.get("preemphasis_htk_flavor", True)),
    )


def mel_filters(cfg: LogMelConfig) -> np.ndarray:
    """(fft_length//2 + 1, feature_size) float64 triangular HTK filters, unnormalised (the
    reference's ``mel_filter_bank(..., norm=None, mel_scale="htk")``)."""

    def to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges_mel = np.linspace(
        to_mel(cfg.min_frequency), to_mel(cfg.max_frequency), cfg.feature_size + 2
    )
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    bins = np.linspace(0, cfg.sampling_rate // 2, cfg.fft_length // 2 + 1)
    slopes = edges[None, :] - bins[:, None]  # (bins, edges)
    width = np.diff(edges)
    down = -slopes[:, :-2] / width[:-1]
    up = slopes[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(down, up))


def _hann_periodic(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def _spectrogram(
    samples: np.ndarray, n_real: int, cfg: LogMelConfig, filters: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One padded clip (N,) float32 with n_real real samples -> (F, mel) float32 and (F,) mask."""
    left = cfg.frame_length // 2  # semicausal: frame i is centred on sample i * hop
    x = np.pad(samples * np.float32(cfg.input_scale_factor), (left, 0))
    size = cfg.frame_length + 1
    n_frames = max((len(x) - size) // cfg.hop_length + 1, 0)
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[:: cfg.hop_length][:n_frames]
    if cfg.preemphasis > 0.0:
        p = cfg.preemphasis
        if cfg.preemphasis_htk_flavor:
            frames = np.concatenate(
                [frames[:, :1] * (1.0 - p), frames[:, 1:-1] - p * frames[:, :-2]], axis=-1
            )
        else:
            frames = frames[:, 1:] - p * frames[:, :-1]
    else:
        frames = frames[:, :-1]
    spectrum = np.abs(np.fft.rfft(frames * _hann_periodic(cfg.frame_length), n=cfg.fft_length))
    log_mel = np.log(spectrum @ filters + cfg.mel_floor)  # float64, as the reference
    if cfg.per_bin_mean is not None:
        log_mel = log_mel - np.asarray(cfg.per_bin_mean)
    if cfg.per_bin_stddev is not None:
        log_mel = log_mel / np.asarray(cfg.per_bin_stddev)
    # Real iff the sample one past the frame's 321-sample window is real audio.
    mask = np.arange(n_frames) * cfg.hop_length + size - 1 - left < n_real
    return log_mel.astype(np.float32) * mask[:, None], mask


def log_mel_features(
    clips: list[np.ndarray], cfg: LogMelConfig = LogMelConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz mono clips (each <= 30 s) -> features (B, F, mel) float32 and mask (B, F) bool,
    right-padded to the longest clip rounded up to a multiple of 128 samples."""
    if not clips:
        raise ValueError("log_mel_features needs at least one clip")
    longest = max(len(c) for c in clips)
    if longest > cfg.max_clip_samples:
        raise ValueError(
            f"a clip has {longest} samples, more than {MAX_CLIP_SECONDS} s; use split_clips first"
        )
    length = -(-longest // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    filters = mel_filters(cfg)
    feats, masks = [], []
    for clip in clips:
        clip = np.asarray(clip, dtype=np.float32)
        if clip.ndim != 1:
            raise ValueError(
                f"an audio clip should be a 1-D array of samples, got shape {clip.shape}"
            )
        padded = np.pad(clip, (0, length - len(clip)))
        f, m = _spectrogram(padded, len(clip), cfg, filters)
        feats.append(f)
        masks.append(m)
    return np.stack(feats), np.stack(masks)


def split_clips(samples: np.ndarray, cfg: LogMelConfig = LogMelConfig()) -> list[np.ndarray]:
    """Audio longer than 30 s -> consecutive 30 s clips (the last one shorter); clips too short to
    give one soft token (<= 10 ms at the end) are dropped."""
    n = cfg.max_clip_samples
    clips = [samples[i : i + n] for i in range(0, max(len(samples), 1), n)]
    return [c for c in clips if len(c) > cfg.hop_length] or clips[:1]


def token_count(frame_mask: np.ndarray) -> int:
    """Soft tokens of one clip: its real frames after two stride-2 subsamplings (25 per second)."""
    return int(np.asarray(frame_mask, dtype=bool)[::2][::2].sum())


# ---- decoding -----------------------------------------------------------------------------------


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio file (or a video's soundtrack) -> (N,) float32 mono at ``sample_rate``."""
    import av
    import soxr

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such audio file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise UserError(f"{path}: has no audio stream")
            stream = container.streams.audio[0]
            chunks, rate = [], stream.rate
            for frame in container.decode(stream):
                # (channels, samples) float32 whatever the codec's sample format and layout.
                chunks.append(_frame_to_float(frame))
                rate = frame.sample_rate
    except UserError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable audio file ({e})") from None
    if not chunks:
        raise UserError(f"{path}: contains no audio samples")
    samples = np.concatenate(chunks, axis=1).mean(axis=0)  # downmix: average of the channels
    if rate != sample_rate:
        samples = soxr.resample(samples, rate, sample_rate, quality="VHQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _frame_to_float(frame) -> np.ndarray:
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:  # interleaved (1, samples * channels)
        data = data.reshape(-1, channels).T
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    return data.astype(np.float32, copy=False)


@dataclass(frozen=True)
class AudioInput:
    """Model-ready audio: one row per 30 s clip, in input order, and which input each came from."""

    features: np.ndarray  # (clips, F, mel) float32, transformers' input_features
    mask: np.ndarray  # (clips, F) bool, transformers' input_features_mask
    token_counts: tuple[int, ...]  # soft tokens per clip
    source_index: tuple[int, ...]  # input item each clip belongs to


def prepare_audio(
    items: list[str | Path | np.ndarray], cfg: LogMelConfig = LogMelConfig()
) -> AudioInput:
    """Paths (decoded and resampled) or 16 kHz mono float arrays -> features for the tower."""
    clips, sources = [], []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            samples = load_audio(item, cfg.sampling_rate)
            name = str(item)
        else:
            name = f"audio[{i}]"
            if not np.issubdtype(np.asarray(item).dtype, np.floating):
                raise UserError(
                    f"{name}: an audio array should hold float samples in [-1, 1] at 16 kHz, "
                    f"got dtype {np.asarray(item).dtype}"
                )
            samples = np.asarray(item, dtype=np.float32)
            if samples.ndim != 1:
                raise UserError(
                    f"{name}: an audio array should be 1-D 16 kHz mono samples, got shape "
                    f"{samples.shape}"
                )
        if len(samples) <= cfg.hop_length:
            raise UserError(f"{name}: too short ({len(samples)} samples at 16 kHz) to give a token")
        for clip in split_clips(samples, cfg):
            clips.append(clip)
            sources.append(i)
    features, mask = log_mel_features(clips, cfg)
    return AudioInput(
        features=features,
        mask=mask,
        token_counts=tuple(token_count(m) for m in mask),
        source_index=tuple(sources),
    )


# ---- prompt -------------------------------------------------------------------------------------

AUDIO_PLACEHOLDER = "<|audio|>"  # what the chat template writes for an audio content item


def audio_placeholder(tokenizer: Any, tokens) -> str:
    """The text that tokenizes to the single ``<|audio|>`` id (``tokens``: MediaTokens)."""
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    text = tok.convert_ids_to_tokens(tokens.audio) if tokens.audio is not None else None
    if not text or tok.encode(text, add_special_tokens=False) != [tokens.audio]:
        raise UserError(
            f"the tokenizer has no single token for the audio placeholder id {tokens.audio} "
            "(config.json audio_token_id)"
        )
    return text


def expand_audio_placeholders(
    ids: list[int], audio: AudioInput, audio_id: int, boa_id: int, eoa_id: int
) -> list[int]:
    """Each ``<|audio|>`` id in ``ids`` stands for one input item (in order); it becomes
    ``<|audio>`` + n x ``<|audio|>`` + ``<audio|>`` per 30 s clip of that item (n from the mask,
    as the reference's ``Gemma4Processor.replace_audio_token``)."""
    n_items = len(set(audio.source_index))
    slots = [i for i, t in enumerate(ids) if t == audio_id]
    if len(slots) != n_items:
        raise UserError(
            f"the prompt has {len(slots)} audio placeholder(s) ({AUDIO_PLACEHOLDER}) for "
            f"{n_items} audio input(s)"
        )
    blocks: list[list[int]] = [[] for _ in range(n_items)]
    for source, n in zip(audio.source_index, audio.token_counts):
        blocks[source] += [boa_id] + [audio_id] * n + [eoa_id]
    out, start = [], 0
    for item, slot in enumerate(slots):
        out += ids[start:slot] + blocks[item]
        start = slot + 1
    return out + ids[start:]
