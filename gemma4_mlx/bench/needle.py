"""Passkey retrieval on real weights: does a compressed KV cache keep a fact the model can find?

A random 5-digit pass key is hidden at depths 0, 25, 50, 75 and 100% of a haystack of real
English text (the OS license texts of benchmarks/quality.py, read from a seed-dependent offset and
repeated if needed) in prompts of 1K, 4K, 8K and 16K tokens in all (32K with ``--long``), and
asked for at the end. The offline demo model (Gemma 3 270M, a base model, float32) decodes up to
8 greedy tokens; a trial succeeds if they contain the 5 digits. Each seed draws its own key and
haystack offset, the same for every length and setting, so every setting answers the same
prompts and the float32 cache's answer is the baseline trial by trial ("same_as_fp32"). Where
the 270M model fails even in float32, that is reported as it is: what a compressed cache must
match is the float32 result, not 100%.

Prompt: an instruction line, the haystack with "The pass key is 12345. Remember it. 12345 is the
pass key." inside it, then "Now, what was the pass key? Answer: The pass key is". (With the more
common ending "What is the pass key? The pass key is", the float32 model answers with a
definition of "pass key" whenever the needle sits right before the question.)

Each prompt is prefilled as ``generate`` does it: every token but the last in 512-token chunks
from position 0 (one ``mx.eval`` of the cache state per chunk), then the last token, whose
logits start the greedy answer. For one seed and length the haystack before the needle is the
same at every depth, so it is prefilled once (a "trunk" cache, up to the last 512-token boundary
before each needle) and each depth branches from a deep copy of the trunk: the chunks are exactly
those of a fresh prefill, and about a third of the prefill is saved. Only global-layer caches
are compressed (gemma4_mlx.cache); sliding layers keep their exact ring buffers, and TurboQuant's
exact tokens (sink and recent window) are stored as bfloat16 as on a Mac.

    python benchmarks/needle.py                  # fp32 + default TurboQuant, 1K-16K (31 min here
                                                 # while two other benchmarks shared the CPU)
    python benchmarks/needle.py --settings all   # + TurboQuant w0, plain, affine 4 (much longer)
    python benchmarks/needle.py --settings 'tq;turboquant:k4,v2,window=64'   # any text form
    python benchmarks/needle.py --long           # adds 32K tokens (1 seed; ~35 min more here)
    python benchmarks/needle.py --quick          # 1K tokens, 2 depths, 1 seed, 2 settings (~20 s)
    (also: gemma4-mlx bench needle [options])
Seeds per length (default 3 at 1K, 1 at 4K, 8K and 16K: what fits in 30 minutes on a 2-core
CPU, where one 16K seed alone takes ~13 of them) can be set with --seeds. Results (JSON, PNG)
are rewritten after each depth (all settings run in lockstep, the same chunks as float32), so a
stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser, fractions, positive_ints
from gemma4_mlx.bench.common import (
    Lockstep,
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
ANSWER_TOKENS = 8
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
LENGTHS = (1024, 4096, 8192, 16384)
# seeds per length: few at the long lengths keeps the default run under 30 minutes here
SEEDS = {1024: 3, 4096: 1, 8192: 1, 16384: 1, 32768: 1}
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
)
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nNow, what was the pass key? Answer: The pass key is"

# command-line aliases of the settings (result names: common.setting_name)
ALIASES = {
    "fp32": KVPolicy(),  # the exact cache in the model dtype (float32 here)
    "tq": default_policy(),
    "tq-lloyd": lloyd_policy(),  # the previous default: K3/V2, Lloyd-Max codes
    "tq-t0": tq_policy(4.5, 2),  # the previous default: one rotation over all key channels
    "tq-k4": tq_policy(4, 2),
    "tq-w0": tq_policy(4.5, 2, window=0),
    "tq-plain": tq_policy(4.5, 2, sink=0, window=0, center=0),
    "affine4": KVPolicy("affine", bits=4),
}


def settings(names: str) -> dict[str, KVPolicy]:
    """``default`` (fp32 and the default TurboQuant), ``all``, or comma-separated aliases
    (fp32, tq, tq-t0, tq-k4, tq-w0, tq-plain, affine4) or result names; fp32 always comes first."""
    return choose(ALIASES, "tq" if names == "default" else names)


class Prompts:
    """The prompts of one seed: its key, its haystack (corpus from a random offset, repeated)."""

    def __init__(self, tokenizer, corpus: list[int], seed: int, max_length: int):
        rng = random.Random(seed)
        self.key = rng.randint(10000, 99999)
        start = rng.randrange(len(corpus))
        self.head = tokenizer.encode(INTRO)  # with BOS
        self.needle = tokenizer.encode(NEEDLE.format(key=self.key), add_special_tokens=False)
        self.question = tokenizer.encode(QUESTION, add_special_tokens=False)
        hay = corpus[start:] + corpus[:start]
        self.hay = hay * (1 + max_length // len(hay))

    def fill(self, length: int) -> int:
        """Haystack tokens in a prompt of ``length`` tokens."""
        n = length - len(self.head) - len(self.needle) - len(self.question)
        if n < 0:
            raise SystemExit(f"error: {length} tokens cannot hold the prompt around the haystack")
        return n

    def needle_at(self, length: int, depth: float) -> int:
        """Token position of the needle in the prompt."""
        return len(self.head) + round(depth * self.fill(length))

    def prompt(self, length: int, depth: float) -> list[int]:
        at = self.needle_at(length, depth) - len(self.head)
        n = self.fill(length)
        ids = self.head + self.hay[:at] + self.needle + self.hay[at:n] + self.question
        assert len(ids) == length
        return ids

    def prefix(self, n: int) -> list[int]:
        """The first ``n`` tokens every prompt of this seed shares (up to its needle)."""
        return (self.head + self.hay[: max(0, n - len(self.head))])[:n]


def _answer(model, tokenizer, cache: list, last: int, key: int) -> str:
    """Greedy tokens after the prompt's ``last`` token: up to ANSWER_TOKENS, stopping early at
    EOS or once the key is there."""
    eos = set(tokenizer.eos_token_ids)
    out = greedy(
        model,
        cache,
        last,
        ANSWER_TOKENS,
        stop=lambda ids: ids[-1] in eos or str(key) in tokenizer.decode(ids),
    )
    return tokenizer.decode([t for t in out if t not in eos])


def run_seed(model, tokenizer, policies: dict, prompts: Prompts, length: int, depths, on_rows):
    """Every depth of one (length, seed), all settings in lockstep: the trunk caches are fed in
    whole chunks up to each needle's chunk boundary, and each depth finishes its prompt on a
    branch (deep copies); ``on_rows(rows)`` gets each depth's trials (one per setting)."""
    trunk = Lockstep(model, policies)
    for depth in sorted(depths):
        at = prompts.needle_at(length, depth)
        boundary = at // CHUNK * CHUNK
        if boundary > trunk.fed:
            trunk.run(prompts.prefix(boundary)[trunk.fed :], CHUNK, logits=False)
        ids = prompts.prompt(length, depth)
        assert ids[: trunk.fed] == prompts.prefix(trunk.fed)  # what the trunk holds
        branch = trunk.branch()
        branch.run(ids[branch.fed : -1], CHUNK, logits=False)  # chunks of a fresh prefill
        rows = []
        for setting, cache in branch.caches.items():
            text = _answer(model, tokenizer, cache, ids[-1], prompts.key)
            rows.append(
                {
                    "setting": setting,
                    "length": length,
                    "depth": depth,
                    "needle_position": at,
                    "key": prompts.key,
                    "answer": text,
                    "correct": str(prompts.key) in text,
                }
            )
        on_rows(rows)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1K tokens, 2 depths, 1 seed (CI)")
    ap.add_argument("--long", action="store_true", help="add 32K tokens")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--lengths", type=positive_ints, default=",".join(str(n) for n in LENGTHS))
    ap.add_argument("--depths", type=fractions, default=",".join(f"{d:g}" for d in DEPTHS))
    ap.add_argument("--seeds", type=int, default=None, help="seeds per length (default: SEEDS)")
    ap.add_argument(
        "--settings",
        default="default",
        help="default (fp32, tq) | " + settings_help(ALIASES, "default"),
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    lengths = [1024] if args.quick else sorted(args.lengths)
    if args.long and 32768 not in lengths:
        lengths.append(32768)
    depths = (0.0, 1.0) if args.quick else tuple(args.depths)
    seeds = {n: 1 if args.quick else (args.seeds or SEEDS.get(n, 1)) for n in lengths}
    policies = settings("default" if args.quick else args.settings)
    name = result_name("needle", args.quick)

    model, tokenizer = load(args.model, dtype="float32")
    corpus = tokenizer.encode(corpus_text(), add_special_tokens=False)
    prompts = {s: Prompts(tokenizer, corpus, s, max(lengths)) for s in range(max(seeds.values()))}
    planned = sum(seeds[n] * len(depths) for n in lengths)
    print(
        f"{planned} prompts per setting ({', '.join(f'{seeds[n]}x{n}' for n in lengths)} tokens,"
        f" {len(depths)} depths), settings: {', '.join(policies)}",
        flush=True,
    )
    rows: list[dict] = []
    t0 = time.perf_counter()

    def on_rows(got: list[dict], seed: int) -> None:
        rows.extend({"seed": seed, **r} for r in got)
        for r in got:
            mark = "ok" if r["correct"] else repr(r["answer"].strip()[:12])
            print(
                f"{r['length']:6d} tokens  seed {seed}  depth {r['depth']:4g}  "
                f"{r['setting'][:40]:40s} {mark}  (total {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        payload = {
            "model": args.model,
            "prompt": {"intro": INTRO, "needle": NEEDLE, "question": QUESTION},
            "chunk": CHUNK,
            "answer_tokens": ANSWER_TOKENS,
            "lengths": lengths,
            "depths": list(depths),
            "seeds": {str(n): s for n, s in seeds.items()},
            "settings": describe(policies),
            "seconds": time.perf_counter() - t0,
            "summary": summarize(rows, policies),
            "trials": rows,
        }
        write_results(args.out, name, payload, lambda: plot(payload["summary"], rows))

    for length in lengths:
        for seed in range(seeds[length]):
            run_seed(
                model,
                tokenizer,
                policies,
                prompts[seed],
                length,
                depths,
                lambda got, seed=seed: on_rows(got, seed),
            )
    print_table(summarize(rows, policies))
    print(f"wrote {args.out / name}.json and .png")


def summarize(rows: list[dict], policies: dict) -> dict:
    """Per setting and length: accuracy, trials, and agreement with the float32 trial by trial
    (over the trials float32 has run)."""
    base = {
        (r["length"], r["depth"], r["seed"]): r["correct"] for r in rows if r["setting"] == "fp32"
    }
    out: dict[str, dict] = {}
    for setting in policies:
        for length in sorted({r["length"] for r in rows}):
            got = [r for r in rows if r["setting"] == setting and r["length"] == length]
            if not got:
                continue
            paired = [r for r in got if (r["length"], r["depth"], r["seed"]) in base]
            same = [r["correct"] == base[(r["length"], r["depth"], r["seed"])] for r in paired]
            out.setdefault(setting, {})[str(length)] = {
                "accuracy": sum(r["correct"] for r in got) / len(got),
                "correct": sum(r["correct"] for r in got),
                "trials": len(got),
                "same_as_fp32": sum(same) / len(same) if same else None,
            }
    return out


def print_table(summary: dict) -> None:
    lengths = sorted({int(n) for by in summary.values() for n in by})
    print(f"{'pass key found':32s}" + "".join(f"{n:>14d}" for n in lengths))
    for setting, by in summary.items():
        cells = []
        for n in lengths:
            s = by.get(str(n))
            cells.append(f"{s['correct']:>6d}/{s['trials']:<3d}" if s else "-")
        print(f"{setting:32s}" + "".join(f"{c:>14s}" for c in cells))


def plot(summary: dict, rows: list[dict]):
    import numpy as np

    plt = pyplot()
    names = list(summary)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(5 + 3.2 * len(names), 3.8), squeeze=False)
    ax = axes[0, 0]
    for setting, by_length in summary.items():
        xs = sorted(int(n) for n in by_length)
        ax.plot(xs, [by_length[str(n)]["accuracy"] for n in xs], marker="o", label=setting)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("pass key found")
    ax.set_title("passkey retrieval (Gemma 3 270M)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    for ax, setting in zip(axes[0, 1:], names):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                got = [
                    r["correct"]
                    for r in rows
                    if r["setting"] == setting and r["length"] == n and r["depth"] == d
                ]
                if got:
                    grid[i, j] = sum(got) / len(got)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(setting, fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
