"""Shared by the real-weights benchmarks: the text corpus, global-layer storage, result files."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from gemma4_mlx.cache import KIND_ALIASES, KV_KINDS, KVPolicy, KVPolicyError

LICENSES = Path("/usr/share/common-licenses")
# The model runs in float32 here, but Gemma 4 runs in bfloat16 on a Mac: TurboQuant's exact tokens
# (sink, recent window, centring mean) are stored as bfloat16, so the stored bytes measured are a
# real deployment's (and their rounding is in the numbers).
EXACT = "bfloat16"
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


def tq_policy(
    key_bits: float,
    value_bits: float,
    sink: int = 4,
    window: int = 32,
    center: int = 128,
    codec: str = "mse",
    block: int | None = None,
    tiers: int = 0,
) -> KVPolicy:
    """A TurboQuant policy as the benchmarks run it (exact tokens stored as bfloat16); ``block``
    None: the default's centring block; ``tiers``: key channel tiers (0: one rotation)."""
    return KVPolicy(
        "turboquant",
        key_bits=key_bits,
        value_bits=value_bits,
        sink=sink,
        fp_window=window,
        center=center,
        center_block=KVPolicy.center_block if block is None else block,
        codec=codec,
        key_tiers=tiers,
        exact_dtype=EXACT,
    )


def default_policy() -> KVPolicy:
    """The default TurboQuant policy (``--kv-cache turboquant``), exact tokens as bfloat16."""
    return KVPolicy("turboquant", exact_dtype=EXACT)


def setting_name(policy: KVPolicy) -> str:
    """A result name that says what a setting is: the policy's text form (``str(policy)``,
    which ``KVPolicy.parse`` reads back), e.g. ``affine:4`` or
    ``turboquant:k3,v2,tiers=4,sink=4,window=32,center=128,block=512,codec=mse,exact=bfloat16``.
    The exact cache is named ``fp32``: the benchmarks run float32."""
    return "fp32" if policy.kind == "exact" else str(policy)


def named(*policies) -> dict:
    """{setting_name(policy): policy}, in order."""
    return {setting_name(p): p for p in policies}


def choose(aliases: dict, names: str) -> dict:
    """Settings picked on a command line: ``all``, or a list of aliases (the keys of
    ``aliases``, which map to policies), result names or any KV policy text form
    (``KVPolicy.parse``: ``affine:4``, ``turboquant:k3.5,v2``), separated by ``;`` or, when no
    text form has a comma in it, by ``,``; fp32 (the baseline) always comes first. Text forms get
    the benchmarks' bfloat16 exact tokens unless they say ``exact=``.
    Returns {result name: policy}."""

    if names == "all":
        return named(*aliases.values())
    by_name = {setting_name(p): p for p in aliases.values()}
    chosen = [aliases["fp32"]] if "fp32" in aliases else [KVPolicy("exact")]
    for n in _split_settings(names, aliases):
        policy = aliases.get(n) or by_name.get(n)
        if policy is None:
            try:
                policy = KVPolicy.parse(n)
            except KVPolicyError as e:
                sys.stderr.write(
                    f"error: --settings: unknown setting {n!r} ({e}); use an alias"
                    f" ({', '.join(aliases)}) or a KV policy text form such as turboquant:k3.5,v2\n"
                )
                raise SystemExit(2) from None
            if policy.kind == "turboquant" and "exact=" not in n:
                policy = dataclasses.replace(policy, exact_dtype=EXACT)
        if setting_name(policy) not in map(setting_name, chosen):
            chosen.append(policy)
    return named(*chosen)


def _split_settings(names: str, aliases: dict) -> list[str]:
    """``a;b`` or ``a,b``; with commas, a piece that is neither an alias nor a policy kind continues
    the text form before it (``affine4,turboquant:k3,v2,tiers=4,tq`` is three settings)."""
    if ";" in names:
        return [n.strip() for n in names.split(";") if n.strip()]
    out: list[str] = []
    for piece in (p.strip() for p in names.split(",")):
        new = ":" in piece or piece in aliases or piece in (*KV_KINDS, *KIND_ALIASES)
        if out and not new and ":" in out[-1]:
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return out
