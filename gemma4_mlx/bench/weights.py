"""Weight quantization on real weights: what `gemma4-mlx convert -q` costs in quality.

The offline demo model (Gemma 3 270M, float32) is quantized in memory exactly as ``convert``
does it (``gemma4_mlx.convert._quantize``: affine 8 / 4 bit with group 64, mxfp4; embeddings
quantized too, the model's own 8-bit rules kept) and run in lockstep with the float32 model over
real English text (the license texts of benchmarks/quality.py) in 256-token chunks with exact
KV caches: perplexity, mean KL(float32 || quantized) of the next-token distributions, top-1
agreement, and the weights' stored bytes (``nbytes`` of the parameters). Note the demo weights
were themselves dequantized from a Q4_K_M GGUF, so this is the loss of re-quantizing them.

    python benchmarks/weights.py            # 1K and 4K tokens, a few minutes here
    python benchmarks/weights.py --quick    # 256 tokens, affine 4-bit only, for CI
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser
from gemma4_mlx.bench.common import accumulate, corpus_text, write_json
from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.convert import _quantize
from gemma4_mlx.loading import load

CHUNK = 256
VARIANTS = {"affine8": ("affine", 8), "affine4": ("affine", 4), "mxfp4": ("mxfp4", 4)}


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    lengths = [CHUNK] if args.quick else sorted(int(x) for x in args.lengths.split(","))
    variants = {"affine4": VARIANTS["affine4"]} if args.quick else VARIANTS

    reference, tokenizer = load(args.model, dtype="float32")
    models = {"float32": reference}
    for name, (mode, bits) in variants.items():
        model, _ = load(args.model, dtype="float32")
        _quantize(model, bits, 64, mode)
        mx.eval(model.parameters())
        models[name] = model
    tokens = tokenizer.encode(corpus_text())[: max(lengths) + 1]
    if len(tokens) < max(lengths) + 1:
        raise SystemExit(f"error: the corpus has only {len(tokens)} tokens")
    caches = {n: m.make_cache(KVPolicy("fp16")) for n, m in models.items()}
    sums = {n: {"nll": 0.0, "kl": 0.0, "top1": 0} for n in models}
    rows: dict[str, dict] = {
        n: {"weight_bytes": weight_bytes(m), "lengths": {}} for n, m in models.items()
    }
    t0 = time.perf_counter()
    done = 0
    while done < max(lengths):
        n = min(CHUNK, max(lengths) - done)
        x = mx.array([tokens[done : done + n]])
        y = mx.array(tokens[done + 1 : done + n + 1])
        ref = reference(x, cache=caches["float32"])[0]
        for name, model in models.items():
            logits = ref if name == "float32" else model(x, cache=caches[name])[0]
            accumulate(sums[name], logits, ref, y)
        done += n
        if done in lengths:
            base = math.exp(sums["float32"]["nll"] / done)
            print(f"--- {done} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
            for name, s in sums.items():
                ppl = math.exp(s["nll"] / done)
                r = {
                    "perplexity": ppl,
                    "perplexity_change": ppl / base - 1,
                    "kl": s["kl"] / done,
                    "top1": s["top1"] / done,
                }
                rows[name]["lengths"][str(done)] = r
                print(
                    f"{name:8s} {rows[name]['weight_bytes'] / 2**20:7.1f} MiB  ppl {ppl:8.3f} "
                    f"({100 * r['perplexity_change']:+6.2f}%)  KL {r['kl']:.4f}  "
                    f"top-1 {100 * r['top1']:5.1f}%",
                    flush=True,
                )
    name = "weights_quick" if args.quick else "weights"
    payload = {
        "model": args.model,
        "chunk": CHUNK,
        "lengths": lengths,
        "seconds": time.perf_counter() - t0,
        "results": rows,
    }
    print(f"wrote {write_json(args.out, name, payload)}")


if __name__ == "__main__":
    main()
