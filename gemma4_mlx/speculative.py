"""Speculative decoding with a draft model (over mlx-lm's ``speculative_generate_step``) or with
Gemma 4's assistant drafter (``gemma4_assistant``, our own loop: ``assistant_steps``).

A small draft model (a gemma4_text / gemma3_text checkpoint sharing the target's tokenizer)
proposes ``num_draft_tokens`` tokens; the target scores them all in one call and keeps the
longest prefix it agrees with, plus one token of its own. The target cache is then trimmed back
by the rejected drafts, so every cache must rewind that many tokens exactly: our caches do so
within their policy's ``max_rewind`` (gemma4_mlx.kv.cache), and a draft longer than that budget
is refused before anything runs (never silently shortened).

Why it is lossless: mlx-lm samples the target's token at every drafted position with the same
sampler (greedy, or temperature/top-p/top-k) and accepts a draft token only when it equals the
target's own sample there. Every emitted token is therefore the target's sample given the
emitted prefix: greedy output is plain greedy output token for token, and a sampled output has
the target's distribution (the draft only decides how many of the target's samples are used
per call). This "exact match" rule accepts less often than the rejection-sampling rule of
Leviathan et al. when sampling, but needs no draft probabilities; tests/test_speculative.py
checks both properties (token equality; a chi-square test on the sampled distribution).

The assistant drafter (models/assistant.py) keeps no cache: each round it drafts from the
target's last hidden state and the keys/values its last sliding and full layers stored
(``TargetKV``), and the round's verification is ours (``assistant_steps``): greedy, a draft is
kept when it is the target's argmax; sampling, Leviathan et al.'s accept/reject rule with the
drafter's probabilities, which also gives exactly the target's distribution
(tests/test_assistant.py checks both).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from gemma4_mlx.errors import BadArgument, BadArgumentType, UserError

# N = 3 measured best of 1..6 on this CPU (benchmarks/speculative.py: 1.09x with the 4-bit draft
# and the exact cache, 1.09x with the 8-bit draft and TurboQuant; no N pays beyond noise here)
DEFAULT_NUM_DRAFT_TOKENS = 3
DRAFT_MODEL_TYPES = ("gemma4_text", "gemma3_text", "gemma4", "gemma3")
ASSISTANT_MODEL_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


@dataclass
class SpeculativeStats:
    """What the draft did in one generation: tokens it proposed, tokens the target kept, and
    how many the target kept in each verification step (one target call per step)."""

    num_draft_tokens: int
    drafted: int = 0
    accepted: int = 0
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.accepted_per_step)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_num_draft_tokens(num_draft_tokens: Any) -> None:
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
        raise BadArgumentType("num_draft_tokens", f"must be an int, got {num_draft_tokens!r}")
    if num_draft_tokens < 1:
        raise BadArgument("num_draft_tokens", f"must be >= 1, got {num_draft_tokens}")


def rewind_budget(caches: list[Any]) -> float:
    """Tokens every cache in ``caches`` can take back exactly (inf: no bound)."""
    from gemma4_mlx.kv.cache import SlidingKVCache, TurboQuantKVCache

    budget = float("inf")
    for c in caches:
        if isinstance(c, SlidingKVCache):
            budget = min(budget, c.max_rewind)
        elif isinstance(c, TurboQuantKVCache):
            budget = min(budget, c.layout.max_rewind)
        elif not (hasattr(c, "is_trimmable") and c.is_trimmable()):
            budget = 0
    return budget


def check_rewind(caches: list[Any], trims: int, which: str) -> None:
    """Refuse a draft length whose rejections ``which`` cache could not undo exactly."""
    budget = rewind_budget(caches)
    if trims > budget:
        raise BadArgument(
            "num_draft_tokens",
            f"needs the {which} KV cache to rewind {trims} tokens, but it rewinds at most "
            f"{int(budget)} exactly; use fewer draft tokens or a policy with a larger rewind "
            f"(e.g. --kv 'turboquant:rewind={trims}')",
        )


def check_draft_model(model: Any, draft_model: Any) -> None:
    """The draft must share the target's token ids: the same vocabulary size; an assistant
    drafter must also be made for the target's size (models/assistant.py)."""
    if getattr(draft_model, "is_assistant", False):
        draft_model.check_target(_text_config(model))
        return
    target_vocab = _text_config(model).vocab_size
    draft_vocab = _text_config(draft_model).vocab_size
    if target_vocab != draft_vocab:
        raise UserError(
            f"the draft model's vocabulary ({draft_vocab} tokens) differs from the target's "
            f"({target_vocab}); a draft model must share the target's tokenizer"
        )


def prepare_draft(
    model: Any, draft_model: Any, num_draft_tokens: int | None, policy: Any = None
) -> tuple[Any, int]:
    """(draft, tokens per step) checked against ``model`` and its caches under ``policy``
    before any work: ``draft_model`` a model or a checkpoint path (load_draft)."""
    if isinstance(draft_model, (str, Path)):
        draft_model = load_draft(draft_model)
    check_draft_model(model, draft_model)
    n = DEFAULT_NUM_DRAFT_TOKENS if num_draft_tokens is None else num_draft_tokens
    check_num_draft_tokens(n)
    check_rewind(model.make_cache(policy), n, "target's")
    check_rewind(draft_model.make_cache(), n - 1, "draft model's")
    return draft_model, n


def _text_config(model: Any) -> Any:
    target = model.language_model if hasattr(model, "language_model") else model
    return target.config


def draft_model_type(path: str | Path) -> str:
    """The ``model_type`` in a draft checkpoint's config.json (UserError if unreadable)."""
    config = Path(path) / "config.json"
    try:
        return str(json.loads(config.read_text()).get("model_type", ""))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the draft model's config.json ({e})") from None


def load_draft(path: str | Path, kv_policy: Any = None, dtype: str | None = None) -> Any:
    """Load a draft checkpoint, the kind detected from its config.json: a draft model, or
    Gemma 4's assistant drafter (``gemma4_assistant``)."""
    from gemma4_mlx.loading import load_model, resolve_model_path

    model_dir = resolve_model_path(str(path))
    kind = draft_model_type(model_dir)
    if kind == "gemma4_assistant":  # Gemma 4's assistant (MTP) drafter: no cache of its own
        from gemma4_mlx.loading import load_assistant

        return load_assistant(model_dir, dtype=dtype)[0]
    if kind in ASSISTANT_MODEL_TYPES:
        raise UserError(
            f"{path}: a {kind} drafter (the 12B's assistant) is not supported yet; "
            "use a gemma4_assistant drafter or a small gemma4_text/gemma3_text model"
        )
    if kind not in DRAFT_MODEL_TYPES:
        raise UserError(
            f"{path}: model_type {kind!r} cannot draft for Gemma 4 (expected one of "
            f"{', '.join(DRAFT_MODEL_TYPES)})"
        )
    draft, _ = load_model(model_dir, dtype=dtype, text_only=True)
    if kv_policy is not None:
        from gemma4_mlx.cache import bind_policy

        bind_policy(draft, kv_policy)
    return draft


class _WithCache:
    """``model`` as mlx-lm's speculative loop sees it: it splits one list of caches at
    ``len(model.layers)``, and our models own fewer caches than layers (KV-shared layers read
    another layer's cache), so ``layers`` here has one entry per cache."""

    def __init__(self, model: Any, n_caches: int):
        self.model, self.layers = model, [None] * n_caches

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


Step = tuple[int, Any, bool]  # (token, the target's logprobs there, whether it was a draft)


def speculative_stream(
    model: Any,
    tokenizer: Any,
    tokens: list[int],
    draft_model: Any,
    num_draft_tokens: int,
    max_tokens: int,
    sampler: Any,
    cache: list[Any],
    draft_cache: list[Any],
    stats: SpeculativeStats,
    sampling: Any = None,
) -> Iterator[Any]:
    """Yield mlx-lm GenerationResponse objects for the completion of the prompt whose tokens
    neither cache holds yet are ``tokens`` (both caches hold the same tokens before them: a new
    prompt's caches are empty); ``stats`` is filled in as tokens come. See speculative_steps."""
    steps = speculative_steps(
        model, tokens, draft_model, num_draft_tokens, max_tokens, sampler, cache, draft_cache,
        stats, sampling,
    )  # fmt: skip
    yield from _responses(tokenizer, len(tokens), steps, max_tokens)


def speculative_steps(
    model: Any,
    tokens: list[int],
    draft_model: Any,
    num_draft_tokens: int,
    max_tokens: int,
    sampler: Any,
    cache: list[Any],
    draft_cache: list[Any],
    stats: SpeculativeStats,
    sampling: Any = None,
    banned: list[int] | None = None,
) -> Iterator[Step]:
    """(token, the target's logprobs, from_draft) for up to max_tokens tokens (stop tokens are
    the caller's business). A gemma4_assistant ``draft_model`` has no cache (``draft_cache`` is
    empty) and drafts by ``assistant_steps`` with ``sampling`` (SamplingOptions; None:
    greedy); any other runs mlx-lm's loop with ``sampler``. ``banned`` token ids are never
    drafted nor sampled (the target's logits there are -inf, as plain decoding with the same
    ban). A draft longer than the caches rewind is refused (BadArgument) before anything runs."""
    check_num_draft_tokens(num_draft_tokens)
    # The target trims up to N rejected drafts per step, the draft up to N - 1.
    check_rewind(cache, num_draft_tokens, "target's")
    if getattr(draft_model, "is_assistant", False):
        return assistant_steps(
            model, draft_model, tokens, num_draft_tokens, max_tokens, sampling, cache, stats,
            banned=banned,
        )  # fmt: skip
    check_rewind(draft_cache, num_draft_tokens - 1, "draft model's")
    return _mlx_lm_steps(
        model, tokens, draft_model, num_draft_tokens, max_tokens, sampler, cache, draft_cache,
        stats, banned,
    )  # fmt: skip


def _ban(banned: list[int] | None) -> Any:
    """logits (..., V) -> the same with ``banned`` ids at -inf (identity without a ban)."""
    if not banned:
        return lambda logits: logits
    ids = mx.array(banned, dtype=mx.int32)

    def ban(logits: mx.array) -> mx.array:
        logits = mx.array(logits)  # a copy: the caller's array is left as it is
        logits[..., ids] = -mx.inf
        return logits

    return ban


def _mlx_lm_steps(
    model, tokens, draft_model, num_draft_tokens, max_tokens, sampler, cache, draft_cache, stats,
    banned=None,
) -> Iterator[Step]:  # fmt: skip
    """mlx-lm's speculative_generate_step over our models; ``stats`` counted from its
    from_draft flags (a step: the drafts the target kept, closed by one token of its own)."""
    from mlx_lm.generate import speculative_generate_step

    ban = _ban(banned)
    steps = speculative_generate_step(
        mx.array(tokens),
        _WithCache(model, len(cache)),
        _WithCache(draft_model, len(draft_cache)),
        num_draft_tokens=num_draft_tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=[lambda _, logits: ban(logits)] if banned else None,
        prompt_cache=list(cache) + list(draft_cache),
    )
    run, new_step = 0, True  # run: drafts accepted in this step
    try:
        for n, (token, logprobs, from_draft) in enumerate(steps):
            if new_step:  # mlx-lm drafts min(N, tokens still to make) at each step's start
                stats.drafted += min(num_draft_tokens, max_tokens - n)
                run, new_step = 0, False
            if from_draft:
                run += 1
                stats.accepted += 1
            else:  # the target's own token closes a verification step
                stats.accepted_per_step.append(run)
                new_step = True
            yield int(token), logprobs, bool(from_draft)
    finally:
        steps.close()  # mlx-lm's loop rewinds the caches by the last step's rejected drafts
        if not new_step:  # the last step ended inside its accepted drafts (max_tokens, a stop)
            stats.accepted_per_step.append(run)


def _responses(tokenizer: Any, n_prompt: int, steps: Iterator[Step], max_tokens: int):
    """mlx-lm GenerationResponse objects for ``steps``, until a stop token or max_tokens."""
    from mlx_lm.generate import GenerationResponse
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0
    token, logprobs, from_draft = 0, None, False

    def response(finish_reason: str | None) -> Any:  # the token just made, as mlx-lm says it
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=n_prompt,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
        )

    try:
        for n, (token, logprobs, from_draft) in enumerate(steps):  # noqa: B007 (response reads them)
            if n == 0:
                prompt_tps = n_prompt / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            if n + 1 == max_tokens:
                break
            yield response(None)
    finally:
        steps.close()
    detokenizer.finalize()
    yield response("stop" if token in tokenizer.eos_token_ids else "length")


# --- Gemma 4's assistant drafter (models/assistant.py) ------------------------------------
#
# Unlike a draft model it keeps no cache: each round it drafts from what the target's latest
# call left, i.e. the target's final hidden state at the position before the token it drafts
# from, and the keys/values the target's last sliding and last full layer attended to. Drafting
# N tokens runs the drafter N times at one fixed position p (the token's) over those keys and
# values; the target then scores [token, d1..dN] in one call, as with a draft model.


@dataclass
class TargetKV:
    """The target's stored keys/values, as its latest calls returned them.

    ``full``: (keys, values, cache) of the last full-attention layer, covering positions
    [0, end) whatever the cache kind (plain arrays, mlx-lm's quantized tuples, TurboQuant
    stream views). ``sliding``: keys, values (B, n_kv, T, D) of the last sliding layer for
    positions [sliding_start, end), always exact arrays (SlidingKVCache). The drafter at position
    p reads positions < p: rejected drafts the target saw are masked out, never read."""

    full: tuple
    sliding: tuple[mx.array, mx.array]
    sliding_start: int
    end: int

    @classmethod
    def after_call(cls, stored: dict, end: int, before: TargetKV | None) -> TargetKV:
        """From ``TextModel.decode``'s ``stored`` for a call that ended at ``end``. The sliding
        keys it returns start one position later than the drafter reads (its window plus the
        position before), so that position is kept from the ``before`` call's."""
        from gemma4_mlx.config import FULL, SLIDING

        fk, fv, _, fcache = stored[FULL]
        sk, sv, _, _ = stored[SLIDING]
        start = end - sk.shape[2]
        if before is not None and before.sliding_start < start:
            keep = slice(max(before.sliding_start, start - 1) - before.sliding_start,
                         start - before.sliding_start)  # fmt: skip
            sk = mx.concatenate([before.sliding[0][:, :, keep], sk], axis=2)
            sv = mx.concatenate([before.sliding[1][:, :, keep], sv], axis=2)
            start = max(before.sliding_start, start - 1)
        return cls((fk, fv, fcache), (sk, sv), start, end)

    def for_position(self, p: int, window: int) -> dict[str, tuple]:
        """layer type -> (keys, values, mask, cache) for a drafter query at position p.

        Sliding layers: the last window + 1 positions before p, as transformers' drafter mask
        gives (built bidirectional over the target's states, then flipped). Full layers: every
        position before p (a boolean mask hides later ones)."""
        from gemma4_mlx.config import FULL, SLIDING

        lo = max(self.sliding_start, p - 1 - window) - self.sliding_start
        hi = p - self.sliding_start
        sliding = (self.sliding[0][:, :, lo:hi], self.sliding[1][:, :, lo:hi], None, None)
        keys, values, cache = self.full
        mask = None
        if p < self.end:
            n = _kv_length(keys)
            mask = (mx.arange(self.end - n, self.end) < p)[None]  # (1, keys)
        return {SLIDING: sliding, FULL: (keys, values, mask, cache)}


def _kv_length(keys: Any) -> int:
    """Positions in what a cache returned: an array or stream view (B, H, T, D), or mlx-lm's
    quantized (packed, scales, biases)."""
    return (keys[0] if isinstance(keys, (tuple, list)) else keys).shape[2]


def _language_model(model: Any) -> Any:
    return model.language_model if hasattr(model, "language_model") else model


def _distribution(logits: mx.array, sampling: Any) -> mx.array:
    """The probabilities mlx-lm's make_sampler samples from (its filters, in its order)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if 0 < sampling.top_p < 1.0:
        logprobs = apply_top_p(logprobs, sampling.top_p)
    if sampling.min_p != 0.0:
        logprobs = apply_min_p(logprobs, sampling.min_p)
    if sampling.top_k > 0:
        logprobs = apply_top_k(logprobs, sampling.top_k)
    return mx.softmax(logprobs * (1.0 / sampling.temp), axis=-1)


def _draft(lm, assistant, token, hidden, kv: dict, p: int, n: int, sampling, ban=None) -> tuple:
    """n drafts from ``token`` at position p, the target's ``hidden`` state at p - 1 and its
    stored keys/values ``kv`` (TargetKV.for_position) -> (tokens (n,), the drafter's logits
    (n, V), the distributions the tokens were sampled from (n, V), or None when greedy)."""
    embed = lm.model.embed_tokens
    current = mx.array([[token]])
    drafts, all_logits, dists = [], [], []
    for _ in range(n):
        x = mx.concatenate([lm.model.scale_embeddings(embed(current)), hidden], axis=-1)
        logits, hidden = assistant.draft_step(x, p, kv)  # hidden: (1, 1, backbone) for the next
        logits = logits[0, -1].astype(mx.float32)
        if ban is not None:
            logits = ban(logits)
        if sampling is None:
            current = mx.argmax(logits)[None, None]
        else:
            q = _distribution(logits, sampling)
            dists.append(q)
            current = mx.random.categorical(mx.log(q))[None, None]
        drafts.append(current[0, 0])
        all_logits.append(logits)
    out = mx.stack(drafts)
    mx.eval(out)
    return out, mx.stack(all_logits), (mx.stack(dists) if dists else None)


def _verify(logits: mx.array, drafts: list[int], q: Any, sampling: Any) -> tuple[int, int]:
    """(drafts accepted, the target's next token). Greedy: drafts equal to the target's argmax
    are kept. Sampling: Leviathan et al.'s rule, so the output has the target's distribution:
    draft d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected one is
    replaced by a sample of normalise(max(p_i - q_i, 0)); if all are kept, one of p_N is added."""
    if sampling is None:
        choice = mx.argmax(logits, axis=-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == choice[n]:
            n += 1
        return n, int(choice[n])
    p = _distribution(logits, sampling)  # (N + 1, V)
    if drafts:
        ids = mx.array(drafts)
        rows = mx.arange(len(drafts))
        ratio = p[rows, ids] / q[rows, ids]
        u = mx.random.uniform(shape=(len(drafts),))
        kept = (u < ratio).tolist()
        n = kept.index(False) if False in kept else len(drafts)
        if n < len(drafts):
            residual = mx.maximum(p[n] - q[n], 0.0)
            return n, int(mx.random.categorical(mx.log(residual)).item())
    else:
        n = 0
    return n, int(mx.random.categorical(mx.log(p[n])).item())


def assistant_steps(
    model: Any,
    assistant: Any,
    tokens: list[int],
    num_draft_tokens: int,
    max_tokens: int,
    sampling: Any,
    cache: list[Any],
    stats: SpeculativeStats,
    prefill_step: int = 512,
    banned: list[int] | None = None,
) -> Iterator[Step]:
    """The tokens of the completion of ``tokens`` (the prompt's tokens ``cache`` lacks), drafted
    by a gemma4_assistant ``assistant`` and verified by ``model``; ``stats`` as they come.
    ``sampling`` None or temperature 0: greedy."""
    lm = _language_model(model)
    if sampling is not None and sampling.temp == 0:
        sampling = None
    window = lm.config.sliding_window
    ban = _ban(banned)
    kv, stored = None, {}
    for i in range(0, len(tokens), prefill_step):  # the prompt, chunk by chunk
        chunk = tokens[i : i + prefill_step]
        h = lm.hidden_states(mx.array([chunk]), cache, stored)
        kv = TargetKV.after_call(stored, cache[0].offset, kv)
        mx.eval(h, [c.state for c in cache])
    logits = ban(lm.logits(h[:, -1:])[0].astype(mx.float32))  # (1, V)
    _, token = _verify(logits, [], None, sampling)
    hidden, position, made = h[:, -1:], cache[0].offset, 1
    yield token, _logprobs(logits[0]), False
    while made < max_tokens:
        n = min(num_draft_tokens, max_tokens - made - 1)  # a step makes at most n + 1 tokens
        drafts, q = [], None
        if n:
            drafted, _, q = _draft(
                lm, assistant, token, hidden, kv.for_position(position, window), position, n,
                sampling, ban,
            )  # fmt: skip
            drafts = drafted.tolist()
        h = lm.hidden_states(mx.array([[token, *drafts]]), cache, stored)
        kv = TargetKV.after_call(stored, position + n + 1, kv)
        logits = ban(lm.logits(h)[0].astype(mx.float32))  # (n + 1, V)
        accepted, token = _verify(logits, drafts, q, sampling)
        if n > accepted:
            for c in cache:
                c.trim(n - accepted)  # within max_rewind: checked before the first step
        if n:
            stats.drafted += n
            stats.accepted += accepted
            stats.accepted_per_step.append(accepted)
        for i in range(accepted):
            yield drafts[i], _logprobs(logits[i]), True
        yield token, _logprobs(logits[accepted]), False
        made += accepted + 1
        hidden, position = h[:, accepted : accepted + 1], position + accepted + 1


def _logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
