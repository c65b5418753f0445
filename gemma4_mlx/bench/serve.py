"""Server benchmark: time to first token and decode speed through `gemma4-mlx serve`'s HTTP API.

Runs the server in this process on a free loopback port and drives it with streaming requests
(plain http.client, SSE parsed by hand), then writes ``serve.json``:

- ``cold``: a long system prompt + a question, nothing cached;
- ``second_turn``: the same conversation one turn later, with a replayed answer that differs
  from the generated one (the prompt cache's checkpoint case): ``cached_tokens`` and TTFT;
- ``unconstrained`` / ``constrained``: the same cached prompt answered freely and under a JSON
  schema (llguidance mask on every token); ``constrained_decode_ratio`` is their decode speeds;
- ``prompt_cache_tokens_per_gib``: agent-context tokens one GiB of prompt cache holds, from the
  real ``nbytes`` of an exact and a TurboQuant cache filled with the same ``--cache-tokens``
  tokens (sliding layers hold a fixed window, so the ratio grows with the context).

The demo model (Gemma 3 270M) is a base model without a chat template; the benchmark serves it
with the minimal Gemma 4 turn template (gemma4_mlx.tokenizer.GEMMA4_TEMPLATE): the numbers are
about speed, not answers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from pathlib import Path
from typing import Any

from gemma4_mlx.bench import DEFAULT_OUT, BenchParser

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 200},
        "points": {"type": "array", "items": {"type": "string", "maxLength": 200}},
        "score": {"type": "integer"},
    },
    "required": ["title", "points", "score"],
}


def stream_chat(url: str, body: dict) -> dict:
    """One streaming chat request: TTFT (first content or reasoning), decode tokens/s, usage."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=3600)
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"error: the server answered {response.status}: {response.read()[:300]}")
    first = last = None
    usage, text = None, []
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            delta = choice["delta"]
            piece = delta.get("content") or delta.get("reasoning_content")
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                text.append(piece)
    conn.close()
    generated = usage["completion_tokens"]
    decode_s = (last - first) if first and last and last > first else float("nan")
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "completion_tokens": generated,
        "ttft_s": (first - start) if first else float("nan"),
        # the first token comes with the prefill: the rest are decode steps
        "decode_tps": (generated - 1) / decode_s if generated > 1 else float("nan"),
        "text": "".join(text),
    }


def tokens_per_gib(model: Any, tokens: list[int], policy: str) -> dict:
    """Fill a cache of ``policy`` with ``tokens`` and report what one GiB would hold."""
    import mlx.core as mx

    from gemma4_mlx.engine.prefix import cache_nbytes

    cache = model.make_cache(policy)
    for i in range(0, len(tokens), 512):
        model(mx.array([tokens[i : i + 512]]), cache=cache, last_only=True)
        mx.eval([c.state for c in cache])
    nbytes = cache_nbytes(cache)
    return {
        "tokens": len(tokens),
        "cache_bytes": nbytes,
        "tokens_per_gib": len(tokens) * 2**30 / nbytes,
    }


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a 256-token prompt, 16 tokens (CI)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument(
        "--cache-tokens", type=int, default=4096, help="context for the tokens-per-GiB figure"
    )
    ap.add_argument("--kv", default="exact", help="the served KV policy (KVPolicy text form)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    n_prompt = 256 if args.quick else args.prompt_tokens
    max_tokens = 16 if args.quick else args.max_tokens

    from gemma4_mlx.bench.common import corpus_text, write_json
    from gemma4_mlx.loading import load
    from gemma4_mlx.server import Server, ServerConfig
    from gemma4_mlx.tokenizer import GEMMA4_TEMPLATE, own_template

    model, tokenizer = load(args.model, kv_policy=args.kv)
    corpus = tokenizer.encode(corpus_text())
    system = tokenizer.decode(corpus[1 : n_prompt + 1])
    server = Server(ServerConfig(port=0, model_id="bench"))
    try:
        api = server.attach(model, tokenizer)
        api.info["template"] = own_template(tokenizer) or GEMMA4_TEMPLATE
        base = {"model": "bench", "max_tokens": max_tokens, "temperature": 0}
        first = [{"role": "system", "content": system}, {"role": "user", "content": "Summarize."}]
        cold = stream_chat(server.url, {**base, "messages": first})
        history = first + [
            {"role": "assistant", "content": "A license."},  # not what was generated
            {"role": "user", "content": "Which rights does it give?"},
        ]
        second = stream_chat(server.url, {**base, "messages": history})
        free = stream_chat(server.url, {**base, "messages": history})
        fmt = {"type": "json_schema", "json_schema": {"name": "summary", "schema": SCHEMA}}
        stream_chat(server.url, {**base, "messages": history, "response_format": fmt})  # compile
        constrained = stream_chat(server.url, {**base, "messages": history, "response_format": fmt})
    finally:
        server.close()
    prompt_ids = corpus[: (1024 if args.quick else args.cache_tokens)]
    per_gib = {p: tokens_per_gib(model, prompt_ids, p) for p in ("exact", "turboquant")}
    for r in (cold, second, free, constrained):
        r.pop("text")
    payload = {
        "model": args.model,
        "kv_policy": args.kv,
        "prompt_tokens": n_prompt,
        "max_tokens": max_tokens,
        "cold": cold,
        "second_turn": second,
        "unconstrained": free,
        "constrained": constrained,
        "constrained_decode_ratio": constrained["decode_tps"] / free["decode_tps"],
        "prompt_cache_tokens_per_gib": per_gib,
        "turboquant_vs_exact_tokens_per_gib": per_gib["turboquant"]["tokens_per_gib"]
        / per_gib["exact"]["tokens_per_gib"],
    }
    path = write_json(args.out, "serve_quick" if args.quick else "serve", payload)
    print(json.dumps(payload, indent=1))
    print(f"wrote {path}")
