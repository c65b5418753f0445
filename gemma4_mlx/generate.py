"""Generation: a thin layer over mlx-lm's stream_generate, plus stats, prompt caches and chat.

mlx-lm drives our model unchanged (same model protocol); this module adds what a Gemma user
needs around it: KV policies, sampling defaults from generation_config.json, a memory estimate,
prompt-cache files, thinking/tool-call parsing, and a Chat that keeps its cache between turns.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.sample_utils import make_sampler

from gemma4_mlx.cache import KVPolicy, cache_layers
from gemma4_mlx.errors import UserError
from gemma4_mlx.tokenizer import ParsedOutput, parse_output


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
    kv_cache: str = ""
    kv_cache_bytes: int = 0
    image_tokens: list[int] = field(default_factory=list)  # soft tokens per input image
    video_frames: list[int] = field(default_factory=list)  # frames sampled per input video

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
        if self.temp < 0:
            raise UserError(f"--temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"--min-p must be in [0, 1], got {self.min_p}")


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
    config = model.config
    dtype_bytes = model.model.embed_tokens.weight.dtype.size if hasattr(model, "model") else 2
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
    """A warning when weights + KV for ``context`` tokens exceed this machine's memory."""
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


def _check_context(model: Any, n_prompt: int, max_tokens: int) -> None:
    limit = model.config.max_position_embeddings
    if n_prompt == 0:
        raise UserError("the prompt is empty")
    if n_prompt + max_tokens > limit:
        raise UserError(
            f"prompt ({n_prompt} tokens) + --max-tokens ({max_tokens}) exceeds the model's "
            f"context of {limit} tokens"
        )


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int],
    max_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    prompt_cache: list[Any] | None = None,
    kv_policy: KVPolicy | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Any]:
    """mlx-lm's stream_generate with our cache plan; yields mlx-lm GenerationResponse objects."""
    sampling = sampling or SamplingOptions()
    sampling.validate()
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    _check_context(model, len(tokens), max_tokens)
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = make_sampler(sampling.temp, sampling.top_p, sampling.min_p, top_k=sampling.top_k)
    cache = prompt_cache if prompt_cache is not None else model.make_cache(kv_policy)
    yield from mlx_stream_generate(
        model,
        tokenizer,
        tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        prompt_cache=cache,
        prompt_progress_callback=progress,
    )


def _finish(
    pieces: list[str],
    responses: list[Any],
    n_prompt: int,
    n_prefilled: int,
    policy: KVPolicy,
    cache: list[Any],
) -> GenerationResult:
    raw = "".join(pieces)
    parsed: ParsedOutput = parse_output(raw)
    last = responses[-1]
    return GenerationResult(
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
        kv_cache=policy.describe(),
        kv_cache_bytes=int(sum(getattr(c, "nbytes", 0) for c in cache)),
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int],
    max_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    kv_policy: KVPolicy | None = None,
    prompt_cache_file: str | Path | None = None,
    on_text: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    images: list[Any] | None = None,
    image_tokens: int = 280,
    videos: list[Any] | None = None,
) -> GenerationResult:
    """Generate a completion; ``on_text`` receives each streamed piece of text.

    With ``prompt_cache_file``: if the file exists and its saved tokens are a prefix of this
    prompt, only the rest of the prompt is prefilled; the prompt's cache is saved back to it.
    ``images`` (paths, PIL images or uint8 arrays) fill the prompt's image placeholders, one
    each (``gemma4_mlx.media.with_image_placeholders``), at ``image_tokens`` soft tokens;
    ``videos`` (paths, or ``gemma4_mlx.media.video.load_video`` results to choose the frames)
    fill ``<|video|>`` ones.
    """
    policy = kv_policy or KVPolicy()
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if images or videos:
        return _generate_with_media(
            model, tokenizer, tokens, (images or [], image_tokens, videos or []), max_tokens,
            sampling, policy, prompt_cache_file, on_text, progress,
        )  # fmt: skip
    cache, reused = None, 0
    if prompt_cache_file is not None and Path(prompt_cache_file).is_file():
        cache, reused = _load_prefix(Path(prompt_cache_file), tokens)
    if cache is None:
        cache = model.make_cache(policy)
    remaining = tokens[reused:]
    if prompt_cache_file is not None and reused == 0:
        # Prefill the prompt once, save it, then generate from the saved state.
        _check_context(model, len(tokens), max_tokens)
        _prefill(model, cache, tokens[:-1])
        _save_prefix(Path(prompt_cache_file), cache, tokens[:-1])
        remaining = tokens[-1:]
    pieces, responses = [], []
    for response in stream_generate(
        model, tokenizer, remaining, max_tokens, sampling, cache, policy, progress
    ):
        pieces.append(response.text)
        responses.append(response)
        if on_text is not None and response.text:
            on_text(response.text)
    return _finish(pieces, responses, len(tokens), len(tokens) - reused, policy, cache)


def _generate_with_media(
    model, tokenizer, tokens, inputs, max_tokens, sampling, policy, cache_file, on_text, progress,
) -> GenerationResult:  # fmt: skip
    """The whole prompt but its last token in one call (an image block is never cut: the
    26B/31B overlay needs every block whole), then mlx-lm's loop from the last token."""
    from gemma4_mlx.media import prepare_media

    if cache_file is not None:
        raise UserError("--prompt-cache-file cannot be combined with images or videos")
    images, budget, videos = inputs
    tokens, media, report = prepare_media(model, tokenizer, tokens, images, budget, videos)
    _check_context(model, len(tokens), max_tokens)
    cache = model.make_cache(policy)
    media["mm_token_type_ids"] = media["mm_token_type_ids"][:, :-1]
    start = time.perf_counter()
    model(mx.array([tokens[:-1]]), cache=cache, last_only=True, **media)
    mx.eval([c.state for c in cache])
    prefill_s = time.perf_counter() - start  # media encoding included
    pieces, responses = [], []
    for response in stream_generate(
        model, tokenizer, tokens[-1:], max_tokens, sampling, cache, policy, progress
    ):
        pieces.append(response.text)
        responses.append(response)
        if on_text is not None and response.text:
            on_text(response.text)
    result = _finish(pieces, responses, len(tokens), len(tokens), policy, cache)
    result.prompt_tps = (len(tokens) - 1) / max(prefill_s, 1e-9)  # mlx-lm saw one token
    result.image_tokens = report["image_tokens"]
    result.video_frames = report["video_frames"]
    return result


def _prefill(model: Any, cache: list[Any], tokens: list[int], step: int = 512) -> None:
    for i in range(0, len(tokens), step):
        model(mx.array([tokens[i : i + step]]), cache=cache)
        mx.eval([c.state for c in cache])


def _save_prefix(path: Path, cache: list[Any], tokens: list[int]) -> None:
    from turboquant.cache import save_prompt_cache

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.safetensors")
    save_prompt_cache(str(tmp), cache, {"tokens": json.dumps(tokens)})
    os.replace(tmp, path)


def _load_prefix(path: Path, tokens: list[int]) -> tuple[list[Any] | None, int]:
    from turboquant.cache import load_prompt_cache

    try:
        cache, meta = load_prompt_cache(str(path), return_metadata=True)
        saved = json.loads(meta["tokens"])
    except Exception as e:
        raise UserError(f"{path}: not a prompt cache written by gemma4-mlx ({e})") from None
    if len(saved) >= len(tokens) or tokens[: len(saved)] != saved:
        print(
            f"note: {path} does not hold a prefix of this prompt; prefilling from scratch",
            file=sys.stderr,
        )
        return None, 0
    return cache, len(saved)


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
    kv_policy: KVPolicy | None = None
    sampling: SamplingOptions | None = None
    messages: list[dict] = field(default_factory=list)
    cache: list[Any] | None = None
    cached_tokens: list[int] = field(default_factory=list)
    last_prefilled: int = 0

    def reset(self) -> None:
        self.messages, self.cache, self.cached_tokens = [], None, []

    def _next_tokens(self, messages: list[dict]) -> tuple[list[int], int]:
        """(all tokens of the conversation, how many of them the cache already holds).

        The cache holds the exact tokens generated last turn (stop token included); only the
        text the template adds after the model's answer is encoded anew, so a re-tokenisation of
        the answer can never force a re-prefill."""
        from gemma4_mlx.tokenizer import conversation_tokens, encode_rendered, render_chat

        if self.cache is None or not self.messages or self.messages[-1]["role"] != "assistant":
            return conversation_tokens(self.tokenizer, messages, thinking=self.thinking), 0
        history = render_chat(
            self.tokenizer, self.messages, self.thinking, add_generation_prompt=False
        )
        full = render_chat(self.tokenizer, messages, self.thinking, add_generation_prompt=True)
        answer = self.messages[-1]["content"]
        end = history.rfind(answer) + len(answer) if answer else -1
        if not full.startswith(history) or end < len(answer):
            return conversation_tokens(self.tokenizer, messages, thinking=self.thinking), 0
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
        images: list[Any] | None = None,
        image_tokens: int = 280,
    ) -> GenerationResult:
        """One turn; ``images`` are shown before the text of this turn. Earlier turns' images
        stay in the KV cache as their soft tokens (a turn that forces a re-prefill raises)."""
        if not text.strip():
            raise UserError("the message is empty")
        messages = list(self.messages)
        if self.system and not messages:
            messages.append({"role": "system", "content": self.system})
        if images:
            from gemma4_mlx.media import with_image_placeholders
            from gemma4_mlx.models.multimodal import check_media_supported

            check_media_supported(self.model)
            text = with_image_placeholders(
                self.tokenizer, self.model.media_tokens, text, len(images)
            )
        messages.append({"role": "user", "content": text})
        tokens, common = self._next_tokens(messages)
        if common == 0 and any(m.get("images") for m in self.messages):
            raise UserError("the conversation's images are no longer in the cache: /reset")
        if common == 0 or self.cache is None:
            self.cache, common = self.model.make_cache(self.kv_policy), 0
        new = tokens[common:]
        if images:
            from gemma4_mlx.media import prepare_media

            new, media, _ = prepare_media(self.model, self.tokenizer, new, images, image_tokens)
            tokens = tokens[:common] + new
            media["mm_token_type_ids"] = media["mm_token_type_ids"][:, :-1]
            self.model(mx.array([new[:-1]]), cache=self.cache, last_only=True, **media)
            mx.eval([c.state for c in self.cache])
            new = new[-1:]
        pieces, responses = [], []
        for r in stream_generate(
            self.model, self.tokenizer, new, max_tokens, self.sampling, self.cache, self.kv_policy
        ):
            pieces.append(r.text)
            responses.append(r)
            if on_text is not None and r.text:
                on_text(r.text)
        prefilled = len(tokens) - common
        result = _finish(
            pieces, responses, len(tokens), prefilled, self.kv_policy or KVPolicy(), self.cache
        )
        self.last_prefilled = prefilled
        # mlx-lm's generate_step feeds each token before yielding it: the cache holds the
        # prompt and every generated token, the stop token included.
        self.cached_tokens = tokens + result.tokens
        if images:
            messages[-1]["images"] = len(images)
        self.messages = messages + [{"role": "assistant", "content": result.raw_text}]
        return result

    def save(self, path: str | Path) -> None:
        _save_prefix(Path(path), self.cache or [], self.cached_tokens)
