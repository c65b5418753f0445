"""KV-cache memory of real cache objects for Gemma 4's released layouts, and peak attention memory.

1. Bytes. Each variant's layer plan comes from its config facts (``gemma4_mlx.variants``: E2B,
   E4B, 26B-A4B, 31B, parsed by ``parse_config``), and its caches from the model's own cache
   plan (``gemma4_mlx.cache.make_layer_cache`` with the setting's policy): one cache of each
   layer kind, the first cache-owning sliding and global layer, is built and filled with
   synthetic bfloat16 keys/values (bf16 storage, as on a Mac), and its ``nbytes`` (allocated
   arrays: growth slack, exact tokens, means and rewind copies included) is multiplied by the
   number of cache-owning layers of that kind (KV-shared consumer layers own none). Global
   layers are filled in 4096-token chunks to 8K/32K/128K/256K (up to the variant's max
   context). Sliding layers get the model's SlidingKVCache whatever the setting, filled as
   ``generate`` prefills (512-token chunks): the window - 1 + max_rewind tokens it keeps, the
   chunk being written and its growth step. Settings: bf16 (the exact cache, mlx-lm's KVCache),
   mlx-lm affine 8/4 bit (QuantizedKVCache), TurboQuant at 2.5 (the default)/3/3.5/4 average
   code bits (K/V splits of gemma4_mlx.cache) with the default sink 4, window 32, centring and
   4 key channel tiers, the default without exact trims (``rewind=0``), the previous default
   (3.25: K4.5/V2, one rotation) and 3.5 bits with no exact tokens or centring.
2. Peak. At the 31B global-layer shape (32 q heads, 4 kv heads, head dim 512): growth of
   ``mx.get_peak_memory()`` beyond the cache during one decode step (8K/32K/128K cached tokens)
   and one 512-token prefill chunk (8K/32K; mlx-lm affine at 8K only), through the cache's own ``update_and_fetch`` and
   the model's attention entry (``gemma4_mlx.models.attention.attend``): the exact cache
   (fused SDPA), mlx-lm affine 4 and the default TurboQuant (exact tokens bf16). Queries and
   keys are float32 here, as the model runs on this CPU build (MLX's CPU bfloat16 matmuls are
   far too slow); on a Mac in bf16 the transients are about half. (Attention time is the attention
   benchmark's, ``gemma4_mlx/bench/attention.py``.)

    python benchmarks/memory.py           # writes benchmarks/results/memory.{json,png}
    python benchmarks/memory.py --quick   # E2B at 8K, decode peak at 8K (about a minute)
    python benchmarks/memory.py --variants 31B --contexts 8192,262144   # a reduced run
    (also: gemma4-mlx bench memory [options])
Results are rewritten after each setting of each variant, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser, positive_ints
from gemma4_mlx.bench.common import (
    EXACT,
    choose,
    default_policy,
    describe,
    lloyd_policy,
    named,
    result_name,
    setting_name,
    settings_help,
    write_results,
)
from gemma4_mlx.cache import DEFAULT_BITS, KVPolicy, cache_layers, make_layer_cache
from gemma4_mlx.config import LayerSpec, TextConfig
from gemma4_mlx.models.attention import attend
from gemma4_mlx.variants import VARIANTS, variant_config

GiB = 2**30
K = 1024
CONTEXTS = [8 * K, 32 * K, 128 * K, 256 * K]
FILL_CHUNK = 4096  # global layers (the stored bytes do not depend on it)
PREFILL_CHUNK = 512  # as generate prefills: what a sliding ring holds depends on it
# mlx-lm's quantized attention materialises the scores: its 512-token prefill chunk takes ~3 min
# at 8K on this CPU and grows with the context, so it is measured at 8K only
AFFINE_PREFILL_MAX = 8 * K
BASELINE = "bf16"  # the exact cache, holding bfloat16 keys/values


def _tq(bits: float | None, **options) -> KVPolicy:
    """A TurboQuant policy with the benchmarks' bfloat16 exact tokens (``bits`` None: the
    default's bits)."""
    return KVPolicy("turboquant", bits=bits, exact_dtype=EXACT, **options)


# command-line aliases of the settings (result names: common.setting_name, the exact one bf16)
ALIASES = {
    "bf16": KVPolicy(),  # the exact cache (the baseline: always run)
    "affine8": KVPolicy("affine", bits=8),
    "affine4": KVPolicy("affine", bits=4),
    "tq": default_policy(),  # K3.125/V2, uniform grid
    "tq-lloyd": lloyd_policy(),  # the previous default: K3/V2, Lloyd-Max codes
    **{f"tq{b:g}": _tq(b) for b in sorted({2.5, 3.0, DEFAULT_BITS, 3.5, 4.0})},
    "tq-rewind0": _tq(None, max_rewind=0),  # the default without exact trims
    "tq3.25-t0": _tq(3.25, key_tiers=0),  # the previous default: one rotation, one norm
    "tq3.5-nowin": _tq(3.5, fp_window=0, sink=0, center=0),
}
PEAK_SETTINGS = named(KVPolicy(), ALIASES["affine4"], default_policy())  # exact: fp32


# -- filling real caches ------------------------------------------------------------------------
def fill(
    cache, n_tokens: int, spec: LayerSpec, chunk: int, seed: int = 0, dtype=mx.bfloat16
) -> None:
    """Append synthetic keys/values (1, kv heads, n, head dim) until the cache holds
    ``n_tokens``, evaluating everything it holds after each chunk (as a prefill does)."""
    key = mx.random.key(seed + cache.offset)
    while cache.offset < n_tokens:
        n = min(chunk, n_tokens - cache.offset)
        key, k1, k2 = mx.random.split(key, 3)
        shape = (1, spec.n_kv_heads, n, spec.head_dim)
        keys = mx.random.normal(shape, key=k1).astype(dtype)
        values = mx.random.normal(shape, key=k2).astype(dtype)
        cache.update_and_fetch(keys, values)
        mx.eval(cache.state)


def layer_kinds(config: TextConfig) -> dict[str, tuple[LayerSpec, int]]:
    """{"sliding" | "global": (the first cache-owning layer of that kind, how many own one)},
    from the model's cache plan."""
    owners = cache_layers(config)
    out = {}
    for kind, sliding in (("sliding", True), ("global", False)):
        same = [s for s in owners if s.is_sliding == sliding]
        if same:
            out[kind] = (same[0], len(same))
    return out


def sliding_bytes(config: TextConfig, context: int) -> int:
    """All sliding layers' bytes at ``context`` tokens (the same for every global setting)."""
    spec, count = layer_kinds(config)["sliding"]
    cache = make_layer_cache(config, spec, KVPolicy())
    # three chunks past the window reach the ring's steady size
    fill(cache, min(context, config.sliding_window + 4 * PREFILL_CHUNK), spec, PREFILL_CHUNK)
    return cache.nbytes * count


def variant_rows(variant: str, settings: dict, contexts: list[int]):
    """Yields each setting's rows (one per context) of one variant, the baseline's first."""
    config = variant_config(variant)
    spec, count = layer_kinds(config)["global"]
    contexts = [c for c in contexts if c <= config.max_position_embeddings]
    sliding = {c: sliding_bytes(config, c) for c in contexts}
    base: dict[int, int] = {}  # context -> the baseline's global bytes
    for name, policy in settings.items():
        rows = []
        cache = make_layer_cache(config, spec, policy)
        t0 = time.perf_counter()
        for context in contexts:
            fill(cache, context, spec, FILL_CHUNK)
            channels = 2 * spec.n_kv_heads * spec.head_dim * context  # K and V, one layer
            rows.append(
                {
                    "variant": variant,
                    "setting": name,
                    "context": context,
                    "global_layers": count,
                    "global_bytes": cache.nbytes * count,
                    "sliding_bytes": sliding[context],
                    "total_bytes": cache.nbytes * count + sliding[context],
                    "stored_bits_per_channel": cache.nbytes * 8 / channels,
                }
            )
            r = rows[-1]
            base.setdefault(context, r["global_bytes"])
            r["ratio_to_bf16_global"] = base[context] / r["global_bytes"]
            print(
                f"{variant:8s} {name[:60]:60s} {context // K:4d}K  global "
                f"{r['global_bytes'] / GiB:7.3f} GiB (+ sliding {r['sliding_bytes'] / GiB:.3f})"
                f"  {r['stored_bits_per_channel']:6.3f} bits/channel",
                flush=True,
            )
        del cache
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        yield rows


# -- peak memory through the model's attention entry ------------------------------------------
def _peak_growth(fn) -> float:
    """MiB the process peak rises above what is allocated while ``fn()`` is evaluated."""
    mx.eval(fn())  # warm up (compilation, codebooks)
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn())
    return (mx.get_peak_memory() - before) / 2**20


def attention_peak(cache, queries: mx.array, new: mx.array) -> float:
    """Peak growth (MiB) of the attention of ``queries`` (B, heads, L, D) after appending
    ``new`` (B, kv heads, L, D) as keys and values, as the model's attention layer does it."""
    mask = create_attention_mask(queries.swapaxes(1, 2), cache)  # (B, L, ...): its L
    keys, values = cache.update_and_fetch(new, new)
    return _peak_growth(lambda: attend(queries, keys, values, scale=1.0, mask=mask, cache=cache))


def attention_peaks(settings: dict, contexts: list[int], prefill_contexts: list[int]) -> list:
    """Peak growth of one decode step and one 512-token prefill chunk at the 31B global layer."""
    config = variant_config("31B")
    spec, _ = layer_kinds(config)["global"]
    n_heads = config.num_attention_heads
    rows = []
    for name, policy in settings.items():
        cache = make_layer_cache(config, spec, policy)
        for context in contexts:
            fill(cache, context, spec, FILL_CHUNK, seed=1, dtype=mx.float32)
            prefill = context in prefill_contexts and (
                policy.kind != "affine" or context <= AFFINE_PREFILL_MAX
            )
            for L in (1, PREFILL_CHUNK) if prefill else (1,):
                queries = mx.random.normal((1, n_heads, L, spec.head_dim))  # float32
                new = mx.random.normal((1, spec.n_kv_heads, L, spec.head_dim))
                cached = cache.offset
                growth = attention_peak(cache, queries, new)
                rows.append(
                    {
                        "setting": name,
                        "context": context,
                        "cached_tokens": cached,
                        "query_tokens": L,
                        "peak_growth_mib": growth,
                    }
                )
                print(
                    f"peak {name[:50]:50s} {context // K:4d}K q={L:3d}: {growth:8.1f} MiB",
                    flush=True,
                )
        del cache
    return rows


def checks(rows: list[dict], peaks: list[dict]) -> list[dict]:
    """The README's claims, checked on this run's numbers."""
    default = setting_name(default_policy())
    out = []
    for r in rows:
        if r["setting"] != default:
            continue
        if r["variant"] == "31B" and r["context"] == 256 * K:
            out.append(
                {
                    "check": "31B@256K TurboQuant default global KV <= 4.5 GiB",
                    "value_gib": r["global_bytes"] / GiB,
                    "ok": r["global_bytes"] <= 4.5 * GiB,
                }
            )
        if r["context"] >= 128 * K:
            out.append(
                {
                    "check": f"{r['variant']}@{r['context'] // K}K TurboQuant default <= 1/4.4 "
                    "of bf16 (global)",
                    "ratio": r["ratio_to_bf16_global"],
                    "ok": r["ratio_to_bf16_global"] >= 4.4,
                }
            )
    for p in peaks:
        if p["setting"] == default:
            out.append(
                {
                    "check": f"TurboQuant peak growth < 256 MiB at {p['context'] // K}K, "
                    f"q={p['query_tokens']}",
                    "value_mib": p["peak_growth_mib"],
                    "ok": p["peak_growth_mib"] < 256,
                }
            )
    return out


def plot(rows: list[dict], settings: dict):
    """Whole-model KV (GiB) against context, one panel per variant."""
    from gemma4_mlx.bench.common import pyplot

    plt = pyplot()
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.8), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for setting in settings:
            pts = [
                (r["context"] // K, r["total_bytes"] / GiB)
                for r in rows
                if r["variant"] == variant and r["setting"] == setting
            ]
            if pts:
                x, y = zip(*pts)
                label = _alias_names().get(setting, setting)
                ax.plot(x, y, "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{variant}: whole-model KV")
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("GiB")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _alias_names() -> dict[str, str]:
    """{result name: alias} (the plot's short labels)."""
    return {setting_name(p, BASELINE): a for a, p in ALIASES.items()}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="E2B at 8K, decode peak at 8K (CI)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    ap.add_argument("--contexts", type=positive_ints, default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--settings", default="all", help=settings_help(ALIASES, "all"))
    ap.add_argument("--no-peak", action="store_true", help="skip part 2 (peak memory)")
    ap.add_argument(
        "--peak-contexts",
        type=positive_ints,
        default=None,
        help="part 2's decode contexts (default 8192,32768,131072; prefill at those <= 32K)",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]  # in this order
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(
            f"argument --variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}"
        )
    variants = variants[:1] if args.quick else variants
    contexts = [8 * K] if args.quick else sorted(args.contexts)
    settings = choose(ALIASES, args.settings, baseline=BASELINE)
    name = result_name("memory", args.quick)
    peak_contexts = [8 * K] if args.quick else [8 * K, 32 * K, 128 * K]
    if args.peak_contexts:
        peak_contexts = sorted(args.peak_contexts)

    rows: list[dict] = []
    peaks: list[dict] = []

    def write() -> None:
        payload = {
            "settings": describe(settings, "bfloat16"),
            "default": setting_name(default_policy()),
            "variants": variants,
            "contexts": contexts,
            "memory": rows,
            "attention_peak": peaks,
            "checks": checks(rows, peaks),
        }
        write_results(args.out, name, payload, lambda: plot(rows, settings))

    for variant in variants:
        for got in variant_rows(variant, settings, contexts):
            rows.extend(got)
            write()
    if not args.no_peak:
        prefill_contexts = [] if args.quick else [c for c in peak_contexts if c <= 32 * K]
        peaks += attention_peaks(PEAK_SETTINGS, peak_contexts, prefill_contexts)
        write()
    for c in checks(rows, peaks):
        print(("PASS " if c["ok"] else "FAIL ") + c["check"])
    print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()
