"""Speculative decoding on real weights: acceptance and decode speed vs plain decoding.

Target: the offline demo model (Gemma 3 270M) at float32. Drafts: the same model converted to
4-bit and 8-bit (``gemma4_mlx.convert``, affine group 64), so they share its tokenizer and agree
with it often. Prompts: real English text (the license texts of benchmarks/quality.py), greedy
decoding. For each KV cache (exact; default TurboQuant, whose prompt is long enough that it
compresses) the plain run and every (draft, N) run decode the same prompts in the same process,
so a slowdown of this shared CPU falls on all of them. Each speculative run is also checked to
give the plain run's tokens exactly (``lossless`` in the results).

Recorded per run: tokens/s of decoding (``GenerationResult.generation_tps``: first token to
last, prefill excluded), the speed-up over plain decoding, drafted and accepted tokens and the
acceptance rate. These are the CPU build's MLX kernels: on a Mac's GPU the ratios differ (a
verification call of N+1 tokens costs nearly one decode step there; here it costs more).

    python benchmarks/speculative.py            # N = 1..6, 2 prompts x 128 tokens (~1 h here)
    python benchmarks/speculative.py --prompts 1 --max-tokens 48   # the README's run (29 min)
    python benchmarks/speculative.py --quick    # N = 2, 1 prompt x 16 tokens, 4-bit, exact (CI)
    (also: gemma4-mlx bench speculative [options])
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser, positive_ints
from gemma4_mlx.bench.common import corpus_text, write_json
from gemma4_mlx.cache import KVPolicy

PROMPT_TOKENS = 256  # past the default TurboQuant's exact sink + centring block (132 tokens)


def _drafts(model_dir: Path, bits: list[int], tmp: Path) -> dict[str, object]:
    from gemma4_mlx.convert import convert
    from gemma4_mlx.speculative import load_draft

    out = {}
    for b in bits:
        path = convert(model_dir, tmp / f"q{b}", quantize=True, q_bits=b)
        out[f"q{b}"] = load_draft(path)
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="N = 2, 16 tokens, 4-bit, exact (CI)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--num-draft-tokens", type=positive_ints, default="1,2,3,4,5,6")
    ap.add_argument("--draft-bits", type=positive_ints, default="4,8")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--caches", default="exact,turboquant", help="exact,turboquant")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.num_draft_tokens, args.draft_bits, args.prompts, args.max_tokens = [2], [4], 1, 16
        args.caches = "exact"
    name = "speculative_quick" if args.quick else "speculative"

    from gemma4_mlx.generate import generate
    from gemma4_mlx.loading import load, resolve_model_path

    if args.model == "demo":
        from gemma4_mlx.demo import ensure_demo_model

        ensure_demo_model()
    model_dir = resolve_model_path(args.model)
    model, tokenizer = load(str(model_dir), dtype="float32")
    tokens = tokenizer.encode(corpus_text())
    prompts = [
        tokens[i * PROMPT_TOKENS * 4 : i * PROMPT_TOKENS * 4 + PROMPT_TOKENS]
        for i in range(args.prompts)
    ]
    caches = {"exact": KVPolicy(), "turboquant": KVPolicy("turboquant")}
    caches = {k: caches[k] for k in args.caches.split(",")}
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        drafts = _drafts(model_dir, args.draft_bits, Path(tmp))
        for cache_name, policy in caches.items():
            rows: dict[str, dict] = {}
            plain = [
                generate(model, tokenizer, p, args.max_tokens, kv_policy=policy) for p in prompts
            ]
            base_tps = sum(r.generation_tps for r in plain) / len(plain)
            rows["plain"] = {"decode_tps": base_tps}
            print(f"--- {cache_name}: plain {base_tps:.2f} tok/s", flush=True)
            for draft_name, draft in drafts.items():
                for n in args.num_draft_tokens:
                    runs = [
                        generate(
                            model,
                            tokenizer,
                            p,
                            args.max_tokens,
                            kv_policy=policy,
                            draft_model=draft,
                            num_draft_tokens=n,
                        )  # fmt: skip
                        for p in prompts
                    ]
                    drafted = sum(r.drafted_tokens for r in runs)
                    accepted = sum(r.accepted_tokens for r in runs)
                    tps = sum(r.generation_tps for r in runs) / len(runs)
                    row = {
                        "draft": draft_name,
                        "num_draft_tokens": n,
                        "decode_tps": tps,
                        "speedup": tps / base_tps,
                        "drafted": drafted,
                        "accepted": accepted,
                        "acceptance_rate": accepted / drafted if drafted else 0.0,
                        "lossless": all(r.tokens == q.tokens for r, q in zip(runs, plain)),
                    }
                    rows[f"{draft_name}/N={n}"] = row
                    print(
                        f"{cache_name} {draft_name} N={n}: {tps:6.2f} tok/s "
                        f"({row['speedup']:.2f}x)  accepted {accepted}/{drafted} "
                        f"({100 * row['acceptance_rate']:.0f}%)  lossless {row['lossless']}",
                        flush=True,
                    )
            results[cache_name] = rows
            payload = {
                "model": args.model,
                "target_dtype": "float32",
                "drafts": {d: f"{d[1:]}-bit affine (group 64) of the target" for d in drafts},
                "prompts": len(prompts),
                "prompt_tokens": PROMPT_TOKENS,
                "max_tokens": args.max_tokens,
                "caches": {k: str(caches[k]) for k in results},
                # Gemma 4's assistant (MTP) drafter has no weights offline (no model hub here):
                # it is tested for parity and losslessness on tiny checkpoints, not timed.
                "assistant_drafter": "not measured: no gemma4_assistant weights offline",
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
    for cache_name, rows in results.items():
        drafts = sorted({r["draft"] for k, r in rows.items() if k != "plain"})
        for d in drafts:
            pts = sorted(
                (r["num_draft_tokens"], r)
                for k, r in rows.items()
                if k != "plain" and r["draft"] == d
            )
            xs = [n for n, _ in pts]
            label = f"{cache_name}, {d} draft"
            axes[0].plot(xs, [r["speedup"] for _, r in pts], marker="o", label=label)
            axes[1].plot(xs, [r["acceptance_rate"] for _, r in pts], marker="o", label=label)
    axes[0].axhline(1.0, color="gray", lw=1, ls="--")
    axes[0].set_title(
        "decode speed-up over plain decoding\nGemma 3 270M float32 target, CPU", fontsize=9
    )
    axes[1].set_title("draft acceptance rate", fontsize=9)
    for ax in axes:
        ax.set_xlabel("draft tokens per step (N)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
