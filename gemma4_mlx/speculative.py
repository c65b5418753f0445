"""Speculative decoding with a draft model, over mlx-lm's ``speculative_generate_step``.

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

DEFAULT_NUM_DRAFT_TOKENS = 3  # see README "Speculative decoding" (benchmarks/speculative.py)
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
    """The draft must share the target's token ids: the same vocabulary size."""
    if getattr(draft_model, "is_assistant", False):
        return
    target_vocab = _text_config(model).vocab_size
    draft_vocab = _text_config(draft_model).vocab_size
    if target_vocab != draft_vocab:
        raise UserError(
            f"the draft model's vocabulary ({draft_vocab} tokens) differs from the target's "
            f"({target_vocab}); a draft model must share the target's tokenizer"
        )


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
    """Load a draft checkpoint, the kind detected from its config.json."""
    from gemma4_mlx.loading import load_model, resolve_model_path

    model_dir = resolve_model_path(str(path))
    kind = draft_model_type(model_dir)
    if kind in ASSISTANT_MODEL_TYPES:
        raise UserError(
            f"{path}: a {kind} drafter (Gemma 4's assistant) is not supported yet; "
            "use a small gemma4_text/gemma3_text model as --draft-model"
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
) -> Iterator[Any]:
    """Yield mlx-lm GenerationResponse objects for the completion of the prompt whose tokens
    neither cache holds yet are ``tokens`` (both caches hold the same tokens before them: a new
    prompt's caches are empty); ``stats`` is filled in as tokens come."""
    from mlx_lm.generate import GenerationResponse, speculative_generate_step
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    check_num_draft_tokens(num_draft_tokens)
    # The target trims up to N rejected drafts per step, the draft up to N - 1.
    check_rewind(cache, num_draft_tokens, "target's")
    check_rewind(draft_cache, num_draft_tokens - 1, "draft model's")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    prompt = mx.array(tokens)
    steps = speculative_generate_step(
        prompt,
        _WithCache(model, len(cache)),
        _WithCache(draft_model, len(draft_cache)),
        num_draft_tokens=num_draft_tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        prompt_cache=list(cache) + list(draft_cache),
    )
    tic = time.perf_counter()
    prompt_tps, n, run, new_step = 0.0, 0, 0, True  # run: drafts accepted in this step
    token, logprobs, from_draft = 0, None, False

    def response(finish_reason: str | None) -> Any:  # the token just made, as mlx-lm says it
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
        )

    try:
        for n, (token, logprobs, from_draft) in enumerate(steps):  # noqa: B007 (response reads them)
            if n == 0:
                prompt_tps = prompt.size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if new_step:  # mlx-lm drafts min(N, tokens still to make) at each step's start
                stats.drafted += min(num_draft_tokens, max_tokens - n)
                run, new_step = 0, False
            if from_draft:
                run += 1
                stats.accepted += 1
            else:  # the target's own token closes a verification step
                stats.accepted_per_step.append(run)
                new_step = True
            if token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            if n + 1 == max_tokens:
                break
            yield response(None)
    finally:
        steps.close()  # mlx-lm's loop rewinds the caches by the last step's rejected drafts
    if not new_step:  # the last step ended inside its accepted drafts (max_tokens, a stop)
        stats.accepted_per_step.append(run)
    detokenizer.finalize()
    yield response("stop" if token in tokenizer.eos_token_ids else "length")
