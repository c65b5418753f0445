"""Generation: a thin layer over mlx-lm's stream_generate, plus stats, prompt caches and chat.

mlx-lm drives our model unchanged (same model protocol); this module adds what a Gemma user
needs around it: KV policies, sampling defaults from generation_config.json, a memory estimate,
prompt-cache files, thinking/tool-call parsing, and a Chat that keeps its cache between turns.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemma4_mlx.errors import BadArgument, BadArgumentType, UserError
from gemma4_mlx.tokenizer import ParsedOutput, parse_output

# mlx, mlx_lm and gemma4_mlx.cache are imported where they are used: importing mlx_lm imports
# transformers (and torch, where it is installed), seconds that `gemma4-mlx --help` must not pay,
# and `import gemma4_mlx` (which imports this module) stays a few milliseconds of stdlib.
if TYPE_CHECKING:
    from gemma4_mlx.cache import KVPolicy


@dataclass
class GenerationResult:
    text: str
    thinking: str | None
    tool_calls: list[dict]
    raw_text: str
    tokens: list[int]
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens actually run through the model (rest came from a cache)
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None
    kv_cache: str = ""  # the KV policy used, in words
    kv_cache_bytes: int = 0
    kv_policy: str = ""  # the KV policy used, in its text form (KVPolicy.parse reads it)
    image_tokens: list[int] = field(default_factory=list)  # soft tokens per input image
    audio_tokens: list[int] = field(default_factory=list)  # soft tokens per 30 s audio clip
    video_frames: list[int] = field(default_factory=list)  # frames sampled per input video
    # Speculative decoding (gemma4_mlx.speculative): draft tokens per step (0: none), tokens
    # the draft proposed, tokens the target kept, and how many it kept at each step.
    num_draft_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float = 0.0
    accepted_per_step: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class SamplingOptions:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def validate(self) -> None:
        for name in ("temp", "top_p", "min_p"):
            _check_number(name, getattr(self, name))
        _check_int("top_k", self.top_k)
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.temp < 0:
            raise BadArgument("temp", f"must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise BadArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BadArgument("top_k", f"must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise BadArgument("min_p", f"must be in [0, 1], got {self.min_p}")


def _check_number(name: str, value: Any) -> None:
    """A finite real number (nan and inf pass every comparison check: refuse them first)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadArgumentType(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise BadArgument(name, f"must be a finite number, got {value}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadArgumentType(name, f"must be an int, got {value!r}")


def check_max_tokens(max_tokens: Any) -> None:
    _check_int("max_tokens", max_tokens)
    if max_tokens < 1:
        raise BadArgument("max_tokens", f"must be >= 1, got {max_tokens}")


def check_prompt_text(prompt: str) -> None:
    if not prompt.strip():
        raise BadArgument("prompt", "is empty")


def prompt_ids(model: Any, tokenizer: Any, prompt: Any) -> list[int]:
    """``prompt`` (text, encoded raw as in mlx-lm, or token ids) -> checked token ids.

    Ids outside the vocabulary would index past the embedding table (a crash, not an error)."""
    if isinstance(prompt, str):
        check_prompt_text(prompt)
        return list(tokenizer.encode(prompt))
    if hasattr(prompt, "tolist"):  # an mx.array or numpy array of ids
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise BadArgumentType(
            "prompt", f"must be a str or a list of token ids, got {type(prompt).__name__}"
        )
    if not prompt:
        raise BadArgument("prompt", "is empty")
    vocab = model.config.vocab_size
    for token in prompt:
        if isinstance(token, bool) or not isinstance(token, int):
            raise BadArgumentType("prompt", f"token ids must be ints, got {token!r}")
        if not 0 <= token < vocab:
            raise BadArgument(
                "prompt", f"token id {token} is outside the vocabulary (0..{vocab - 1})"
            )
    return list(prompt)


def generation_defaults(model_dir: Path | None) -> dict:
    """temperature/top_p/top_k from generation_config.json, if the model ships one."""
    if model_dir is None or not (model_dir / "generation_config.json").is_file():
        return {}
    try:
        raw = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    if raw.get("do_sample", True) and "temperature" in raw:
        out["temp"] = float(raw["temperature"])
    for key, name in (("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p")):
        if raw.get(key) is not None:
            out[name] = raw[key]
    return out


def kv_bytes_per_token(model: Any, policy: KVPolicy) -> float:
    """Estimated KV bytes per token of context (global layers; sliding layers are bounded)."""
    import mlx.core as mx

    from gemma4_mlx.cache import cache_layers, model_dtype

    config = model.config
    dtype_bytes = getattr(mx, model_dtype(model)).size
    total = 0.0
    for spec in cache_layers(config):
        if spec.is_sliding:
            continue
        per_channel = dtype_bytes * 8
        if policy.kind == "affine":
            per_channel = policy.resolved_bits()[0] + 32 / policy.group_size
        elif policy.kind == "turboquant":
            per_channel = sum(policy.resolved_bits()) / 2 + 16 / spec.head_dim
        total += 2 * spec.n_kv_heads * spec.head_dim * per_channel / 8
    return total


def memory_warning(model_dir: Path, model: Any, policy: KVPolicy, context: int) -> str | None:
    """A warning when weights + KV for ``context`` tokens exceed this machine's memory (none
    past the model's context: that is an error, raised where the prompt is checked)."""
    if context > model.config.max_position_embeddings:
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    kv = kv_bytes_per_token(model, policy) * context
    if weights + kv > total:
        return (
            f"warning: weights ({weights / 2**30:.1f} GiB) + KV cache for {context} tokens "
            f"({kv / 2**30:.1f} GiB) exceed this machine's memory ({total / 2**30:.1f} GiB); "
            "try --kv-cache turboquant or a smaller --max-tokens"
        )
    return None


def check_context(model: Any, n_prompt: int, max_tokens: int) -> None:
    limit = model.config.max_position_embeddings
    if n_prompt == 0:
        raise BadArgument("prompt", "is empty")
    if n_prompt + max_tokens > limit:
        raise BadArgument(
            "max_tokens",
            f"({max_tokens}) + the prompt ({n_prompt} tokens) exceeds the model's context of "
            f"{limit} tokens",
        )


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int],
    max_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    prompt_cache: list[Any] | None = None,
    kv_policy: KVPolicy | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    json_schema: dict | None = None,
    thinking: bool = False,
    tools: list[dict] | None = None,
    draft_model: Any = None,
    num_draft_tokens: int | None = None,
    draft_cache: list[Any] | None = None,
    stats: Any = None,
) -> Iterator[Any]:
    """mlx-lm's stream_generate with our cache plan; yields mlx-lm GenerationResponse objects.

    ``kv_policy``: a KVPolicy or its text form (``"turboquant"``); None: the model's bound
    policy. Ignored when ``prompt_cache`` is given (that cache is used as it is).
    ``json_schema``: the answer is that schema's JSON, enforced token by token (llguidance;
    gemma4_mlx.engine.grammar), after a thought block if ``thinking``; ``tools``: calls of
    these OpenAI function tools follow their schemas (the prompt must declare them).
    ``draft_model``: speculative decoding (gemma4_mlx.speculative) with ``num_draft_tokens``
    per step; ``draft_cache`` must then hold what ``prompt_cache`` holds (default: a new one
    with the draft's bound policy, and then ``prompt_cache`` must be None too); ``stats`` (a
    SpeculativeStats) hears what the draft did."""
    from mlx_lm.generate import stream_generate as mlx_stream_generate
    from mlx_lm.sample_utils import make_sampler

    from gemma4_mlx.cache import as_policy

    kv_policy = as_policy(kv_policy)
    sampling = sampling or SamplingOptions()
    sampling.validate()
    check_max_tokens(max_tokens)
    tokens = prompt_ids(model, tokenizer, prompt)
    check_context(model, len(tokens), max_tokens)
    if sampling.seed is not None:
        import mlx.core as mx

        mx.random.seed(sampling.seed)
    processors = None
    if json_schema is not None or tools is not None:
        from gemma4_mlx.engine.grammar import grammar_processor

        processors = [grammar_processor(model, tokenizer, json_schema, tools, thinking)]
    sampler = make_sampler(sampling.temp, sampling.top_p, sampling.min_p, top_k=sampling.top_k)
    cache = prompt_cache if prompt_cache is not None else model.make_cache(kv_policy)
    draft = _draft_arguments(model, draft_model, num_draft_tokens, False, bool(processors))
    if draft is not None:
        from gemma4_mlx.speculative import SpeculativeStats, speculative_stream

        draft_model, n_draft = draft
        if draft_cache is None:
            if prompt_cache is not None:
                raise BadArgument("draft_cache", "must be given with prompt_cache")
            draft_cache = draft_model.make_cache()
        stats = stats if stats is not None else SpeculativeStats(n_draft)
        yield from speculative_stream(
            model, tokenizer, tokens, draft_model, n_draft, max_tokens, sampler, cache,
            draft_cache, stats, sampling,
        )  # fmt: skip
        return
    yield from mlx_stream_generate(
        model,
        tokenizer,
        tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        prompt_cache=cache,
        prompt_progress_callback=progress,
        logits_processors=processors,
    )


def _draft_arguments(
    model: Any, draft_model: Any, num_draft_tokens: Any, media: bool, constrained: bool
) -> tuple[Any, int] | None:
    """(draft model, tokens per step) or None, checked before any work: a checkpoint path is
    loaded, the draft must share the vocabulary, and what speculative decoding cannot do yet
    (media, constrained answers) is refused."""
    if draft_model is None:
        if num_draft_tokens is not None:
            raise BadArgument("num_draft_tokens", "needs draft_model")
        return None
    from gemma4_mlx.speculative import (
        DEFAULT_NUM_DRAFT_TOKENS,
        check_draft_model,
        check_num_draft_tokens,
        load_draft,
    )

    if media:
        raise BadArgument("draft_model", "is for text prompts only (no images, videos or audio)")
    if constrained:
        raise BadArgument("draft_model", "cannot be combined with json_schema or tools yet")
    if isinstance(draft_model, (str, Path)):  # a checkpoint: loaded as the CLI loads it
        draft_model = load_draft(draft_model)
    check_draft_model(model, draft_model)
    n = DEFAULT_NUM_DRAFT_TOKENS if num_draft_tokens is None else num_draft_tokens
    check_num_draft_tokens(n)
    return draft_model, n


def describe_used(model: Any, policy: KVPolicy, n_tokens: int) -> str:
    """The policy in words as this run used it: the exact cache's dtype named, and a
    TurboQuant run whose tokens all fit in its exact sink and window said to compress none."""
    from gemma4_mlx.cache import model_dtype

    text = policy.describe(model_dtype(model))
    if policy.kind == "turboquant" and n_tokens <= policy.exact_tokens():
        text += (
            f" (nothing compressed: this run's {n_tokens} tokens fit in the "
            f"{policy.exact_tokens()} it keeps exact)"
        )
    return text


def _finish(
    pieces: list[str],
    responses: list[Any],
    n_prompt: int,
    n_prefilled: int,
    model: Any,
    policy: KVPolicy,
    cache: list[Any],
    stats: Any = None,
) -> GenerationResult:
    raw = "".join(pieces)
    parsed: ParsedOutput = parse_output(raw)
    last = responses[-1]
    n_tokens = n_prompt + len(responses)
    speculative = {}
    if stats is not None:
        speculative = dict(
            num_draft_tokens=stats.num_draft_tokens,
            drafted_tokens=stats.drafted,
            accepted_tokens=stats.accepted,
            acceptance_rate=stats.acceptance_rate,
            accepted_per_step=list(stats.accepted_per_step),
        )
    return GenerationResult(
        **speculative,
        text=parsed.text,
        thinking=parsed.thinking,
        tool_calls=parsed.tool_calls,
        raw_text=raw,
        tokens=[int(r.token) for r in responses],
        prompt_tokens=n_prompt,
        prefilled_tokens=n_prefilled,
        prompt_tps=float(last.prompt_tps),
        generation_tps=float(last.generation_tps),
        peak_memory_gb=float(last.peak_memory),
        finish_reason=last.finish_reason,
        kv_cache=describe_used(model, policy, n_tokens),
        kv_cache_bytes=int(sum(getattr(c, "nbytes", 0) for c in cache)),
        kv_policy=str(policy),
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int],
    max_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    kv_policy: KVPolicy | str | None = None,
    prompt_cache_file: str | Path | None = None,
    on_text: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    images: list[Any] | None = None,
    image_tokens: int = 280,
    audio: list[str | Path | Any] | None = None,
    videos: list[Any] | None = None,
    json_schema: dict | None = None,
    thinking: bool = False,
    tools: list[dict] | None = None,
    draft_model: Any = None,
    num_draft_tokens: int | None = None,
) -> GenerationResult:
    """Generate a completion; ``on_text`` receives each streamed piece of text.

    ``kv_policy``: a KVPolicy or its text form (``"turboquant"``); None: the model's bound
    policy. With ``prompt_cache_file`` (gemma4_mlx.prompt_files): if the file holds a cache of
    this model, built with this policy, for a prefix of this prompt, only the rest is
    prefilled; otherwise (``on_note`` hears why; default: stderr) the prompt is prefilled with
    the requested policy and its cache saved to the file. The result reports the policy used.
    ``images`` (paths, PIL images or uint8 arrays) fill the prompt's image placeholders, one
    each (``gemma4_mlx.media.with_image_placeholders``), at ``image_tokens`` soft tokens;
    ``videos`` (paths, or ``gemma4_mlx.media.video.load_video`` results to choose the frames)
    fill ``<|video|>`` ones.
    ``audio`` (files or 16 kHz mono float arrays; E2B/E4B) fill its ``<|audio|>`` placeholders,
    one each; a str prompt without any gets them in front.
    ``json_schema``: the answer (``result.text``) is that schema's JSON, enforced while
    sampling; ``thinking``: a thought block may come first. ``tools``: tool calls are
    constrained to these tools' schemas and parsed into ``result.tool_calls``
    (gemma4_mlx.toolcalls); build the prompt with the same tools (build_prompt(tools=...)).
    ``draft_model`` (a model sharing the tokenizer, or its checkpoint directory):
    speculative decoding, ``num_draft_tokens`` per step (default DEFAULT_NUM_DRAFT_TOKENS),
    refused when that exceeds what the KV cache can rewind; the result reports drafted and
    accepted tokens. The output is the one plain decoding gives (the same tokens when greedy).
    """
    from gemma4_mlx.cache import as_policy, bound_policy
    from gemma4_mlx.prompt_files import load_prompt_file, save_prompt_file

    policy = as_policy(kv_policy) or bound_policy(model)
    check_max_tokens(max_tokens)
    (sampling or SamplingOptions()).validate()
    draft = _draft_arguments(
        model, draft_model, num_draft_tokens, bool(images or audio or videos),
        json_schema is not None or tools is not None,
    )  # fmt: skip
    if images or audio or videos:
        return _generate_with_media(
            model, tokenizer, prompt, (images or [], image_tokens, videos or [], audio or []),
            max_tokens, sampling, policy, prompt_cache_file, on_text, progress,
            json_schema=json_schema, thinking=thinking, tools=tools,
        )  # fmt: skip
    tokens = prompt_ids(model, tokenizer, prompt)
    check_context(model, len(tokens), max_tokens)  # the whole prompt, cached part included
    note = on_note or (lambda text: print(f"note: {text}", file=sys.stderr))
    cache, reused = None, 0
    if prompt_cache_file is not None and Path(prompt_cache_file).exists():
        cache, reused, why = load_prompt_file(prompt_cache_file, model, policy, tokens)
        if why:
            note(why)
    if cache is None:
        cache = model.make_cache(policy)
    if draft is not None:  # before any work: a draft the cache cannot rewind is refused
        from gemma4_mlx.speculative import check_rewind

        check_rewind(cache, draft[1], "target's")
        check_rewind(draft[0].make_cache(), draft[1] - 1, "draft model's")
    remaining = tokens[reused:]
    if prompt_cache_file is not None and reused == 0:
        # Prefill the prompt once, save it, then generate from the saved state.
        _prefill(model, cache, tokens[:-1])
        if len(tokens) > 1:
            save_prompt_file(prompt_cache_file, cache, tokens[:-1], model, policy)
        remaining = tokens[-1:]
    return _generate_from(
        model, tokenizer, tokens, len(tokens) - reused, max_tokens, sampling, cache, policy,
        on_text, progress, remaining, draft, json_schema=json_schema, thinking=thinking,
        tools=tools,
    )  # fmt: skip


def _generate_from(
    model, tokenizer, tokens, prefilled, max_tokens, sampling, cache, policy, on_text,
    progress=None, remaining=None, draft=None, json_schema=None, thinking=False, tools=None,
) -> GenerationResult:  # fmt: skip
    """Stream the completion of ``tokens`` from ``cache``, which holds all but ``remaining``
    (default: all but the last token); ``prefilled`` tokens ran through the model.
    ``draft``: (draft model, draft tokens per step) for speculative decoding."""
    pieces, responses = [], []
    remaining = tokens[-1:] if remaining is None else remaining
    spec: dict[str, Any] = {}
    if draft is not None:
        from gemma4_mlx.speculative import SpeculativeStats

        draft_model, n_draft = draft
        draft_cache = draft_model.make_cache()
        if draft_cache:  # an assistant drafter has none: it reads the target's
            _prefill(draft_model, draft_cache, tokens[: len(tokens) - len(remaining)])
        spec = dict(
            draft_model=draft_model,
            num_draft_tokens=n_draft,
            draft_cache=draft_cache,
            stats=SpeculativeStats(n_draft),
        )
    for response in stream_generate(
        model,
        tokenizer,
        remaining,
        max_tokens,
        sampling,
        cache,
        policy,
        progress,
        json_schema=json_schema,
        thinking=thinking,
        tools=tools,
        **spec,
    ):
        pieces.append(response.text)
        responses.append(response)
        if on_text is not None and response.text:
            on_text(response.text)
    result = _finish(
        pieces, responses, len(tokens), prefilled, model, policy, cache, spec.get("stats")
    )
    if tools is not None:
        _route_calls(result, tokenizer)
    return result


def _route_calls(result: GenerationResult, tokenizer: Any) -> None:
    """Answer, thought and tool calls split by gemma4_mlx.toolcalls's token router (the
    server's parser: <|"|> strings, nesting, several calls); an unparseable call raises."""
    from gemma4_mlx.toolcalls import Router

    stops = set(getattr(tokenizer, "eos_token_ids", ()))
    router = Router(tokenizer)
    deltas = [d for t in result.tokens if t not in stops for d in router.feed(t)]
    deltas += router.finish()
    errors = [d.text for d in deltas if d.kind == "tool_error"]
    if errors:
        raise UserError(f"the model wrote a tool call that cannot be parsed: {errors[0][:200]}")
    result.text = "".join(d.text for d in deltas if d.kind == "content").strip()
    thought = "".join(d.text for d in deltas if d.kind == "reasoning").strip()
    result.thinking = thought or None
    result.tool_calls = [d.call for d in deltas if d.kind == "tool_call"]


def _generate_with_media(
    model, tokenizer, prompt, inputs, max_tokens, sampling, policy, cache_file, on_text, progress,
    json_schema=None, thinking=False, tools=None,
) -> GenerationResult:  # fmt: skip
    """The whole prompt but its last token in one call (soft tokens are written at their
    placeholders, and an image block is never cut: the 26B/31B overlay needs every block
    whole), then mlx-lm's loop from the last token."""
    import mlx.core as mx

    from gemma4_mlx.media import prepare_media

    if cache_file is not None:
        raise BadArgument("prompt_cache_file", "cannot be combined with images, videos or audio")
    images, budget, videos, audio = inputs
    media: dict[str, Any] = {}
    audio_counts: list[int] = []
    if audio:
        tokens, media, audio_counts = audio_prompt(model, tokenizer, prompt, audio)
    else:
        tokens = prompt_ids(model, tokenizer, prompt)
    report: dict[str, Any] = {"image_tokens": [], "video_frames": []}
    if images or videos:  # after the audio expansion: the token types cover the final ids
        tokens, visual, report = prepare_media(model, tokenizer, tokens, images, budget, videos)
        visual["mm_token_type_ids"] = visual["mm_token_type_ids"][:, :-1]
        media.update(visual)
    check_context(model, len(tokens), max_tokens)
    cache = model.make_cache(policy)
    start = time.perf_counter()
    model(mx.array([tokens[:-1]]), cache=cache, last_only=True, **media)
    mx.eval([c.state for c in cache])
    prefill_s = time.perf_counter() - start  # media encoding included
    result = _generate_from(
        model, tokenizer, tokens, len(tokens), max_tokens, sampling, cache, policy, on_text,
        progress, json_schema=json_schema, thinking=thinking, tools=tools,
    )  # fmt: skip
    result.prompt_tps = (len(tokens) - 1) / max(prefill_s, 1e-9)  # mlx-lm saw one token
    result.audio_tokens = audio_counts
    result.image_tokens = report["image_tokens"]
    result.video_frames = report["video_frames"]
    return result


def audio_prompt(
    model: Any, tokenizer: Any, prompt: str | list[int], audio: list[str | Path | Any]
) -> tuple[list[int], dict[str, Any], list[int]]:
    """(prompt ids with each audio item's ``<|audio>`` blocks, the model's audio arguments,
    soft tokens per 30 s clip)."""
    from gemma4_mlx.media.audio import (
        AUDIO_PLACEHOLDER,
        LogMelConfig,
        expand_audio_placeholders,
        prepare_audio,
    )
    from gemma4_mlx.models.multimodal import check_audio_supported

    check_audio_supported(model)
    ids = model.media_tokens
    if ids.audio is None or ids.boa is None or ids.eoa is None:
        raise UserError("config.json lacks audio_token_id / boa_token_id / eoa_token_index")
    prepared = prepare_audio(list(audio), getattr(model, "feature_extractor", LogMelConfig()))
    if isinstance(prompt, str):
        pieces = prompt.split(AUDIO_PLACEHOLDER)
        if len(pieces) == 1:
            pieces = [""] * len(audio) + pieces
        tokens = list(tokenizer.encode(pieces[0]))  # BOS as a plain str prompt gets it
        for piece in pieces[1:]:
            tokens += [ids.audio] + _encode_plain(tokenizer, piece)
    else:
        tokens = prompt_ids(model, tokenizer, prompt)
    tokens = expand_audio_placeholders(tokens, prepared, ids.audio, ids.boa, ids.eoa)
    media = dict(input_features=prepared.features, input_features_mask=prepared.mask)
    return tokens, media, list(prepared.token_counts)


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    return list(tok.encode(text, add_special_tokens=False)) if text else []


def _prefill(model: Any, cache: list[Any], tokens: list[int], step: int = 512) -> None:
    import mlx.core as mx

    for i in range(0, len(tokens), step):
        model(mx.array([tokens[i : i + step]]), cache=cache)
        mx.eval([c.state for c in cache])


@dataclass
class Chat:
    """A multi-turn conversation that keeps the KV cache between turns.

    Each turn prefills only the tokens the cache has not seen (the new user turn and the
    template's markers), as long as the template renders earlier turns identically.
    """

    model: Any
    tokenizer: Any
    system: str | None = None
    thinking: bool = False
    kv_policy: KVPolicy | str | None = None  # None: the model's bound policy
    sampling: SamplingOptions | None = None
    messages: list[dict] = field(default_factory=list)
    cache: list[Any] | None = None
    cached_tokens: list[int] = field(default_factory=list)
    last_prefilled: int = 0
    # None: the tokenizer's own template; a tokenizer without one chats by raw continuation
    # (each message continues the text), the rule of gemma4_mlx.tokenizer.
    chat_template: str | None = None
    audio: list[Any] = field(default_factory=list)  # every turn's audio inputs, in order
    # Speculative decoding (gemma4_mlx.speculative): a draft model sharing the tokenizer, its
    # tokens per step (None: the default), and its cache, kept in step with ``cache``.
    draft_model: Any = None
    num_draft_tokens: int | None = None
    draft_cache: list[Any] | None = None
    held_tokens: int | None = None  # after a speculative turn: how many tokens both caches hold

    def __post_init__(self) -> None:
        from gemma4_mlx.cache import as_policy, bound_policy
        from gemma4_mlx.tokenizer import prompt_template

        self.template = prompt_template(
            self.tokenizer, self.chat_template, system=self.system, thinking=self.thinking
        )
        self.kv_policy = as_policy(self.kv_policy) or bound_policy(self.model)
        if self.draft_model is not None or self.num_draft_tokens is not None:
            self.draft_model, self.num_draft_tokens = _draft_arguments(
                self.model, self.draft_model, self.num_draft_tokens, False, False
            )
            from gemma4_mlx.speculative import check_rewind

            # refused now, not at the first message: a draft longer than the caches rewind
            check_rewind(self.model.make_cache(self.kv_policy), self.num_draft_tokens, "target's")
            check_rewind(self.draft_model.make_cache(), self.num_draft_tokens - 1, "draft model's")

    def reset(self) -> None:
        self.messages, self.cache, self.cached_tokens, self.audio = [], None, [], []
        self.draft_cache, self.held_tokens = None, None

    def _next_tokens(self, messages: list[dict]) -> tuple[list[int], int]:
        """(all tokens of the conversation, how many of them the cache already holds).

        The cache holds the exact tokens generated last turn (stop token included); only the
        text the template adds after the model's answer is encoded anew, so a re-tokenisation of
        the answer can never force a re-prefill."""
        from gemma4_mlx.tokenizer import conversation_tokens, encode_rendered, render_chat

        template, thinking = self.template, self.thinking
        if template is None:  # raw continuation: each message is a new line of the text
            if self.cache is None or not self.cached_tokens:
                text = "".join(
                    ("\n" if i and m["role"] == "user" else "") + m["content"]
                    for i, m in enumerate(messages)
                )
                return list(self.tokenizer.encode(text)), 0
            new = encode_rendered(self.tokenizer, "\n" + messages[-1]["content"])
            return self.cached_tokens + new, len(self.cached_tokens)
        if self.cache is None or not self.messages or self.messages[-1]["role"] != "assistant":
            return conversation_tokens(self.tokenizer, messages, thinking, None, template), 0
        history = render_chat(self.tokenizer, self.messages, thinking, False, None, template)
        full = render_chat(self.tokenizer, messages, thinking, True, None, template)
        answer = self.messages[-1]["content"]
        end = history.rfind(answer) + len(answer) if answer else -1
        if not full.startswith(history) or end < len(answer):
            return conversation_tokens(self.tokenizer, messages, thinking, None, template), 0
        tail = history[end:]  # e.g. "<turn|>\n": the template's end of the model's turn
        stop = self.cached_tokens[-1]
        if stop in getattr(self.tokenizer, "eos_token_ids", ()):
            stop_text = self.tokenizer._tokenizer.decode([stop])
            if tail.startswith(stop_text):
                tail = tail[len(stop_text) :]  # already in the cache
        new = encode_rendered(self.tokenizer, tail + full[len(history) :])
        return self.cached_tokens + new, len(self.cached_tokens)

    def send(
        self,
        text: str,
        max_tokens: int = 256,
        on_text: Callable[[str], None] | None = None,
        audio: list[str | Path | Any] | None = None,
        images: list[Any] | None = None,
        image_tokens: int = 280,
    ) -> GenerationResult:
        """One user turn; ``audio`` (files or 16 kHz arrays) and ``images`` go before the text,
        as the chat template places media. Earlier turns' images stay in the KV cache as their
        soft tokens (a turn that forces a re-prefill raises); earlier audio is read again."""
        import mlx.core as mx

        from gemma4_mlx.media.audio import AUDIO_PLACEHOLDER

        if not isinstance(text, str):
            raise BadArgumentType("text", f"must be a str, got {type(text).__name__}")
        if not text.strip():
            raise BadArgument("text", "is empty")
        audio = list(audio or [])
        messages = list(self.messages)
        if self.system and not messages:
            messages.append({"role": "system", "content": self.system})
        text = AUDIO_PLACEHOLDER * len(audio) + text
        if images:
            from gemma4_mlx.media import with_image_placeholders
            from gemma4_mlx.models.multimodal import check_media_supported

            check_media_supported(self.model)
            text = with_image_placeholders(
                self.tokenizer, self.model.media_tokens, text, len(images)
            )
        messages.append({"role": "user", "content": text})
        check_max_tokens(max_tokens)
        if self.draft_model is not None and (images or audio or self.audio):
            raise BadArgument("draft_model", "is for text turns only (no images or audio)")
        tokens, common = self._next_tokens(messages)
        if self.held_tokens is not None:  # the caches lack the end of the last answer
            common = min(common, self.held_tokens)
        if common == 0 and any(m.get("images") for m in self.messages):
            raise UserError("the conversation's images are no longer in the cache: /reset")
        if self.cache is None:
            common = 0
        # A prefill from scratch re-reads every turn's audio; a cached one only this turn's.
        turn_audio = (self.audio + audio) if common == 0 else audio
        new = tokens[common:]
        media: dict[str, Any] = {}
        if turn_audio:
            new, media, _ = audio_prompt(self.model, self.tokenizer, new, turn_audio)
        if images:
            from gemma4_mlx.media import prepare_media

            new, visual, _ = prepare_media(self.model, self.tokenizer, new, images, image_tokens)
            visual["mm_token_type_ids"] = visual["mm_token_type_ids"][:, :-1]
            media.update(visual)
        tokens = tokens[:common] + new
        check_context(self.model, len(tokens), max_tokens)  # before the cache is touched
        self.held_tokens = None  # the turn is accepted: from here on the caches change
        if common == 0:
            self.cache, self.draft_cache = self.model.make_cache(self.kv_policy), None
        prefilled = len(tokens) - common
        pieces, responses = [], []
        try:
            spec = self._speculative(tokens, common)
            if media:
                self.model(mx.array([new[:-1]]), cache=self.cache, last_only=True, **media)
                mx.eval([c.state for c in self.cache])
                new = new[-1:]
            for r in stream_generate(
                self.model,
                self.tokenizer,
                new,
                max_tokens,
                self.sampling,
                self.cache,
                self.kv_policy,
                **spec,
            ):
                pieces.append(r.text)
                responses.append(r)
                if on_text is not None and r.text:
                    on_text(r.text)
        except BaseException:  # an error or Ctrl-C mid-turn: the next turn re-prefills
            self.cache, self.cached_tokens, self.draft_cache = None, [], None
            self.held_tokens = None
            raise
        result = _finish(
            pieces, responses, len(tokens), prefilled, self.model, self.kv_policy, self.cache,
            spec.get("stats"),
        )  # fmt: skip
        self.last_prefilled = prefilled
        # mlx-lm's generate_step feeds each token before yielding it: the cache holds the
        # prompt and every generated token, the stop token included.
        self.cached_tokens = tokens + result.tokens
        if spec:
            self._align_draft_cache(responses)
        if images:
            messages[-1]["images"] = len(images)
        self.messages = messages + [{"role": "assistant", "content": result.raw_text}]
        self.audio = self.audio + audio
        return result

    def _speculative(self, tokens: list[int], common: int) -> dict[str, Any]:
        """stream_generate's draft arguments for this turn (none without a draft model); the
        draft cache is brought to the target cache's ``common`` tokens first."""
        if self.draft_model is None:
            return {}
        from gemma4_mlx.speculative import SpeculativeStats, check_rewind

        n = self.num_draft_tokens  # checked in __post_init__
        check_rewind(self.cache, n, "target's")
        if self.draft_cache is None or common == 0:
            self.draft_cache = self.draft_model.make_cache()
            if self.draft_cache:  # an assistant drafter has none: it reads the target's
                _prefill(self.draft_model, self.draft_cache, tokens[:common])
        check_rewind(self.draft_cache, n - 1, "draft model's")
        return dict(
            draft_model=self.draft_model,
            num_draft_tokens=n,
            draft_cache=self.draft_cache,
            stats=SpeculativeStats(n),
        )

    def _align_draft_cache(self, responses: list[Any]) -> None:
        """After a speculative turn the two caches hold the conversation to different lengths
        (the target has not seen its last token; a stop inside accepted drafts leaves extra
        ones): trim both to the shorter and remember how many tokens both hold, so that the
        next turn prefills the rest."""
        both = [c for c in (self.cache, self.draft_cache) if c]  # an assistant has no cache
        held = min(*(c[0].offset for c in both), len(self.cached_tokens))
        for caches in both:
            extra = caches[0].offset - held
            if extra:
                for c in caches:
                    c.trim(extra)
        self.held_tokens = held

    def save(self, path: str | Path) -> None:
        """Save the conversation's KV cache (gemma4_mlx.prompt_files); UserError if there is
        nothing to save yet or the path cannot be written (the conversation goes on)."""
        from gemma4_mlx.prompt_files import save_prompt_file

        held = self.cached_tokens[: self.held_tokens]  # held_tokens None: all of them
        save_prompt_file(path, self.cache or [], held, self.model, self.kv_policy)
