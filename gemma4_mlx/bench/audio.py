"""Audio input cost: log-mel feature extraction and the audio tower, per 10 s of audio.

The tower has the real E2B/E4B shape (transformers' Gemma4AudioConfig defaults, which are the
released values: 12 conformer layers, hidden 1024, 8 heads, subsampling channels 128/32, output
1536) plus ``embed_audio`` into E4B's text width 2560, with random weights (timing and memory do
not depend on the values). The signal is a deterministic voiced tone with noise; feature
extraction includes the split into 30 s clips. Peak memory is ``mx.get_peak_memory()`` during
the tower call, less what was allocated before it (the weights).

    python benchmarks/audio.py            # 10 s and 30 s, float32 and bfloat16, 3 runs each
    python benchmarks/audio.py --quick    # 2 s, float32, 1 run (CI smoke; numbers per 10 s)
    python benchmarks/audio.py --seconds 10 --dtypes bfloat16 --name audio_bf16
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser
from gemma4_mlx.bench.common import write_json
from gemma4_mlx.media.audio import SAMPLE_RATE, prepare_audio
from gemma4_mlx.models.audio import AudioConfig, AudioModel, audio_soft_tokens
from gemma4_mlx.models.vision import MultimodalEmbedder

E4B_TEXT_HIDDEN = 2560


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.7 * t)) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    return (0.1 * voiced + 0.01 * rng.normal(size=t.shape)).astype(np.float32)


def build_tower(dtype: mx.Dtype) -> tuple[AudioModel, nn.Module]:
    cfg = AudioConfig()
    tower = AudioModel(cfg)
    embedder = MultimodalEmbedder(cfg.output_proj_dims, E4B_TEXT_HIDDEN, cfg.rms_norm_eps)
    for module in (tower, embedder):
        module.set_dtype(dtype)
        mx.eval(module.parameters())
    return tower, embedder


def measure(seconds: float, dtype_name: str, runs: int) -> dict:
    dtype = getattr(mx, dtype_name)
    tower, embedder = build_tower(dtype)
    samples = signal(seconds)
    extract, encode, peaks = [], [], []
    for _ in range(runs + 1):  # the first run warms up (compilation, allocator)
        t0 = time.perf_counter()
        prepared = prepare_audio([samples])
        t1 = time.perf_counter()
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        t2 = time.perf_counter()
        tokens = audio_soft_tokens(
            tower, embedder, mx.array(prepared.features), mx.array(prepared.mask)
        )
        mx.eval(tokens)
        t3 = time.perf_counter()
        peaks.append((mx.get_peak_memory() - before) / 2**20)
        extract.append(t1 - t0)
        encode.append(t3 - t2)
    per10 = 10.0 / seconds
    weights = sum(v.nbytes for _, v in tree_flatten(tower.parameters()))
    row = {
        "seconds": seconds,
        "dtype": dtype_name,
        "clips": len(prepared.token_counts),
        "soft_tokens": int(sum(t.shape[0] for t in tokens)),
        "feature_s_per_10s": float(np.median(extract[1:]) * per10),
        "tower_s_per_10s": float(np.median(encode[1:]) * per10),
        "tower_realtime_factor": float(np.median(encode[1:]) / seconds),
        "tower_peak_mib": float(max(peaks[1:])),
        "tower_weight_mib": weights / 2**20,
    }
    print(
        f"{seconds:>5.0f} s {dtype_name:>8}: features {row['feature_s_per_10s'] * 1e3:7.1f} ms/10 s, "
        f"tower {row['tower_s_per_10s']:.3f} s/10 s (RTF {row['tower_realtime_factor']:.3f}), "
        f"peak +{row['tower_peak_mib']:.0f} MiB over {row['tower_weight_mib']:.0f} MiB of weights",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", default="10,30", help="audio durations, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--name", default="audio", help="result file name (without .json)")
    args = ap.parse_args(argv)
    durations = [2.0] if args.quick else [float(s) for s in args.seconds.split(",")]
    dtypes = ["float32"] if args.quick else args.dtypes.split(",")
    runs = 1 if args.quick else args.runs
    rows = [measure(s, d, runs) for d in dtypes for s in durations]
    payload = {
        "benchmark": "audio",
        "tower": "E2B/E4B audio tower (random weights) + embed_audio to 2560",
        "device": str(mx.default_device()),
        "machine": platform.platform(),
        "quick": args.quick,
        "rows": rows,
    }
    path = write_json(args.out, "audio_quick" if args.quick else args.name, payload)
    print(f"wrote {path}")
