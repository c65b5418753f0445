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
    kv_cache: str = ""
    kv_cache_bytes: int = 0

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
    from gemma4_mlx.cache import cache_layers

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
    kv_policy: KVPolicy | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Any]:
    """mlx-lm's stream_generate with our cache plan; yields mlx-lm GenerationResponse objects."""
    from mlx_lm.generate import stream_generate as mlx_stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampling = sampling or SamplingOptions()
    sampling.validate()
    check_max_tokens(max_tokens)
    tokens = prompt_ids(model, tokenizer, prompt)
    check_context(model, len(tokens), max_tokens)
    if sampling.seed is not None:
        import mlx.core as mx

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
) -> GenerationResult:
    """Generate a completion; ``on_text`` receives each streamed piece of text.

    With ``prompt_cache_file``: if the file exists and its saved tokens are a prefix of this
    prompt, only the rest of the prompt is prefilled; the prompt's cache is saved back to it.
    """
    from gemma4_mlx.cache import KVPolicy

    policy = kv_policy or KVPolicy()
    check_max_tokens(max_tokens)
    (sampling or SamplingOptions()).validate()
    tokens = prompt_ids(model, tokenizer, prompt)
    check_context(model, len(tokens), max_tokens)
    cache, reused = None, 0
    if prompt_cache_file is not None and Path(prompt_cache_file).is_file():
        cache, reused = _load_prefix(Path(prompt_cache_file), tokens)
    if cache is None:
        cache = model.make_cache(policy)
    remaining = tokens[reused:]
    if prompt_cache_file is not None and reused == 0:
        # Prefill the prompt once, save it, then generate from the saved state.
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


def _prefill(model: Any, cache: list[Any], tokens: list[int], step: int = 512) -> None:
    import mlx.core as mx

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
    # None: the tokenizer's own template; a tokenizer without one chats by raw continuation
    # (each message continues the text), the rule of gemma4_mlx.tokenizer.
    chat_template: str | None = None

    def __post_init__(self) -> None:
        from gemma4_mlx.tokenizer import prompt_template

        self.template = prompt_template(
            self.tokenizer, self.chat_template, system=self.system, thinking=self.thinking
        )

    def reset(self) -> None:
        self.messages, self.cache, self.cached_tokens = [], None, []

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
        self, text: str, max_tokens: int = 256, on_text: Callable[[str], None] | None = None
    ) -> GenerationResult:
        from gemma4_mlx.cache import KVPolicy

        if not isinstance(text, str):
            raise BadArgumentType("text", f"must be a str, got {type(text).__name__}")
        if not text.strip():
            raise BadArgument("text", "is empty")
        messages = list(self.messages)
        if self.system and not messages:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": text})
        tokens, common = self._next_tokens(messages)
        check_max_tokens(max_tokens)
        check_context(self.model, len(tokens), max_tokens)  # before the cache is touched
        if common == 0 or self.cache is None:
            self.cache, common = self.model.make_cache(self.kv_policy), 0
        new = tokens[common:]
        pieces, responses = [], []
        try:
            for r in stream_generate(
                self.model,
                self.tokenizer,
                new,
                max_tokens,
                self.sampling,
                self.cache,
                self.kv_policy,
            ):
                pieces.append(r.text)
                responses.append(r)
                if on_text is not None and r.text:
                    on_text(r.text)
        except BaseException:  # an error or Ctrl-C mid-turn: the next turn re-prefills
            self.cache, self.cached_tokens = None, []
            raise
        result = _finish(
            pieces, responses, len(tokens), len(new), self.kv_policy or KVPolicy(), self.cache
        )
        self.last_prefilled = len(new)
        # mlx-lm's generate_step feeds each token before yielding it: the cache holds the
        # prompt and every generated token, the stop token included.
        self.cached_tokens = tokens + result.tokens
        self.messages = messages + [{"role": "assistant", "content": result.raw_text}]
        return result

    def save(self, path: str | Path) -> None:
        _save_prefix(Path(path), self.cache or [], self.cached_tokens)
