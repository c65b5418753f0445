"""KV-cache memory of real cache objects for Gemma 4's layouts, peak attention memory, and speed.

1. Bytes: for each variant (E2B, E4B, 26B-A4B, 31B) one layer of each kind is built at its real
   shape (kv heads x head dim) and filled with synthetic keys/values to 8K/32K/128K/256K tokens
   (E2B/E4B to 128K); ``nbytes`` of the real cache object (allocated arrays, growth slack and the
   exact recent-token window included) is multiplied by the number of cache-owning layers of that
   kind (KV-shared consumer layers own none). Settings: bf16 (mlx-lm KVCache), mlx-lm affine 8/4
   bit (QuantizedKVCache), TurboQuant 2.5 (the default)/3/3.5/4 code bits (K/V splits of
   gemma4_mlx.cache), with the default 4 first and 32 recent tokens exact (bf16), the centring
   means and 4 key channel tiers (one float16 norm each), the previous default (3.25: K4.5/V2,
   one rotation and one norm) and 3.5 bits with no exact tokens, centring or tiers. Sliding
   layers keep a bf16 ring buffer.
2. Peak: for the 31B global-layer shape (32 q heads, 4 kv heads, head dim 512), growth of
   ``mx.get_peak_memory()`` beyond the cache during one decode step (32K and 128K cached tokens)
   and one 512-token prefill chunk (8K and 32K), TurboQuant vs mlx-lm's quantized path.
3. Speed: decode-step attention time at 8K/32K/128K for TurboQuant vs float32 SDPA vs mlx-lm's
   quantized attention, as ratios to SDPA in the same run.

    python benchmarks/memory.py           # writes benchmarks/results/memory.{json,png}
    python benchmarks/memory.py --quick   # E2B at 8K only, seconds
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser
from gemma4_mlx.cache import DEFAULT_BITS, KVPolicy
from gemma4_mlx.kv.cache import TurboQuantKVCache
from turboquant.attention import attention as tq_attention
from turboquant.codec import CodecSpec

GiB = 2**30
K = 1024


@dataclass(frozen=True)
class Layout:
    name: str
    global_layers: int  # cache-owning global layers
    sliding_layers: int  # cache-owning sliding layers
    kv_global: int
    kv_sliding: int
    window: int
    max_context: int
    head_global: int = 512
    head_sliding: int = 256


# Cache-owning layers, from the released configs (E2B, E4B, 26B-A4B, 31B config.json) (KV-shared consumers own no cache):
# E2B: 35 layers (4 sliding + 1 full) x 7, last 20 shared -> layers 0..14 own: 3 global, 12 sliding.
# E4B: 42 layers (5+1) x 7, last 18 shared -> layers 0..23 own: 4 global, 20 sliding.
LAYOUTS = [
    Layout("E2B", 3, 12, 1, 1, 512, 128 * K),
    Layout("E4B", 4, 20, 2, 2, 512, 128 * K),
    Layout("26B-A4B", 5, 25, 2, 8, 1024, 256 * K),
    Layout("31B", 10, 50, 4, 16, 1024, 256 * K),
]
CONTEXTS = [8 * K, 32 * K, 128 * K, 256 * K]


def settings() -> dict[str, KVPolicy | None]:
    out: dict[str, KVPolicy | None] = {"bf16": None}
    out["affine8"] = KVPolicy("affine", bits=8)
    out["affine4"] = KVPolicy("affine", bits=4)
    for bits in sorted({2.5, 3.0, DEFAULT_BITS, 3.5, 4.0}):  # default sink, window, centring, tiers
        out[f"tq{bits:g}"] = KVPolicy("turboquant", bits=bits)
    out["tq3.25-t0"] = KVPolicy("turboquant", bits=3.25, key_tiers=0)  # the previous default
    out["tq3.5-nowin"] = KVPolicy("turboquant", bits=3.5, fp_window=0, sink=0, center=0)
    return out


def make_global_cache(policy: KVPolicy | None, head_dim: int):
    if policy is None:
        return KVCache()
    if policy.kind == "affine":
        return QuantizedKVCache(group_size=64, bits=int(policy.resolved_bits()[0]))
    kb, vb = policy.resolved_bits()
    return TurboQuantKVCache(
        CodecSpec(head_dim, kb),
        CodecSpec(head_dim, vb),
        fp_window=policy.fp_window,
        sink=policy.sink,
        center=policy.center,
        center_block=policy.center_block,
        key_tiers=policy.tiers_for(head_dim),
        exact_dtype=mx.bfloat16,  # the synthetic keys are float32; a bf16 model stores bf16
    )


def fill(cache, n_tokens: int, n_kv: int, head_dim: int, chunk: int = 4096, seed: int = 0) -> None:
    key = mx.random.key(seed)
    done = cache.offset
    while done < n_tokens:
        n = min(chunk, n_tokens - done)
        key, k1, k2 = mx.random.split(key, 3)
        keys = mx.random.normal((1, n_kv, n, head_dim), key=k1).astype(mx.bfloat16)
        values = mx.random.normal((1, n_kv, n, head_dim), key=k2).astype(mx.bfloat16)
        cache.update_and_fetch(keys, values)
        mx.eval(cache.state)  # everything the cache holds, whatever its kind
        done += n


def sliding_bytes(layout: Layout, context: int) -> int:
    cache = RotatingKVCache(max_size=layout.window)
    fill(cache, min(context, layout.window + 1), layout.kv_sliding, layout.head_sliding, chunk=1)
    return cache.nbytes


def memory_table(layouts: list[Layout], contexts: list[int]) -> list[dict]:
    rows = []
    for layout in layouts:
        ctxs = [c for c in contexts if c <= layout.max_context]
        sliding = sliding_bytes(layout, ctxs[-1]) * layout.sliding_layers
        for name, policy in settings().items():
            cache = make_global_cache(policy, layout.head_global)
            t0 = time.perf_counter()
            for ctx in ctxs:
                fill(cache, ctx, layout.kv_global, layout.head_global)
                per_layer = cache.nbytes
                global_bytes = per_layer * layout.global_layers
                channels = 2 * layout.kv_global * layout.head_global * ctx  # K and V
                rows.append(
                    {
                        "variant": layout.name,
                        "setting": name,
                        "context": ctx,
                        "global_bytes": global_bytes,
                        "sliding_bytes": sliding,
                        "total_bytes": global_bytes + sliding,
                        "stored_bits_per_channel": per_layer * 8 / channels,
                        "describe": policy.describe() if policy else "bf16",
                    }
                )
                print(
                    f"{layout.name:8s} {name:12s} {ctx // K:4d}K  global {global_bytes / GiB:7.3f} GiB  "
                    f"(+ sliding {sliding / GiB:.3f})  {per_layer * 8 / channels:6.3f} bits/channel",
                    flush=True,
                )
            del cache
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    for row in rows:
        base = next(
            r
            for r in rows
            if r["variant"] == row["variant"]
            and r["context"] == row["context"]
            and r["setting"] == "bf16"
        )
        row["ratio_to_bf16_global"] = base["global_bytes"] / row["global_bytes"]
    return rows


def _peak_growth(fn) -> float:
    mx.eval(fn())  # warm up (compilation, codebooks)
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn())
    return (mx.get_peak_memory() - before) / 2**20


def _cases(q, kv, q_keys, q_values, keys, values, mask, length) -> dict:
    """The three attention paths over the same context, as thunks."""
    affine_mask = None if mask is None else mask[:, :length]
    return {
        "turboquant": lambda: tq_attention(q, *kv, scale=1.0),
        "mlx-lm affine4": lambda: quantized_scaled_dot_product_attention(
            q, q_keys, q_values, scale=1.0, mask=affine_mask, group_size=64, bits=4
        ),
        "fp32 sdpa": lambda: mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0),
    }


def peak_and_speed(quick: bool) -> list[dict]:
    n_q, n_kv, hd = 32, 4, 512
    rows = []
    lengths = [8 * K] if quick else [8 * K, 32 * K, 128 * K]
    tq = make_global_cache(KVPolicy("turboquant"), hd)  # the default
    aff = QuantizedKVCache(group_size=64, bits=4)
    for length in lengths:
        fill(tq, length, n_kv, hd, seed=1)
        fill(aff, length, n_kv, hd, seed=1)
        keys = mx.random.normal((1, n_kv, length, hd)).astype(mx.float32)
        values = mx.random.normal((1, n_kv, length, hd)).astype(mx.float32)
        mx.eval(keys, values)
        kv = tq.update_and_fetch(*(mx.random.normal((1, n_kv, 1, hd)),) * 2)
        q_keys, q_values = aff.keys, aff.values
        q_keys = tuple(a[..., : aff.offset, :] for a in q_keys)
        q_values = tuple(a[..., : aff.offset, :] for a in q_values)
        for L in (1, 512) if length <= 32 * K else (1,):
            q = mx.random.normal((1, n_q, L, hd))
            mask = None if L == 1 else mx.ones((L, length + 1), dtype=mx.bool_)
            cases = _cases(q, kv, q_keys, q_values, keys, values, mask, length)
            for name, fn in cases.items():
                if L > 1 and length > 32 * K and name != "turboquant":
                    continue
                growth = _peak_growth(fn)
                times = []
                for _ in range(3 if L == 1 else 1):
                    t0 = time.perf_counter()
                    mx.eval(fn())
                    times.append(time.perf_counter() - t0)
                rows.append(
                    {
                        "context": length,
                        "query_tokens": L,
                        "method": name,
                        "peak_growth_mib": growth,
                        "seconds": min(times),
                    }
                )
                print(
                    f"{length // K:4d}K q={L:3d} {name:15s} peak growth {growth:8.1f} MiB  "
                    f"{min(times) * 1e3:8.1f} ms",
                    flush=True,
                )
        del keys, values
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["context"] == row["context"]
                and r["query_tokens"] == row["query_tokens"]
                and r["method"] == "fp32 sdpa"
            ),
            None,
        )
        row["time_ratio_to_sdpa"] = row["seconds"] / base["seconds"] if base else None
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v.name for v in LAYOUTS if any(r["variant"] == v.name for r in rows)]
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.8), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for setting in settings():
            pts = [
                (r["context"] // K, r["total_bytes"] / GiB)
                for r in rows
                if r["variant"] == variant and r["setting"] == setting
            ]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "o-", label=setting)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{variant}: whole-model KV")
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("GiB")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    layouts = LAYOUTS[:1] if args.quick else LAYOUTS
    contexts = CONTEXTS[:1] if args.quick else CONTEXTS
    rows = memory_table(layouts, contexts)
    peaks = peak_and_speed(args.quick)
    checks = []
    default = f"tq{DEFAULT_BITS:g}"
    for r in rows:
        if r["variant"] == "31B" and r["context"] == 256 * K and r["setting"] == default:
            checks += [
                {
                    "check": "31B@256K TurboQuant default global KV <= 4.5 GiB",
                    "value_gib": r["global_bytes"] / GiB,
                    "ok": r["global_bytes"] <= 4.5 * GiB,
                },
                {
                    "check": "31B@256K TurboQuant default whole-model KV <= 5.3 GiB",
                    "value_gib": r["total_bytes"] / GiB,
                    "ok": r["total_bytes"] <= 5.3 * GiB,
                },
            ]
        if r["setting"] == default and r["context"] >= 128 * K:
            checks.append(
                {
                    "check": f"{r['variant']}@{r['context'] // K}K TurboQuant default <= 1/4.4 of bf16 (global)",
                    "ratio": r["ratio_to_bf16_global"],
                    "ok": r["ratio_to_bf16_global"] >= 4.4,
                }
            )
    for p in peaks:
        if p["method"] == "turboquant":
            checks.append(
                {
                    "check": f"TurboQuant peak growth < 256 MiB at {p['context'] // K}K, q={p['query_tokens']}",
                    "value_mib": p["peak_growth_mib"],
                    "ok": p["peak_growth_mib"] < 256,
                }
            )
    for c in checks:
        print(("PASS " if c["ok"] else "FAIL ") + c["check"])
    args.out.mkdir(parents=True, exist_ok=True)
    name = "memory_quick" if args.quick else "memory"
    (args.out / f"{name}.json").write_text(
        json.dumps({"memory": rows, "attention": peaks, "checks": checks}, indent=1)
    )
    plot(rows, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()
