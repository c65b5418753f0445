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
Settings: ``--settings`` takes aliases (fp32, affine8, affine4, tq, tq-t0) or any KV policy
text form, in place of the mode's list.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser, positive_ints
from gemma4_mlx.bench.common import (
    Lockstep,
    accumulate,
    choose,
    corpus_text,
    default_policy,
    describe,
    global_bits,
    lloyd_policy,
    named,
    pyplot,
    result_name,
    setting_name,
    settings_help,
    tq_policy,
    write_results,
)
from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.loading import load

CHUNK = 256
# command-line aliases (--settings; any KV policy text form is taken too)
ALIASES = {
    "fp32": KVPolicy(),  # the exact cache in the model dtype (float32 here)
    "affine8": KVPolicy("affine", bits=8),
    "affine4": KVPolicy("affine", bits=4),
    "tq": default_policy(),
    "tq-lloyd": lloyd_policy(),  # the previous default: K3/V2, Lloyd-Max codes
    "tq-t0": tq_policy(4.5, 2),  # the previous default: one rotation over all key channels
}


def settings(quick: bool | None) -> dict[str, KVPolicy]:
    """Each mode's KV settings, the float32 cache (the baseline) first (names:
    ``common.setting_name``). ``quick`` None: the long-context run."""
    affine4 = KVPolicy("affine", bits=4)
    if quick:
        return named(KVPolicy(), affine4, default_policy(), tq_policy(4, 2, codec="prod"))
    if quick is None:  # the long-context run: the default against its baselines
        return named(
            KVPolicy(),
            affine4,
            default_policy(),
            lloyd_policy(),  # the previous default: K3/V2, Lloyd-Max codes
            tq_policy(3.5, 2, tiers=4),
        )
    return named(
        KVPolicy(),
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
        help=settings_help(ALIASES, "the mode's list") + " (fp32 always runs as the baseline)",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    lengths = [512] if args.quick else sorted(args.lengths)
    if any(n % CHUNK for n in lengths):
        ap.error(
            f"argument --lengths: expected multiples of {CHUNK} (the chunk size), got {lengths}"
        )
    if args.long:
        lengths = [1024, 4096, 16384]
    if args.settings is not None:
        policies = choose(ALIASES, args.settings)
    else:
        policies = settings(None if args.long else args.quick)
    name = result_name("quality_long" if args.long else "quality", args.quick)
    model, tokenizer = load(args.model, dtype="float32")
    tokens = tokenizer.encode(corpus_text())[: max(lengths) + 1]
    if len(tokens) < max(lengths) + 1:
        raise SystemExit(f"corpus has only {len(tokens)} tokens")

    lock = Lockstep(model, policies)
    sums = {n: {"nll": 0.0, "kl": 0.0, "top1": 0} for n in policies}
    results: dict[str, dict] = {n: {} for n in policies}
    reference = {}  # the baseline's logits of the current chunk
    t0 = time.perf_counter()

    def each(start: int, end: int, setting: str, logits: mx.array) -> None:
        if setting == "fp32":
            reference["logits"] = logits
        targets = mx.array(tokens[start + 1 : end + 1])
        accumulate(sums[setting], logits, reference["logits"], targets)

    def on_stop(done: int) -> None:
        for setting, cache in lock.caches.items():
            s = sums[setting]
            results[setting][done] = {
                "perplexity": math.exp(s["nll"] / done),
                "kl": s["kl"] / done,
                "top1": s["top1"] / done,
                "global_bits_per_channel": global_bits(model, cache, done),
            }
        print(f"--- {done} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
        base = results["fp32"][done]["perplexity"]
        for setting in policies:
            r = results[setting][done]
            r["perplexity_change"] = r["perplexity"] / base - 1
            print(
                f"{setting:36s} ppl {r['perplexity']:8.3f} ({100 * r['perplexity_change']:+6.2f}%)"
                f"  KL {r['kl']:.4f}  top-1 {100 * r['top1']:5.1f}%"
                f"  bits/ch {r['global_bits_per_channel']:.2f}",
                flush=True,
            )
        payload = {
            "model": args.model,
            "chunk": CHUNK,
            "lengths": [n for n in lengths if n in results["fp32"]],
            "seconds": time.perf_counter() - t0,
            "settings": describe(policies),
            "default": setting_name(default_policy()),
            "results": {n: {str(k): v for k, v in r.items()} for n, r in results.items()},
        }
        write_results(args.out, name, payload, lambda: plot(results, payload["lengths"]))
        print(f"wrote {args.out / name}.json and .png", flush=True)

    lock.run(tokens[: max(lengths)], CHUNK, lengths, each, on_stop)


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


def plot(results: dict, lengths: list[int]):
    """KL and top-1 agreement against stored bits at the longest length: one line per method."""
    plt = pyplot()
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
    return fig


if __name__ == "__main__":
    main()
