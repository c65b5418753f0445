"""Shared by the real-weights benchmarks: the text corpus, global-layer storage, result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LICENSES = Path("/usr/share/common-licenses")
FIRST = ("GPL-3", "Apache-2.0")


def corpus_text() -> str:
    """Real English text that ships with the OS: GPL-3, Apache-2.0, then the other licenses."""
    if not LICENSES.is_dir():
        raise SystemExit(f"error: {LICENSES} not found (the benchmarks read its license texts)")
    names = list(FIRST) + sorted(
        p.name for p in LICENSES.iterdir() if p.is_file() and p.name not in FIRST
    )
    return "\n\n".join(
        (LICENSES / n).read_text(errors="replace") for n in names if (LICENSES / n).is_file()
    )


def global_bits(model: Any, cache: list, tokens: int) -> float:
    """Stored bits per cached channel of the global layers: the caches' real ``nbytes`` (exact
    window and growth slack included) over 2 (keys and values) x kv heads x head dim x tokens."""
    channels = 0
    stored = 0
    for spec, c in zip([s for s in model.config.layers if not s.is_kv_shared], cache):
        if not spec.is_sliding:
            stored += c.nbytes
            channels += 2 * spec.n_kv_heads * spec.head_dim * tokens
    return stored * 8 / channels


def write_json(out: Path, name: str, payload: dict) -> Path:
    """Write ``out/name.json`` atomically (a stopped run never leaves a half-written file)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def accumulate(sums: dict, logits: Any, reference: Any, targets: Any) -> None:
    """Add one chunk's next-token statistics to ``sums`` (keys nll, kl, top1): negative
    log-likelihood of ``targets``, KL(reference || logits) and top-1 agreement, summed over
    positions. ``logits`` and ``reference`` are (tokens, vocab); pass the same for the baseline."""
    import mlx.core as mx

    def log_softmax(x):
        x = x.astype(mx.float32)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    ref_logp = log_softmax(reference)
    logp = ref_logp if logits is reference else log_softmax(logits)
    kl = mx.sum(mx.exp(ref_logp) * (ref_logp - logp))
    nll = -mx.sum(mx.take_along_axis(logp, targets[:, None], axis=-1))
    agree = mx.sum(mx.argmax(logp, axis=-1) == mx.argmax(ref_logp, axis=-1))
    mx.eval(nll, kl, agree)
    sums["nll"] += nll.item()
    sums["kl"] += kl.item()
    sums["top1"] += agree.item()
