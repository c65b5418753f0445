"""Prompt and decode speed per KV setting on real weights, as ratios to the float32 cache.

The offline demo model (Gemma 3 270M, float32) reads real English text (the license texts of
benchmarks/quality.py) in 512-token chunks up to 16K tokens, the way ``generate`` prefills a
prompt: each chunk's forward pass, then one ``mx.eval`` of the cache state (no logits are computed
for prompt positions). At 1K, 4K and 16K tokens of context it records:

- prompt tokens/s: tokens so far / prefill time so far (what a prompt of that length costs);
- decode tokens/s: 32 greedy steps (one token each, argmax, ``mx.eval``) timed after one
  warm-up step; the decoded tokens stay in the context (a later checkpoint's context holds 33
  more tokens per earlier checkpoint: ``context_tokens`` in the results);
- peak memory: ``mx.get_peak_memory()`` after ``mx.reset_peak_memory()`` around each of the
  setting's own chunks and decode steps, minus the other settings' caches resident at that
  moment (see below), so model weights, this setting's cache and its transients;
- cache bytes: the caches' ``nbytes`` (all layers, and the global layers alone).

All settings run in lockstep, chunk by chunk and checkpoint by checkpoint, each with its own
cache: a slowdown of the machine (this CPU is shared) falls on every setting alike, so the ratios
to float32 stay fair. Only global-layer caches differ between settings (sliding layers keep their
exact ring buffers); TurboQuant's exact tokens (sink and recent window) are stored as bfloat16 as
on a Mac. These are the CPU build's MLX kernels: on a Mac's GPU the absolute numbers, and the
ratios, differ.

    python benchmarks/speed.py           # 6 settings, 1K/4K/16K (~22 min here)
    python benchmarks/speed.py --quick   # 512 tokens, 3 settings, 4 decode steps (~10 s)
    python benchmarks/speed.py --settings 'tq;turboquant:k4,v2'   # aliases or any text form
    (also: gemma4-mlx bench speed [options])
Results (JSON, PNG) are rewritten at each checkpoint, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser, positive_ints
from gemma4_mlx.bench.common import (
    Lockstep,
    cache_bytes,
    choose,
    corpus_text,
    default_policy,
    describe,
    greedy,
    lloyd_policy,
    pyplot,
    result_name,
    settings_help,
    tq_policy,
    write_results,
)
from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.loading import load

CHUNK = 512  # prefill step, as generate's
# command-line aliases of the settings (result names: common.setting_name)
ALIASES = {
    "fp32": KVPolicy(),  # the exact cache in the model dtype (float32 here)
    # the same exact cache read by one matmul per kv head (KVPolicy.attention; a row of its own)
    "fp32-grouped": KVPolicy(attention="grouped"),
    "affine8": KVPolicy("affine", bits=8),
    "affine4": KVPolicy("affine", bits=4),
    "tq4": tq_policy(5, 3),
    "tq": default_policy(),
    "tq-lloyd": lloyd_policy(),  # the previous default: K3/V2, Lloyd-Max codes
    "tq-t0": tq_policy(4.5, 2),  # the previous default: one rotation over all key channels
    "tq-w0": tq_policy(4.5, 2, window=0),
}


class Meter:
    """One setting's prefill time and peak memory."""

    def __init__(self):
        self.prefill_s = 0.0
        self.peak = 0

    def timed(self, others: int, fn):
        """Run ``fn`` (which evaluates what it computes); returns (seconds, result). The peak
        recorded is the process peak during ``fn`` minus ``others`` (other settings' caches)."""
        mx.synchronize()
        mx.reset_peak_memory()
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        self.peak = max(self.peak, mx.get_peak_memory() - others)
        return seconds, out


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="512 tokens, 3 settings (CI)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--lengths", type=positive_ints, default="1024,4096,16384")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--settings", default="all", help=settings_help(ALIASES, "all"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    lengths = [512] if args.quick else sorted(args.lengths)
    steps = 4 if args.quick else args.decode_steps
    policies = choose(ALIASES, "affine4,tq" if args.quick else args.settings)
    name = result_name("speed", args.quick)

    model, tokenizer = load(args.model, dtype="float32")
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    tokens = tokenizer.encode(corpus_text())
    if len(tokens) < max(lengths) + 1:
        raise SystemExit(f"error: the corpus has only {len(tokens)} tokens")
    lock = Lockstep(model, policies)
    meters = {n: Meter() for n in policies}
    results: dict[str, dict] = {n: {} for n in policies}
    t0 = time.perf_counter()

    def others(setting: str) -> int:
        """Bytes of the other settings' caches (resident while ``setting`` runs)."""
        return sum(cache_bytes(model, c)[0] for n, c in lock.caches.items() if n != setting)

    def prefill_step(setting: str, forward):
        seconds, out = meters[setting].timed(others(setting), forward)
        meters[setting].prefill_s += seconds
        return out

    def decode(setting: str, first: int) -> float:
        """Greedy steps from token ``first``: one warm-up step, then ``steps`` timed ones."""
        cache, meter = lock.caches[setting], meters[setting]
        warm = meter.timed(others(setting), lambda: greedy(model, cache, first, 1))[1]
        seconds = meter.timed(others(setting), lambda: greedy(model, cache, warm[0], steps))[0]
        return steps / seconds

    for length in lengths:
        # the prompt tokens so far are in every cache (the decoded tokens come on top)
        lock.run(tokens[lock.fed : length], CHUNK, logits=False, step=prefill_step)
        for n, cache in lock.caches.items():
            context = cache[-1].offset
            decode_tps = decode(n, tokens[length])
            total, global_ = cache_bytes(model, cache)
            results[n][str(length)] = {
                "context_tokens": context,
                "prompt_tps": length / meters[n].prefill_s,
                "decode_tps": decode_tps,
                "peak_memory_bytes": meters[n].peak,
                "cache_bytes": total,
                "global_cache_bytes": global_,
            }
        base = results["fp32"][str(length)]
        for n in policies:
            r = results[n][str(length)]
            r["prompt_ratio"] = r["prompt_tps"] / base["prompt_tps"]
            r["decode_ratio"] = r["decode_tps"] / base["decode_tps"]
        print(f"--- {length} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
        for n in policies:
            r = results[n][str(length)]
            print(
                f"{n:30s} prompt {r['prompt_tps']:6.1f} tok/s ({r['prompt_ratio']:.2f}x)  "
                f"decode {r['decode_tps']:5.2f} tok/s ({r['decode_ratio']:.2f}x)  "
                f"peak {r['peak_memory_bytes'] / 2**20:6.0f} MiB  "
                f"cache {r['cache_bytes'] / 2**20:6.1f} MiB"
                f" (global {r['global_cache_bytes'] / 2**20:5.1f})",
                flush=True,
            )
        payload = {
            "model": args.model,
            "chunk": CHUNK,
            "decode_steps": steps,
            "lengths": [n for n in lengths if str(n) in results["fp32"]],
            "weights_bytes": weights,
            "settings": describe(policies),
            "seconds": time.perf_counter() - t0,
            "results": results,
        }
        write_results(args.out, name, payload, lambda: plot(results))
    print(f"wrote {args.out / name}.json and .png")


def plot(results: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for setting, rows in results.items():
        xs = sorted(int(n) for n in rows)
        for ax, key in zip(axes, ("prompt_tps", "decode_tps", "peak_memory_bytes")):
            scale = 2**20 if key == "peak_memory_bytes" else 1
            ax.plot(xs, [rows[str(n)][key] / scale for n in xs], marker="o", label=setting)
    titles = ("prompt tokens/s", "decode tokens/s", "peak memory (MiB, weights included)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(f"{title}\nGemma 3 270M, float32, CPU", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
