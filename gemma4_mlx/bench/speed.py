"""Prompt and decode speed per KV setting on real weights, as ratios to the float32 cache.

The offline demo model (Gemma 3 270M, float32) reads real English text (the license texts of
benchmarks/quality.py) in 512-token chunks up to 16K tokens, one prefill per setting; at 1K, 4K
and 16K tokens of context it records prompt tokens/s (tokens so far / prefill time so far: what
a prompt of that length costs), then times 32 greedy decode steps after one warm-up step (those
tokens stay in the context). Also recorded: ``mx.get_peak_memory()`` since the setting started
(model weights included) and the caches' ``nbytes``. Ratios are to the float32 cache in the same
run. Only global-layer caches differ between settings (sliding layers keep exact ring buffers).
On this CPU the MLX kernels are the CPU build's; on a Mac the absolute numbers differ.

    python benchmarks/speed.py           # 6 settings, 1K/4K/16K (~15-20 min here)
    python benchmarks/speed.py --quick   # 512 tokens, 2 settings, for CI
    (also: gemma4-mlx bench speed [options])
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench.common import corpus_text, write_json
from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.loading import load

CHUNK = 512


def settings(quick: bool) -> dict[str, KVPolicy]:
    exact = "bfloat16"
    every = {
        "fp32": KVPolicy("fp16"),
        "tq3.5 K5/V2 s4 w128 (default)": KVPolicy("turboquant", exact_dtype=exact),
        "affine8": KVPolicy("affine", bits=8),
        "affine4": KVPolicy("affine", bits=4),
        "tq4 K5/V3 s4 w128": KVPolicy("turboquant", bits=4, exact_dtype=exact),
        "tq3.5 K5/V2 s0 w0 (plain)": KVPolicy("turboquant", sink=0, fp_window=0),
    }
    return dict(list(every.items())[:2]) if quick else every


def measure(model, tokens: list[int], policy: KVPolicy, lengths: list[int], steps: int) -> dict:
    cache = model.make_cache(policy)
    mx.synchronize()
    mx.reset_peak_memory()
    prefill_s, fed, rows = 0.0, 0, {}
    for length in lengths:
        while fed < length:
            n = min(CHUNK, length - fed)
            t = time.perf_counter()
            logits = model(mx.array([tokens[fed : fed + n]]), cache=cache)
            mx.eval(logits)
            prefill_s += time.perf_counter() - t
            fed += n
        tok = mx.argmax(logits[0, -1]).reshape(1, 1)
        mx.eval(model(tok, cache=cache))  # warm-up step
        t = time.perf_counter()
        for _ in range(steps):
            logits = model(tok, cache=cache)
            tok = mx.argmax(logits[0, -1]).reshape(1, 1)
            mx.eval(tok)
        decode_s = time.perf_counter() - t
        rows[str(length)] = {
            "prompt_tps": length / prefill_s,
            "decode_tps": steps / decode_s,
            "peak_memory_bytes": mx.get_peak_memory(),
            "cache_bytes": sum(c.nbytes for c in cache),
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    lengths = [512] if args.quick else sorted(int(x) for x in args.lengths.split(","))
    steps = 4 if args.quick else args.decode_steps
    model, tokenizer = load(args.model, dtype="float32")
    tokens = tokenizer.encode(corpus_text())[: max(lengths)]
    if len(tokens) < max(lengths):
        raise SystemExit(f"error: the corpus has only {len(tokens)} tokens")
    policies = settings(args.quick)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    name = "speed_quick" if args.quick else "speed"
    for setting, policy in policies.items():
        results[setting] = measure(model, tokens, policy, lengths, steps)
        base = results["fp32"]
        for length, r in results[setting].items():
            r["prompt_ratio"] = r["prompt_tps"] / base[length]["prompt_tps"]
            r["decode_ratio"] = r["decode_tps"] / base[length]["decode_tps"]
            print(
                f"{setting:32s} {int(length):6d} tokens  prompt {r['prompt_tps']:7.1f} tok/s "
                f"({r['prompt_ratio']:.2f}x)  decode {r['decode_tps']:6.2f} tok/s "
                f"({r['decode_ratio']:.2f}x)  peak {r['peak_memory_bytes'] / 2**20:7.0f} MiB  "
                f"cache {r['cache_bytes'] / 2**20:6.1f} MiB",
                flush=True,
            )
        payload = {
            "model": args.model,
            "chunk": CHUNK,
            "decode_steps": steps,
            "lengths": lengths,
            "settings": {n: p.describe() for n, p in policies.items()},
            "seconds": time.perf_counter() - t0,
            "results": results,
        }
        write_json(args.out, name, payload)
        plot(results, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for setting, rows in results.items():
        xs = sorted(int(n) for n in rows)
        for ax, key in zip(axes, ("prompt_tps", "decode_tps")):
            ax.plot(xs, [rows[str(n)][key] for n in xs], marker="o", label=setting)
    for ax, title in zip(axes, ("prompt tokens/s", "decode tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(f"{title} (Gemma 3 270M, float32, CPU)")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
