"""KV-cache quality on real weights (the offline Gemma 3 270M demo model, float32).

Real English text that ships with the OS (/usr/share/common-licenses: GPL-3, then Apache-2.0, then
the others, concatenated) is fed in 256-token chunks through each KV cache, all settings in
lockstep with a float32 cache: perplexity, mean KL(fp32 || setting) of the next-token
distributions, and top-1 agreement, reported over the first 1K, 4K and 16K tokens (every sliding
window and global layer exercised). Only global-layer caches are compressed (gemma4_mlx.cache);
sliding layers keep their exact ring buffer. Stored bits per channel are measured from the global
caches' nbytes at each length (exact sink and window tokens, stored as bfloat16 as on a Mac, and
growth slack included). Because the cache reads each query's recent window exactly in prefill as
in decode, the 256-token chunks give the numbers token-by-token decoding would.

    python benchmarks/quality.py          # 15 settings, 1K and 4K tokens (~25 min here alone;
                                          # 32 min while two other benchmarks shared the CPU)
    python benchmarks/quality.py --long   # default + 3 baselines at 1K, 4K and 16K (44 min
                                          # while other benchmarks shared the CPU)
    python benchmarks/quality.py --quick  # 512 tokens, 3 settings, for CI
    (also: gemma4-mlx bench quality [options])
Results are written after each length, so a long run that is stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser, positive_ints
from gemma4_mlx.bench.common import (
    accumulate,
    choose,
    corpus_text,
    default_policy,
    global_bits,
    named,
    setting_name,
    tq_policy,
)
from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.loading import load

CHUNK = 256


def settings(quick: bool | None) -> dict[str, KVPolicy]:
    """KV settings compared with the float32 cache (names: ``common.setting_name``)."""
    affine4 = KVPolicy("affine", bits=4)
    if quick:
        return named(affine4, default_policy(), tq_policy(4, 2, codec="prod"))
    if quick is None:  # the long-context run: the default against its baselines
        return named(
            affine4,
            default_policy(),
            tq_policy(3.5, 2, tiers=4),
            tq_policy(4.5, 2),  # the previous default: one rotation over all key channels
        )
    return named(
        KVPolicy("affine", bits=8),
        affine4,
        tq_policy(5, 3),
        tq_policy(4, 3),
        tq_policy(5, 2, sink=0, window=0, center=0),  # plain TurboQuant
        tq_policy(3, 4, sink=0, window=0, center=0),  # mlx-vlm's split for Gemma 4
        default_policy(),
        tq_policy(3.5, 2, tiers=4),
        tq_policy(4, 2, tiers=4),
        tq_policy(3, 1.5, tiers=4),
        tq_policy(2.5, 2, tiers=4),
        tq_policy(4.5, 2),
        tq_policy(4, 2),
        tq_policy(4, 2, center=0),
        tq_policy(4, 2, codec="prod"),
        tq_policy(4, 1.5),
        tq_policy(3, 2),
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--lengths", type=positive_ints, default="1024,4096")
    ap.add_argument(
        "--long",
        action="store_true",
        help="1K, 4K and 16K tokens for the default setting and its baselines (~40 min here)",
    )
    ap.add_argument(
        "--settings",
        default=None,
        help="comma- or ;-separated KV policy text forms or aliases (affine4, affine8, tq), in"
        " place of the mode's list (fp32 always runs as the baseline)",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    lengths = [512] if args.quick else args.lengths
    if any(n % CHUNK for n in lengths):
        ap.error(
            f"argument --lengths: expected multiples of {CHUNK} (the chunk size), got {lengths}"
        )
    if args.long:
        lengths = [1024, 4096, 16384]
    model, tokenizer = load(args.model, dtype="float32")
    tokens = tokenizer.encode(corpus_text())[: max(lengths) + 1]
    if len(tokens) < max(lengths) + 1:
        raise SystemExit(f"corpus has only {len(tokens)} tokens")
    policies = settings(None if args.long else args.quick)
    if args.settings is not None:
        aliases = {
            "fp32": KVPolicy("exact"),
            "affine4": KVPolicy("affine", bits=4),
            "affine8": KVPolicy("affine", bits=8),
            "tq": default_policy(),
        }
        policies = choose(aliases, args.settings)
        policies.pop("fp32")
    caches = {"fp32": model.make_cache(KVPolicy("fp16"))} | {
        n: model.make_cache(p) for n, p in policies.items()
    }
    sums = {n: {"nll": 0.0, "kl": 0.0, "top1": 0} for n in caches}
    results: dict[str, dict] = {n: {} for n in caches}
    t0 = time.perf_counter()
    done = 0
    while done < max(lengths):
        n = min(CHUNK, max(lengths) - done)
        x = mx.array([tokens[done : done + n]])
        y = mx.array(tokens[done + 1 : done + n + 1])
        ref = model(x, cache=caches["fp32"])[0]
        for name, cache in caches.items():
            logits = ref if name == "fp32" else model(x, cache=cache)[0]
            accumulate(sums[name], logits, ref, y)
        done += n
        if done in lengths:
            for name, cache in caches.items():
                s = sums[name]
                results[name][done] = {
                    "perplexity": math.exp(s["nll"] / done),
                    "kl": s["kl"] / done,
                    "top1": s["top1"] / done,
                    "global_bits_per_channel": global_bits(model, cache, done),
                }
            print(f"--- {done} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
            base = results["fp32"][done]["perplexity"]
            for name in caches:
                r = results[name][done]
                r["perplexity_change"] = r["perplexity"] / base - 1
                print(
                    f"{name:36s} ppl {r['perplexity']:8.3f} ({100 * r['perplexity_change']:+6.2f}%)  KL {r['kl']:.4f}"
                    f"  top-1 {100 * r['top1']:5.1f}%  bits/ch {r['global_bits_per_channel']:.2f}",
                    flush=True,
                )
            write(args, results, lengths, policies, time.perf_counter() - t0)


def write(args, results: dict, lengths: list[int], policies: dict, seconds: float) -> None:
    """Results so far (called after each length, so a stopped long run keeps what it measured)."""
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quality_quick" if args.quick else ("quality_long" if args.long else "quality")
    done = [n for n in lengths if n in results["fp32"]]
    payload = {
        "model": args.model,
        "chunk": CHUNK,
        "lengths": done,
        "seconds": seconds,
        "settings": {"fp32": "float32", **{n: p.describe() for n, p in policies.items()}},
        "default": setting_name(default_policy()),
        "results": {n: {str(k): v for k, v in r.items()} for n, r in results.items()},
    }
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    plot(results, done, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png", flush=True)


def _method(name: str) -> tuple[str, str]:
    """(method, point label) of a result name: settings that differ only in their bits are one
    method (one line in the plot), e.g. ``tq tiers=4,sink=4,...`` with points ``K4/V2``,
    ``K5/V3``; the default's point is marked."""
    policy = KVPolicy.parse(name)
    if policy.kind == "affine":
        return "mlx-lm affine", f"{policy.key_bits:g}-bit"
    rest = str(policy).split(",", 2)[2]  # everything after k and v
    label = f"K{policy.key_bits:g}/V{policy.value_bits:g}"
    return f"tq {rest}", label + (" (default)" if name == setting_name(default_policy()) else "")


def plot(results: dict, lengths: list[int], path: Path) -> None:
    """KL and top-1 agreement against stored bits at the longest length: one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    length = max(lengths)
    methods: dict[str, list] = {}
    for name, r in results.items():
        if name != "fp32" and length in r:
            method, label = _method(name)
            methods.setdefault(method, []).append(
                (r[length]["global_bits_per_channel"], r[length], label)
            )
    for method, points in methods.items():
        points.sort(key=lambda p: p[0])
        marker = "s" if method.startswith("mlx") else ("^" if "codec=prod" in method else "o")
        for ax, key in zip(axes, ("kl", "top1")):
            ax.plot(
                [p[0] for p in points], [p[1][key] for p in points], marker=marker, label=method
            )
            for bits, row, label in points:
                ax.annotate(
                    label, (bits, row[key]), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
    axes[0].set_yscale("log")
    axes[0].set_title(f"mean KL vs float32 ({length} tokens)")
    axes[1].set_title(f"top-1 agreement ({length} tokens)")
    for ax in axes:
        ax.set_xlabel("stored bits per channel (global layers, all bytes)")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
