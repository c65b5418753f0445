"""Passkey retrieval on real weights: does the compressed KV cache keep a fact the model can find?

A random 5-digit pass key is hidden at depths 0, 25, 50, 75 and 100% of a haystack of real
English text (the OS license texts of benchmarks/quality.py, from a seed-dependent offset) of
1K, 4K, 8K and 16K tokens in all (32K with ``--long``), and asked for at the end ("What is the
pass key? The pass key is"); 8 greedy tokens must contain the 5 digits. The float32 cache is the
baseline: where the 270M base model fails even in float32, that is reported as it is, and what
TurboQuant must match is the float32 result, trial by trial.

For one seed the haystack before the needle is the same at every depth, so it is prefilled once
(a "trunk" cache, in 512-token chunks) and copied at each depth (``copy.deepcopy`` of the cache
objects), which saves about a third of the prefill. Only global-layer caches are compressed; exact
tokens are stored as bfloat16 as on a Mac.

    python benchmarks/needle.py           # fp32 + default TurboQuant, 1K-16K (~25 min here)
    python benchmarks/needle.py --long    # adds 32K
    python benchmarks/needle.py --quick   # 1K tokens, 2 depths, 1 seed, for CI
    (also: gemma4-mlx bench needle [options])
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench.common import corpus_text, write_json
from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.loading import load

CHUNK = 512
ANSWER_TOKENS = 8
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# seeds per length: fewer at the long lengths keeps the default run under 30 minutes here
SEEDS = {1024: 3, 4096: 3, 8192: 2, 16384: 1, 32768: 1}
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
)
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def settings(names: str) -> dict[str, KVPolicy]:
    """``default``: fp32 and the default TurboQuant; ``all``; or names from the list, comma-separated."""
    exact = "bfloat16"

    def tq(key_bits: float, value_bits: float, **kw) -> KVPolicy:
        return KVPolicy(
            "turboquant", key_bits=key_bits, value_bits=value_bits, exact_dtype=exact, **kw
        )

    every = {
        "fp32": KVPolicy("fp16"),
        "tq3.5 K5/V2 s4 w128 (default)": KVPolicy("turboquant", exact_dtype=exact),
        "tq4 K5/V3 s4 w128": tq(5, 3),
        "tq3.5 K4/V3 s4 w128": tq(4, 3),
        "tq3.5 K5/V2 s0 w0 (plain)": tq(5, 2, sink=0, fp_window=0),
        "affine4": KVPolicy("affine", bits=4),
    }
    if names == "all":
        return every
    if names == "default":
        return dict(list(every.items())[:2])
    chosen = ["fp32"] + [n.strip() for n in names.split(",") if n.strip() != "fp32"]
    unknown = [n for n in chosen if n not in every]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {unknown}; choose from {list(every)}")
    return {n: every[n] for n in chosen}


def _feed(model, cache, tokens: list[int]) -> mx.array:
    logits = None
    for i in range(0, len(tokens), CHUNK):
        logits = model(mx.array([tokens[i : i + CHUNK]]), cache=cache)
        mx.eval(logits)
    return logits


def _answer(model, cache, logits, tokenizer) -> str:
    out = []
    for _ in range(ANSWER_TOKENS):
        tok = int(mx.argmax(logits[0, -1]).item())
        if tok in tokenizer.eos_token_ids:
            break
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return tokenizer.decode(out)


def run_seed(model, tokenizer, policy, corpus: list[int], length: int, seed: int, depths):
    """All depths of one (length, seed): one trunk prefill, one branch per depth."""
    rng = random.Random(1000 * seed + length)
    key = rng.randint(10000, 99999)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    head = tokenizer.encode(INTRO)  # with BOS
    needle = encode(NEEDLE.format(key=key))
    question = encode(QUESTION)
    n_fill = length - len(head) - len(needle) - len(question)
    start = rng.randrange(len(corpus))
    hay = (corpus[start:] + corpus) * (1 + n_fill // len(corpus))
    hay = hay[:n_fill]
    trunk = model.make_cache(policy)
    _feed(model, trunk, head)
    done = 0
    rows = []
    for depth in sorted(depths):
        at = round(depth * n_fill)
        if at > done:
            _feed(model, trunk, hay[done:at])
            done = at
        branch = copy.deepcopy(trunk)
        logits = _feed(model, branch, needle + hay[at:] + question)
        text = _answer(model, branch, logits, tokenizer)
        rows.append(
            {
                "length": length,
                "depth": depth,
                "seed": seed,
                "key": key,
                "answer": text,
                "correct": str(key) in text,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--long", action="store_true", help="add 32K tokens")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--lengths", default="1024,4096,8192,16384")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per length (default: SEEDS)")
    ap.add_argument("--settings", default="default", help="default | all | comma-separated names")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    lengths = [1024] if args.quick else [int(x) for x in args.lengths.split(",")]
    if args.long and 32768 not in lengths:
        lengths.append(32768)
    depths = (0.0, 1.0) if args.quick else DEPTHS
    seeds = {n: 1 if args.quick else (args.seeds or SEEDS.get(n, 1)) for n in lengths}
    model, tokenizer = load(args.model, dtype="float32")
    corpus = tokenizer.encode(corpus_text(), add_special_tokens=False)
    policies = settings(args.settings)
    rows: list[dict] = []
    t0 = time.perf_counter()
    name = "needle_quick" if args.quick else "needle"
    for length in lengths:
        for setting, policy in policies.items():
            for seed in range(seeds[length]):
                for r in run_seed(model, tokenizer, policy, corpus, length, seed, depths):
                    rows.append({"setting": setting, **r})
            got = [r for r in rows if r["setting"] == setting and r["length"] == length]
            print(
                f"{length:6d} tokens  {setting:32s} {sum(r['correct'] for r in got)}/{len(got)}"
                f"  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        summary = summarize(rows, policies)
        payload = {
            "model": args.model,
            "depths": list(depths),
            "seeds": {str(n): s for n, s in seeds.items()},
            "settings": {n: p.describe() for n, p in policies.items()},
            "seconds": time.perf_counter() - t0,
            "summary": summary,
            "trials": rows,
        }
        write_json(args.out, name, payload)
        plot(summary, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")


def summarize(rows: list[dict], policies: dict) -> dict:
    """Accuracy per setting and length, and agreement with the float32 trial by trial."""
    base = {
        (r["length"], r["depth"], r["seed"]): r["correct"] for r in rows if r["setting"] == "fp32"
    }
    out: dict[str, dict] = {}
    for setting in policies:
        for length in sorted({r["length"] for r in rows}):
            got = [r for r in rows if r["setting"] == setting and r["length"] == length]
            if not got:
                continue
            same = [r["correct"] == base.get((r["length"], r["depth"], r["seed"])) for r in got]
            out.setdefault(setting, {})[str(length)] = {
                "accuracy": sum(r["correct"] for r in got) / len(got),
                "trials": len(got),
                "same_as_fp32": sum(same) / len(same),
            }
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, by_length in summary.items():
        xs = sorted(int(n) for n in by_length)
        ax.plot(xs, [by_length[str(n)]["accuracy"] for n in xs], marker="o", label=setting)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("pass key found")
    ax.set_title("passkey retrieval (Gemma 3 270M, 5 depths)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
