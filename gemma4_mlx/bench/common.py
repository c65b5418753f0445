"""The benchmark harness: the text corpus, settings named by their KV policy, the lockstep
runner, and one writer for results (JSON + PNG). A KV benchmark (quality, needle, speed, memory)
is its settings table, its metric and its plot on top of these.

- Settings: ``{name: KVPolicy}``, the name the policy's text form (``str(policy)``, which
  ``KVPolicy.parse`` reads back), the exact cache named after the dtype it runs in (``fp32``
  here, ``bf16`` in the memory benchmark). ``choose`` picks them from a ``--settings`` string of
  aliases or text forms; the baseline always comes first.
- ``Lockstep``: one cache per setting, built by the model's own ``make_cache(policy)``; every
  chunk goes to the baseline first and then to every other setting, so each chunk's results
  for all settings are there when the chunk completes (a stopped run keeps what it measured,
  and a slowdown of this shared CPU falls on every setting alike).
- ``write_results``: ``NAME.json`` and ``NAME.png`` written atomically (a file and then a rename),
  so a stopped run never leaves half a file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gemma4_mlx.cache import KIND_ALIASES, KV_KINDS, KVPolicy, KVPolicyError, cache_layers

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


# -- settings ---------------------------------------------------------------------------------
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


def lloyd_policy() -> KVPolicy:
    """The previous default (``turboquant:grid=lloyd``: K3/V2, Lloyd-Max codes), exact tokens as
    bfloat16: what the uniform-grid default was measured against."""
    return KVPolicy("turboquant", grid="lloyd", exact_dtype=EXACT)


def setting_name(policy: KVPolicy, baseline: str = "fp32") -> str:
    """A result name that says what a setting is: the policy's text form (``str(policy)``,
    which ``KVPolicy.parse`` reads back), e.g. ``affine:4`` or
    ``turboquant:k3.125,v2,tiers=4,sink=4,window=32,center=128,block=512,codec=mse,grid=uniform,``
    ``exact=bfloat16``.
    The exact cache is named ``baseline``, the dtype it holds (``fp32``: the models run float32
    here); an exact cache read another way than mlx-lm's (``exact:attention=grouped``) by its
    text form, so that it is a row of its own."""
    if policy.kind == "exact" and str(policy) == str(KVPolicy()):
        return baseline
    return str(policy)


def named(*policies: KVPolicy, baseline: str = "fp32") -> dict[str, KVPolicy]:
    """{setting_name(policy): policy}, in order, the exact cache (the baseline) first."""
    out = {setting_name(p, baseline): p for p in policies}
    return dict(sorted(out.items(), key=lambda item: item[0] != baseline))


def choose(aliases: dict[str, KVPolicy], names: str, baseline: str = "fp32") -> dict:
    """Settings picked on a command line: ``all`` (every alias), or a list of aliases (the keys
    of ``aliases``), result names or any KV policy text form (``KVPolicy.parse``: ``affine:4``,
    ``turboquant:k3.5,v2``), separated by ``;`` or, when no text form has a comma in it, by
    ``,``. The baseline (the exact cache, named ``baseline``) always comes first. Text forms get
    the benchmarks' bfloat16 exact tokens unless they say ``exact=``. An unknown setting is one
    line on stderr and exit status 2. Returns {result name: policy}."""
    if names == "all":
        return named(KVPolicy(), *aliases.values(), baseline=baseline)
    by_name = {setting_name(p, baseline): p for p in aliases.values()}
    chosen = [KVPolicy()]
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
        chosen.append(policy)
    return named(*chosen, baseline=baseline)


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


def settings_help(aliases: dict[str, KVPolicy], default: str) -> str:
    """The ``--settings`` help line of a benchmark with these aliases."""
    return (
        f"all | comma-separated aliases ({', '.join(aliases)}) or KV policy text forms "
        f"(e.g. affine:4;turboquant:k4,window=64), ;-separated when a text form has commas; "
        f"default: {default}"
    )


# -- the lockstep runner ----------------------------------------------------------------------
def spans(total: int, chunk: int, stops: Iterable[int] = ()) -> list[tuple[int, int]]:
    """(start, end) token spans of at most ``chunk`` covering [0, total), one ending at each stop
    (a checkpoint where results are taken)."""
    bounds = sorted({s for s in stops if 0 < s < total} | {total})
    out, start = [], 0
    for stop in bounds:
        while start < stop:
            end = min(start + chunk, stop)
            out.append((start, end))
            start = end
    return out


class Lockstep:
    """One cache per setting (``model.make_cache(policy)``), every one fed the same tokens, the
    baseline (the first setting) first."""

    def __init__(self, model: Any, settings: dict[str, KVPolicy], caches: dict | None = None):
        self.model, self.settings = model, settings
        self.caches = caches or {n: model.make_cache(p) for n, p in settings.items()}
        self.fed = 0  # tokens in every cache

    def branch(self) -> Lockstep:
        """An independent copy of every cache (a prompt prefilled once, continued many ways)."""
        new = Lockstep(self.model, self.settings, copy.deepcopy(self.caches))
        new.fed = self.fed
        return new

    def feed(
        self,
        tokens: list[int],
        each: Callable[[str, Any], None] | None = None,
        logits: bool = True,
        step: Callable[[str, Callable], Any] | None = None,
    ) -> None:
        """The same ``tokens`` through every setting's cache, the baseline first. ``logits``:
        each setting's (L, V) logits are evaluated and handed to ``each(name, logits)`` before
        the next setting runs (one setting's logits in memory at a time); else only the cache
        state is evaluated, as ``generate`` prefills (no logits computed), and ``each`` gets
        None. ``step(name, forward)`` runs each setting's forward pass (a benchmark times it or
        reads its peak memory there) and returns what ``forward()`` returned."""
        import mlx.core as mx

        x = mx.array([tokens])
        for name, cache in self.caches.items():

            def forward(cache=cache):
                y = self.model(x, cache=cache)
                if not logits:
                    mx.eval([c.state for c in cache])
                    return None
                mx.eval(y)
                return y[0]

            out = forward() if step is None else step(name, forward)
            if each is not None:
                each(name, out)
        self.fed += len(tokens)

    def run(
        self,
        tokens: list[int],
        chunk: int,
        stops: Iterable[int] = (),
        each: Callable[[int, int, str, Any], None] | None = None,
        on_stop: Callable[[int], None] | None = None,
        logits: bool = True,
        step: Callable[[str, Callable], Any] | None = None,
    ) -> None:
        """Feed ``tokens`` (the next ones after the ``self.fed`` already in the caches) in
        chunks of ``chunk`` that end at every stop (token counts in the caches):
        ``each(start, end, name, logits)`` after each setting's chunk (``feed``), and
        ``on_stop(n)`` once every setting holds ``n`` tokens (write the results so far there)."""
        stops = sorted(stops)
        base = self.fed
        for start, end in spans(len(tokens), chunk, [s - base for s in stops]):

            def one(name, out, start=start, end=end):
                if each is not None:
                    each(base + start, base + end, name, out)

            self.feed(tokens[start:end], one, logits=logits, step=step)
            if on_stop is not None and base + end in stops:
                on_stop(base + end)


def greedy(model: Any, cache: list, first: int, steps: int, stop=None) -> list[int]:
    """Up to ``steps`` greedy tokens after token ``first`` (one token a step, argmax, evaluated
    each step, as a decode loop runs); ``stop(tokens)`` True ends early."""
    import mlx.core as mx

    out: list[int] = []
    token = mx.array(first)
    for _ in range(steps):
        logits = model(token.reshape(1, 1), cache=cache, last_only=True)
        token = mx.argmax(logits[0, -1])
        mx.eval(token)
        out.append(token.item())
        if stop is not None and stop(out):
            break
    return out


# -- what the KV benchmarks measure -----------------------------------------------------------
def cache_bytes(model: Any, cache: list) -> tuple[int, int]:
    """(all layers, global layers) bytes a model's caches hold (``nbytes``; mlx-lm's
    QuantizedKVCache cannot count itself while empty: it holds nothing then)."""
    config = model.config if hasattr(model, "config") else model
    sizes = [0 if c.empty() else c.nbytes for c in cache]
    specs = cache_layers(config)
    return sum(sizes), sum(n for s, n in zip(specs, sizes) if not s.is_sliding)


def global_bits(model: Any, cache: list, tokens: int) -> float:
    """Stored bits per cached channel of the global layers: the caches' real ``nbytes`` (exact
    window and growth slack included) over 2 (keys and values) x kv heads x head dim x tokens."""
    config = model.config if hasattr(model, "config") else model
    channels = sum(
        2 * s.n_kv_heads * s.head_dim * tokens for s in cache_layers(config) if not s.is_sliding
    )
    return cache_bytes(model, cache)[1] * 8 / channels


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


def describe(settings: dict[str, KVPolicy], dtype: str = "float32") -> dict[str, str]:
    """{name: the setting in words} for a result file (the exact cache in ``dtype``)."""
    return {n: p.describe(dtype) for n, p in settings.items()}


# -- one writer ---------------------------------------------------------------------------------
def write_json(out: Path, name: str, payload: dict) -> Path:
    """Write ``out/name.json`` atomically (a stopped run never leaves a half-written file)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_results(out: Path, name: str, payload: dict, plot: Callable[[], Any]) -> Path:
    """``out/name.json`` and ``out/name.png``, both atomically; ``plot()`` draws the figure from
    the results and returns it (a matplotlib Figure). Returns the JSON path."""
    path = write_json(out, name, payload)
    fig = plot()
    tmp = out / f"{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    tmp.replace(out / f"{name}.png")
    return path


def result_name(base: str, quick: bool) -> str:
    """The file name of a run: ``base``, or ``base_quick`` for ``--quick`` (CI's runs)."""
    return f"{base}_quick" if quick else base
