"""Attention alone, one decode query over T cached keys: how each KV representation reads.

Shapes: Gemma 4 31B's global layers (32 query heads, 4 kv heads, head dim 512) and the demo's
(Gemma 3 270M: 4 query heads, 1 kv head, head dim 256), T = 4K, 16K, 64K keys (the 31B shape's
float32 K/V at 64K are 1 GiB). Keys have a per-channel scale decaying over the channels plus an
offset (what tiers and centring are for), values are isotropic; float32 throughout.

Methods (each a function of the query only, the cache filled before timing):
- ``sdpa_fp32``: ``mx.fast.scaled_dot_product_attention`` on float32 K/V: the baseline (mlx-lm's
  exact cache path). On the CPU it runs GQA decode as one matrix-vector product per query head;
- ``grouped_fp32``: the same exact attention as one matmul per kv head with its query heads as
  rows (``gemma4_mlx.models.attention.grouped_attention``);
- ``affine4``: mlx-lm's ``quantized_scaled_dot_product_attention`` over its 4-bit group-64 cache;
- ``tq_lloyd``: TurboQuant K3/V2, 4 key tiers, Lloyd-Max codes (the previous default),
  decoded block by block;
- ``tq_uniform``: the default, K3.125/V2 with uniform-grid codes read by
  ``mx.quantized_matmul``;
- ``tq_uniform_dequant`` (demo shape): uniform codes dequantized per block, then BLAS.
Rounds are interleaved (every method once per round, in turn) and each ratio is the median of
the per-round time ratios to ``sdpa_fp32``, so a slower moment of the shared CPU falls on all.

Bytes read per token and layer, next to bfloat16 K/V: codes + norms (+ scales/biases for affine)
and, for TurboQuant, the exact sink/window tokens (bfloat16) and centring means amortised over T.
A check compares each TurboQuant uniform path with its float decode reference (1e-4 relative).

    python benchmarks/attention.py           # both shapes, 4K/16K/64K (~6 min here)
    python benchmarks/attention.py --quick   # demo shape, 1K keys, 2 rounds (seconds, for CI)
    (also: gemma4-mlx bench attention [options])
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser, positive_ints
from gemma4_mlx.bench.common import write_json
from gemma4_mlx.models.attention import grouped_attention
from turboquant.attention import attention as tq_attention
from turboquant.codec import CodecSpec
from turboquant.stream import CompressedStream, Layout

SHAPES = {"31b-global": (32, 4, 512), "demo": (4, 1, 256)}  # (q heads, kv heads, head dim)
LAYOUT = Layout(sink=4, fp_window=32, max_rewind=16, center=128, center_block=512)
# the default TurboQuant setting (uniform grid: K3.125) and the previous one (Lloyd-Max: K3)
KEY_BITS = {"uniform": 3.125, "lloyd": 3}
VALUE_BITS, KEY_TIERS = 2, 4
EXACT_BYTES = 2  # exact TurboQuant tokens as bfloat16, as on a Mac


def _keys_values(T: int, n_kv: int, D: int, seed: int) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(seed)
    scale = np.exp(-3.0 * np.arange(D) / D).astype(np.float32)
    k = rng.standard_normal((1, n_kv, T, D), dtype=np.float32) * scale + 0.3 * scale
    v = rng.standard_normal((1, n_kv, T, D), dtype=np.float32)
    return mx.array(k), mx.array(v)


def _streams(k: mx.array, v: mx.array, grid: str):
    D = k.shape[-1]
    keys = CompressedStream(CodecSpec(D, KEY_BITS[grid], grid=grid), LAYOUT, KEY_TIERS, mx.bfloat16)
    values = CompressedStream(CodecSpec(D, VALUE_BITS, grid=grid), LAYOUT, 0, mx.bfloat16)
    for a in range(0, k.shape[2], 4096):  # as a chunked prefill fills them
        kv, vv = keys.append(k[:, :, a : a + 4096]), values.append(v[:, :, a : a + 4096])
        mx.eval(keys.codes.arrays(), values.codes.arrays(), keys.tail, values.tail)
    return keys, values, kv, vv


def _tq_bytes(stream: CompressedStream) -> float:
    """Bytes attention reads for the stream's T tokens: live codes and norms, the exact sink
    and window (bfloat16), the means."""
    live = stream.n_quantized - stream.n_sink
    capacity = stream.codes.norms.shape[-1]
    codes = stream.codes.nbytes * live / capacity
    exact = (stream.n_sink + stream.offset - stream.n_quantized) * stream.spec.dim * EXACT_BYTES
    B, H = stream.tail.shape[:2]
    means = stream.means.size * EXACT_BYTES
    return codes + (exact * B * H) + means


def _methods(q: mx.array, k: mx.array, v: mx.array, name: str, scale: float) -> dict:
    """{method: (call, bytes per token)} for one shape and length."""
    B, n_kv, T, D = k.shape
    methods = {
        "sdpa_fp32": (lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), None),
        "grouped_fp32": (lambda: grouped_attention(q, k, v, scale=scale, mask=None), None),
    }
    qk = mx.quantize(k, group_size=64, bits=4)
    qv = mx.quantize(v, group_size=64, bits=4)
    mx.eval(qk, qv)
    methods["affine4"] = (
        lambda: quantized_scaled_dot_product_attention(
            q, qk, qv, scale=scale, mask=None, group_size=64, bits=4
        ),
        sum(a.nbytes for a in (*qk, *qv)) / T,
    )
    for grid in ("lloyd", "uniform"):
        keys, values, kv, vv = _streams(k, v, grid)
        per_token = (_tq_bytes(keys) + _tq_bytes(values)) / T
        reads = ["decode"] if grid == "lloyd" else ["qmm", "dequant"]
        for read in reads:
            if read == "dequant" and name != "demo":
                continue

            def call(kv=kv, vv=vv, read=read):
                return tq_attention(q, kv, vv, scale=scale, read=read)

            label = (
                "tq_lloyd"
                if grid == "lloyd"
                else f"tq_uniform{'' if read == 'qmm' else '_dequant'}"
            )
            methods[label] = (call, per_token)
        if grid == "uniform":
            methods["_uniform_reference"] = (
                lambda kv=kv, vv=vv: tq_attention(q, kv, vv, scale=scale, read="decode"),
                None,
            )
    return methods


def _time(call, repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        mx.eval(call())
    return (time.perf_counter() - t0) / repeat


def measure(name: str, T: int, rounds: int) -> dict:
    n_q, n_kv, D = SHAPES[name]
    k, v = _keys_values(T, n_kv, D, seed=T)
    q = mx.array(np.random.default_rng(1).standard_normal((1, n_q, 1, D), dtype=np.float32))
    scale = D**-0.5
    methods = _methods(q, k, v, name, scale)
    reference = methods.pop("_uniform_reference")[0]()
    checks = []
    for label in ("tq_uniform", "tq_uniform_dequant"):
        if label in methods:
            out = methods[label][0]()
            rel = float(mx.max(mx.abs(out - reference)) / mx.max(mx.abs(reference)))
            checks.append({"check": f"{name} T={T} {label} = decode reference (1e-4 rel)",
                           "ok": rel < 1e-4, "rel": rel})  # fmt: skip
    repeat = max(1, min(20, (1 << 22) // (T * n_q)))  # short calls: several per timing
    for call, _ in methods.values():  # warm-up
        mx.eval(call())
    times = {label: [] for label in methods}
    for _ in range(rounds):
        for label, (call, _) in methods.items():
            times[label].append(_time(call, repeat))
    base = times["sdpa_fp32"]
    bf16 = 2 * n_kv * D * 2  # K and V, bfloat16
    rows = {}
    for label, (_, per_token) in methods.items():
        rows[label] = {
            "ms": 1000 * statistics.median(times[label]),
            "speed_vs_sdpa_fp32": statistics.median(b / t for b, t in zip(base, times[label])),
            "bytes_per_token": bf16 * 2 if per_token is None else per_token,  # fp32: 2x bf16
            "bytes_vs_bf16": (2.0 if per_token is None else per_token / bf16),
        }
    return {"rows": rows, "checks": checks, "bf16_bytes_per_token": bf16, "repeat": repeat}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="demo shape, 1K keys, 2 rounds")
    ap.add_argument("--lengths", type=positive_ints, help="keys, e.g. 4096,16384,65536")
    ap.add_argument("--shapes", default=None, help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    shapes = (args.shapes or ("demo" if args.quick else ",".join(SHAPES))).split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    lengths = args.lengths or ([1024] if args.quick else [4096, 16384, 65536])
    rounds = args.rounds or (2 if args.quick else 5)
    name = "attention_quick" if args.quick else "attention"
    payload = {"shapes": {s: SHAPES[s] for s in shapes}, "lengths": lengths, "rounds": rounds,
               "setting": f"K{KEY_BITS['uniform']:g} uniform / K{KEY_BITS['lloyd']:g} Lloyd-Max, "
                          f"V{VALUE_BITS}, {KEY_TIERS} key tiers, {LAYOUT}",
               "results": {}, "checks": []}  # fmt: skip
    t0 = time.perf_counter()
    for shape in shapes:
        for T in lengths:
            result = measure(shape, T, rounds)
            payload["results"].setdefault(shape, {})[str(T)] = result["rows"]
            payload["checks"] += result["checks"]
            for label, row in result["rows"].items():
                print(f"{shape} T={T} {label}: {row['ms']:.2f} ms, "
                      f"{row['speed_vs_sdpa_fp32']:.2f}x sdpa_fp32, "
                      f"{row['bytes_vs_bf16']:.3f}x bf16 bytes")  # fmt: skip
            payload["seconds"] = time.perf_counter() - t0
            write_json(args.out, name, payload)
            _plot(payload, args.out / f"{name}.png")
    for c in payload["checks"]:
        print(("PASS " if c["ok"] else "FAIL ") + c["check"] + f" ({c['rel']:.1e})")
    print(f"wrote {args.out / name}.json and .png")
    if not all(c["ok"] for c in payload["checks"]):
        raise SystemExit(1)


def _plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(payload["results"])
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5 * (len(shapes) + 1), 4))
    axes = np.atleast_1d(axes)
    for ax, shape in zip(axes, shapes):
        by_T = payload["results"][shape]
        Ts = sorted(by_T, key=int)
        for label in by_T[Ts[0]]:
            ax.plot([int(t) for t in Ts], [by_T[t][label]["speed_vs_sdpa_fp32"] for t in Ts],
                    "o-", label=label)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("keys")
        ax.set_ylabel("speed vs fp32 SDPA (higher is faster)")
        ax.set_title(f"{shape} {tuple(payload['shapes'][shape])}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    shape = shapes[0]
    T = max(payload["results"][shape], key=int)
    rows = payload["results"][shape][T]
    labels = [lb for lb in rows if lb != "grouped_fp32"]
    axes[-1].bar(labels, [rows[lb]["bytes_vs_bf16"] for lb in labels])
    axes[-1].axhline(1.0, color="k", lw=0.5)
    axes[-1].set_ylabel("bytes read per token / bf16 K+V")
    axes[-1].set_title(f"{shape}, {T} keys")
    axes[-1].tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
