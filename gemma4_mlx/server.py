"""``gemma4-mlx serve``: an OpenAI-compatible HTTP server for one local model.

HTTP stack: the standard library's ``ThreadingHTTPServer``. One model is served by one worker
thread (gemma4_mlx.engine.worker), so the HTTP side only parses, validates, queues and streams;
a thread per connection is plenty for a local server and adds no dependency (FastAPI + uvicorn +
pydantic would add ~10-15 MB and an async-to-thread bridge for the same behaviour).

Rules (each is tested in tests/test_server*.py):
- Every request field is enforced or refused: a semantic field we do not implement is a 400
  ``unsupported_parameter`` naming it; metadata fields (user, metadata, store, service_tier) are
  ignored. ``model`` never loads anything: any name is answered by the served model.
- ``content`` holds the answer only; the thought goes to ``reasoning_content`` and ``reasoning``;
  tool calls are parsed from Gemma 4's dialect into ``tool_calls`` with JSON-string arguments.
- ``response_format`` (json_object / json_schema) and ``tool_choice`` are enforced by an
  llguidance grammar (gemma4_mlx.engine.grammar).
- Safety: 127.0.0.1 by default; another bind needs --api-key or --allow-unauthenticated; Bearer
  auth when a key is set; no CORS headers unless the Origin is listed; a foreign Host header on a
  loopback bind is refused (DNS rebinding); body, message, tool and schema sizes are capped; a
  prompt that does not fit the context is refused before any prefill; the client going away
  cancels its generation; prompts are never logged.
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import logging
import os
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gemma4_mlx.errors import BadArgument

log = logging.getLogger("gemma4_mlx.server")

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
METADATA_FIELDS = {"user", "metadata", "store", "service_tier"}
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "seed"}
COMMON_FIELDS = {"model", "max_tokens", "stop", "stream", "stream_options", "n"} | SAMPLING_FIELDS
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "chat_template_kwargs",
    "reasoning_effort",
    "think",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}  # echo and suffix: only their "off" values
# Fields accepted only at their neutral value (what clients send when the user set nothing).
NEUTRAL = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "function_call": (None,),
    "functions": (None,),
}
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_id: str = "gemma4"
    api_key: str | None = None
    allow_unauthenticated: bool = False
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)  # extra Host names on loopback
    max_body_bytes: int = 16 << 20
    max_messages: int = 1024
    max_tools: int = 128
    max_schema_bytes: int = 64 << 10
    max_stop: int = 16
    max_tokens_cap: int | None = None  # None: the context length
    max_queue: int = 16
    prompt_cache_bytes: int = 2 << 30
    wedged_after_s: float = 120.0  # /health says 503 when a job makes no progress this long
    socket_timeout_s: float = 120.0

    def check(self) -> None:
        """Refuse an unsafe configuration before anything starts."""
        if not is_loopback(self.host) and not self.api_key and not self.allow_unauthenticated:
            raise BadArgument(
                "host",
                f"{self.host} is reachable from other machines: pass --api-key KEY, or "
                "--allow-unauthenticated to serve without one",
            )
        for origin in self.cors_origins:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise BadArgument(
                    "cors_origin",
                    f"must be an http(s) origin such as http://localhost:3000, got {origin!r}",
                )


def free_memory() -> int | None:
    """Bytes free for a new KV cache: the OS's free pages where it says (Linux), else physical
    memory less what MLX holds now (macOS has no free-page count in sysconf)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        if "SC_AVPHYS_PAGES" in os.sysconf_names:
            return os.sysconf("SC_AVPHYS_PAGES") * page
        import mlx.core as mx

        return os.sysconf("SC_PHYS_PAGES") * page - mx.get_active_memory()
    except (ValueError, OSError, AttributeError):
        return None


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def unsupported(name: str, why: str = "is not supported by this server") -> ApiError:
    return bad(f"{name} {why}", name, "unsupported_parameter")


# ---------------------------------------------------------------------------------------------
# Request validation: JSON body -> a worker Job plus what the response needs.


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number, got {json.dumps(value)[:40]}", name)
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise bad(f"{name} must be an integer, got {value}", name)
    if value != value or not lo <= value <= hi:
        raise bad(f"{name} must be in [{lo}, {hi}], got {value}", name)
    return int(value) if integer else float(value)


def _bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {json.dumps(value)[:40]}", name)
    return value


def check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in METADATA_FIELDS:
            continue
        if name in NEUTRAL and any(value == v and type(value) is type(v) for v in NEUTRAL[name]):
            continue  # the field at its "off" value
        if name in NEUTRAL and value is None:
            continue
        raise unsupported(name)


@dataclass
class Prepared:
    """A validated request: the worker's job and what the response builder needs."""

    job: Any
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    tools: bool = False  # parse tool calls
    chat: bool = True


class Api:
    """Everything between a parsed JSON body and the worker; owns no sockets."""

    def __init__(self, config: ServerConfig, model: Any, tokenizer: Any, engine: Any, info: dict):
        from gemma4_mlx.toolcalls import MarkerIds

        self.config, self.model, self.tokenizer, self.engine = config, model, tokenizer, engine
        self.info = info  # sampling defaults, policy, template
        self.context = model.config.max_position_embeddings
        self.markers = MarkerIds.of(tokenizer)
        self._compiler = None
        self._compiler_lock = threading.Lock()

    def compiler(self) -> Any:
        from gemma4_mlx.engine.grammar import GrammarCompiler

        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(
                    self.tokenizer, self.model.config.vocab_size, sorted(self.engine.stop_ids)
                )
            return self._compiler

    def warm_compiler(self) -> None:
        try:
            self.compiler()
        except Exception as e:  # the first constrained request reports it as a 400
            log.warning("constrained decoding unavailable: %s", e)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        capabilities = ["completion"]
        if self.info.get("template"):
            capabilities += ["chat", "tool_use", "json_schema"]
            if "enable_thinking" in self.info["template"]:
                capabilities.append("reasoning")
        return {
            "id": self.config.model_id,
            "object": "model",
            "created": self.info.get("created", 0),
            "owned_by": "gemma4-mlx",
            "context_length": self.context,
            "capabilities": capabilities,
            "kv_cache": self.info.get("policy", ""),
            "thinking_default": False,
        }

    # -- shared fields -------------------------------------------------------------------

    def _common(self, body: dict, n_prompt: int, job_cls: Any, prompt: list[int]) -> Any:
        if "model" in body and not isinstance(body["model"], str):
            raise bad("model must be a string", "model")
        n = _number(body, "n", 1, 1 << 30, integer=True)
        if n not in (None, 1):
            raise unsupported("n", "must be 1: this server returns one choice")
        defaults = self.info.get("sampling", {})
        temp = _number(body, "temperature", 0, 2)
        top_p = _number(body, "top_p", 0, 1)
        if top_p is not None and top_p == 0:
            raise bad("top_p must be in (0, 1], got 0", "top_p")
        top_k = _number(body, "top_k", 0, 1 << 20, integer=True)
        min_p = _number(body, "min_p", 0, 1)
        seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
        max_tokens = _number(body, "max_tokens", 1, 1 << 40, integer=True)
        if "max_completion_tokens" in body:
            other = _number(body, "max_completion_tokens", 1, 1 << 40, integer=True)
            if max_tokens is not None and other is not None and other != max_tokens:
                raise bad(
                    "max_tokens and max_completion_tokens disagree: send one",
                    "max_completion_tokens",
                )
            max_tokens = other if other is not None else max_tokens
        cap = self.config.max_tokens_cap or self.context
        if max_tokens is not None and max_tokens > cap:
            raise bad(
                f"max_tokens must be <= {cap} (--max-tokens-cap), got {max_tokens}", "max_tokens"
            )
        room = self.context - n_prompt
        if max_tokens is None:
            max_tokens = min(cap, room)
        if n_prompt + max_tokens > self.context or room < 1:
            raise bad(
                f"the prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.context} tokens",
                "messages" if "messages" in body else "prompt",
                "context_length_exceeded",
            )
        self._check_memory(n_prompt + max_tokens)
        return job_cls(
            prompt=prompt,
            max_tokens=max_tokens,
            temp=temp if temp is not None else defaults.get("temp", 0.0),
            top_p=top_p if top_p is not None else defaults.get("top_p", 1.0),
            top_k=top_k if top_k is not None else defaults.get("top_k", 0),
            min_p=min_p if min_p is not None else defaults.get("min_p", 0.0),
            seed=seed,
        )

    def _check_memory(self, n_tokens: int) -> None:
        """Refuse a request whose KV would not fit in the memory free now (Linux/macOS)."""
        per_token = self.info.get("kv_bytes_per_token", 0.0)
        free = free_memory()
        if free is None:
            return
        need = per_token * n_tokens
        if need > free:
            raise bad(
                f"the KV cache for {n_tokens} tokens needs {need / 2**30:.1f} GiB and "
                f"{free / 2**30:.1f} GiB is free: lower max_tokens or serve with a compressed "
                "KV cache (--kv-cache turboquant)",
                "max_tokens",
                "insufficient_memory",
            )

    def _stream_fields(self, body: dict) -> tuple[bool, bool]:
        stream = bool(_bool(body, "stream"))
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not isinstance(options, dict):
                raise bad("stream_options must be an object", "stream_options")
            if not stream:
                raise bad("stream_options needs stream: true", "stream_options")
            for key in options:
                if key != "include_usage":
                    raise unsupported(f"stream_options.{key}")
            include_usage = bool(_bool(options, "include_usage"))
        return stream, include_usage

    def _stop(self, body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("stop must be a string or a list of strings", "stop")
        if len(stop) > self.config.max_stop:
            raise bad(f"stop takes at most {self.config.max_stop} strings", "stop")
        return [s for s in stop if s]

    # -- /v1/completions -----------------------------------------------------------------

    def prepare_completion(self, body: dict) -> Prepared:
        from gemma4_mlx.engine.worker import Job

        check_fields(body, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise bad("prompt is empty", "prompt")
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, list) and prompt:
            vocab = self.model.config.vocab_size
            for token in prompt:
                if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                    raise bad(
                        f"prompt token ids must be ints in [0, {vocab}), got {token!r}", "prompt"
                    )
            ids = list(prompt)
        else:
            raise bad("prompt must be a non-empty string or list of token ids", "prompt")
        stream, include_usage = self._stream_fields(body)
        stop = self._stop(body)
        job = self._common(body, len(ids), Job, ids)
        return Prepared(job, stream, include_usage, stop, tools=False, chat=False)

    # -- /v1/chat/completions ------------------------------------------------------------

    def prepare_chat(self, body: dict) -> Prepared:
        from gemma4_mlx.engine.grammar import Constraint, GrammarProcessor, build_grammar
        from gemma4_mlx.engine.worker import Job
        from gemma4_mlx.tokenizer import encode_rendered, render_chat

        check_fields(body, CHAT_FIELDS)
        template = self.info.get("template")
        if not template:
            raise bad(
                "this model has no chat template (a base model): use /v1/completions", "messages"
            )
        thinking = self._thinking(body, template)
        tools, tool_mode, parallel = self._tools(body, template)
        schema = self._response_format(body)
        messages = self._messages(body)
        stream, include_usage = self._stream_fields(body)
        stop = self._stop(body)

        rendered_tools = tools if tool_mode != "none" else None
        if tool_mode == "named":
            rendered_tools = tools
        try:
            text = render_chat(self.tokenizer, messages, thinking, True, rendered_tools, template)
        except Exception as e:
            raise bad(f"messages: {e}", "messages") from None
        prompt = encode_rendered(self.tokenizer, text)
        job = self._common(body, len(prompt), Job, prompt)
        job.checkpoints = self._prefix_checkpoint(messages, rendered_tools, thinking, prompt)
        constraint = Constraint(
            json_schema=schema,
            tools=rendered_tools,
            tool_mode=tool_mode if tool_mode != "none" else "auto",
            parallel=parallel,
            thinking=thinking,
        )
        try:
            grammar = build_grammar(constraint, self.markers)
        except BadArgument as e:
            raise bad(str(e), e.name) from None
        if grammar is not None:
            param = "response_format" if schema is not None else "tools"
            try:
                matcher = self.compiler().matcher(grammar, param)
            except BadArgument as e:
                raise bad(str(e), e.name) from None
            job.grammar = GrammarProcessor(matcher, self.model.config.vocab_size)
        if tool_mode == "none" and self.markers.call_open is not None:
            job.banned = [self.markers.call_open]
        return Prepared(job, stream, include_usage, stop, tools=tool_mode != "none", chat=True)

    def _prefix_checkpoint(self, messages, tools, thinking, prompt) -> list[int]:
        """The token count of the system+tools prefix, where the next conversation sharing it
        can start: a checkpoint is stored there."""
        from gemma4_mlx.tokenizer import encode_rendered, render_chat

        if not messages or messages[0]["role"] != "system":
            return []
        try:
            head = render_chat(
                self.tokenizer, messages[:1], thinking, False, tools, self.info["template"]
            )
        except Exception:
            return []
        ids = encode_rendered(self.tokenizer, head)
        return [len(ids)] if ids == prompt[: len(ids)] else []

    def _thinking(self, body: dict, template: str) -> bool:
        votes = {}
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, dict):
                raise bad("chat_template_kwargs must be an object", "chat_template_kwargs")
            for key in kwargs:
                if key != "enable_thinking":
                    raise unsupported(f"chat_template_kwargs.{key}")
            value = _bool(kwargs, "enable_thinking")
            if value is not None:
                votes["chat_template_kwargs.enable_thinking"] = value
        effort = body.get("reasoning_effort")
        if effort is not None:
            levels = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}
            if effort not in levels:
                raise bad(
                    f"reasoning_effort must be one of {', '.join(levels)}", "reasoning_effort"
                )
            votes["reasoning_effort"] = levels[effort]
        think = _bool(body, "think")
        if think is not None:
            votes["think"] = think
        if len(set(votes.values())) > 1:
            raise bad(f"the thinking switches disagree: {votes}", next(iter(votes)))
        thinking = next(iter(votes.values())) if votes else False
        if thinking and "enable_thinking" not in template:
            raise unsupported(next(iter(votes)), "needs a chat template with a thinking mode")
        return thinking

    def _tools(self, body: dict, template: str) -> tuple[list | None, str, bool]:
        tools = body.get("tools")
        choice = body.get("tool_choice")
        parallel = _bool(body, "parallel_tool_calls")
        if tools is None or tools == []:
            if choice not in (None, "none", "auto"):
                raise bad("tool_choice needs tools", "tool_choice")
            return None, "none", True
        if not isinstance(tools, list):
            raise bad("tools must be a list", "tools")
        if len(tools) > self.config.max_tools:
            raise bad(f"at most {self.config.max_tools} tools per request", "tools")
        if "tools" not in template:
            raise unsupported("tools", "needs a chat template that renders tools")
        names = []
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise bad(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
            fn = tool.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad(f"{where}.function.name must be a string", f"{where}.function.name")
            if not fn["name"] or not all(c.isalnum() or c in "_-." for c in fn["name"]):
                raise bad(
                    f"{where}.function.name must be [A-Za-z0-9_.-]+", f"{where}.function.name"
                )
            params = fn.get("parameters")
            if params is not None:
                if not isinstance(params, dict):
                    raise bad(f"{where}.function.parameters must be an object", where)
                if len(json.dumps(params)) > self.config.max_schema_bytes:
                    raise bad(f"{where}.function.parameters is too large", where)
            names.append(fn["name"])
        if len(set(names)) != len(names):
            raise bad("tools: two tools have the same name", "tools")
        mode = "auto"
        if choice is None or choice == "auto":
            mode = "auto"
        elif choice == "none":
            mode = "none"
        elif choice == "required":
            mode = "required"
        elif isinstance(choice, dict) and choice.get("type") == "function":
            name = (choice.get("function") or {}).get("name")
            if name not in names:
                raise bad(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
            tools = [t for t in tools if t["function"]["name"] == name]
            mode = "named"
        else:
            raise bad(
                'tool_choice must be "auto", "none", "required" or '
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        return tools, mode, parallel is not False and mode != "named"

    def _response_format(self, body: dict) -> dict | None:
        fmt = body.get("response_format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise bad('response_format must be {"type": ...}', "response_format")
        kind = fmt["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind != "json_schema":
            raise bad(
                f"response_format.type {kind!r} is not text, json_object or json_schema",
                "response_format",
            )
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad(
                "response_format.json_schema must be {name, schema, strict}", "response_format"
            )
        schema = spec.get("schema", {})
        if len(json.dumps(schema)) > self.config.max_schema_bytes:
            raise bad("response_format.json_schema.schema is too large", "response_format")
        return schema

    def _messages(self, body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages must be a non-empty list", "messages")
        if len(messages) > self.config.max_messages:
            raise bad(f"at most {self.config.max_messages} messages per request", "messages")
        out, names = [], {}
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise bad(f"{where} must be an object", where)
            role = m.get("role")
            if role not in ROLES:
                raise bad(
                    f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role"
                )
            role = "system" if role == "developer" else role
            if role == "system" and out:
                raise bad(f"{where}: a system message must come first", where)
            content = self._content(m.get("content"), f"{where}.content", role)
            entry: dict[str, Any] = {"role": role, "content": content}
            if role == "assistant":
                calls = m.get("tool_calls")
                if calls:
                    entry["tool_calls"] = self._replayed_calls(calls, where, names)
                for key in ("reasoning_content", "reasoning"):
                    if isinstance(m.get(key), str):
                        entry["reasoning_content"] = m[key]
            if role == "tool":
                call_id = m.get("tool_call_id")
                name = names.get(call_id) or m.get("name")
                if not isinstance(name, str):
                    raise bad(
                        f"{where}.tool_call_id matches no earlier tool call",
                        f"{where}.tool_call_id",
                    )
                entry["name"] = name
                entry["tool_call_id"] = call_id
            out.append(entry)
        return out

    @staticmethod
    def _content(content: Any, where: str, role: str) -> str:
        if content is None:
            if role in ("assistant", "tool"):
                return ""
            raise bad(f"{where} is missing", where)
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise bad(f"{where} must be a string or a list of parts", where)
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise bad(f"{where}[{j}] must be an object", f"{where}[{j}]")
            kind = part.get("type")
            if kind != "text":
                raise unsupported(f"{where}[{j}].type", f"{kind!r} is not supported (text only)")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
            texts.append(part["text"])
        return "".join(texts)

    @staticmethod
    def _replayed_calls(calls: Any, where: str, names: dict) -> list[dict]:
        if not isinstance(calls, list):
            raise bad(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
        out = []
        for k, call in enumerate(calls):
            here = f"{where}.tool_calls[{k}]"
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad(f"{here}.function.name must be a string", here)
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:  # the template writes a string raw: give it the parsed object
                    args = json.loads(args or "{}")
                except json.JSONDecodeError:
                    raise bad(f"{here}.function.arguments is not valid JSON", here) from None
            if not isinstance(args, dict):
                raise bad(f"{here}.function.arguments must be a JSON object", here)
            names[call.get("id")] = fn["name"]
            out.append(
                {
                    "id": call.get("id"),
                    "type": "function",
                    "function": {"name": fn["name"], "arguments": args},
                }
            )
        return out


# ---------------------------------------------------------------------------------------------
# Running a prepared request: worker events -> response deltas.


class ClientGone(Exception):
    pass


def run_job(api: Api, prep: Prepared, tick: Any) -> Any:
    """Submit the job and yield ("delta", Delta) as the worker produces them, then
    ("done", Outcome, router). ``tick()`` runs about once a second and on prefill progress
    (keepalives, disconnect checks); it raises ClientGone to cancel."""
    from gemma4_mlx.engine.worker import Cancelled, QueueFull
    from gemma4_mlx.toolcalls import Router

    job = prep.job
    router = Router(api.tokenizer, prep.stop, parse_tools=prep.tools, raw=not prep.chat)
    try:
        api.engine.submit(job)
    except QueueFull as e:
        raise ApiError(
            429,
            f"server busy: {e}",
            code="queue_full",
            kind="server_error",
            headers={"Retry-After": "5"},
        ) from None
    try:
        while True:
            try:
                event = job.events.get(timeout=1.0)
            except queue.Empty:
                if not api.engine.alive():
                    raise ApiError(
                        503, "the worker thread died", code="worker_dead", kind="server_error"
                    ) from None
                tick()
                continue
            kind = event[0]
            if kind == "token":
                for delta in router.feed(event[1]):
                    yield "delta", delta
                if router.stopped:
                    job.halt.set()
                tick(cheap=True)
            elif kind == "prefill":
                tick()
            elif kind == "done":
                for delta in router.finish():
                    if delta.kind == "tool_partial":
                        if event[1].finish_reason == "length":
                            continue  # cut by max_tokens: finish_reason says so
                        delta.kind = "tool_error"
                    yield "delta", delta
                yield "done", event[1], router
                return
            elif kind == "error":
                error = event[1]
                if isinstance(error, Cancelled):
                    raise ClientGone()
                from gemma4_mlx.engine.grammar import GrammarError

                code = "grammar_error" if isinstance(error, GrammarError) else "generation_failed"
                raise ApiError(
                    500,
                    f"generation failed: {type(error).__name__}: {error}",
                    code=code,
                    kind="server_error",
                )
    except BaseException:
        job.cancel.set()
        raise


def usage(outcome: Any, router: Any) -> dict:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.generated,
        "total_tokens": outcome.prompt_tokens + outcome.generated,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": router.reasoning_tokens},
    }


def tool_call_json(call: dict, index: int) -> dict:
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
    }


def tool_error(delta: Any) -> ApiError:
    return ApiError(
        500,
        f"the model wrote a tool call that cannot be parsed ({delta.text[:300]})",
        code="tool_call_parse_error",
        kind="server_error",
    )


# ---------------------------------------------------------------------------------------------
# HTTP.


class Handler(BaseHTTPRequestHandler):
    server_version = "gemma4-mlx"
    protocol_version = "HTTP/1.1"
    api: Api | None = None  # set on the subclass made per server
    state: Any = None

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.state.config.socket_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:  # never the body
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ------------------------------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, headers too long, an unknown
        method) in OpenAI's shape too, never an HTML page."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # garbage in: still a status line and headers out
        body = ApiError(code, message or explain or "bad request", code="bad_http_request").body()
        data = json.dumps(body).encode()
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(data)
        except OSError:
            pass

    def _cors_headers(self) -> dict[str, str]:
        headers = getattr(self, "headers", None)
        origin = headers.get("Origin") if headers is not None else None
        if origin and origin in self.state.config.cors_origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {}

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in {**self._cors_headers(), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        if error.status in (413, 411):
            self.close_connection = True
        self._send_json(error.status, error.body(), error.headers)

    def _guard(self) -> None:
        """Host check (DNS rebinding) and auth, before anything else."""
        config = self.state.config
        host = self.headers.get("Host")
        if host is not None and is_loopback(config.host):
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_HOSTS and name not in config.allowed_hosts:
                raise ApiError(
                    403,
                    f"Host {host!r} is not allowed",
                    code="forbidden_host",
                    kind="permission_error",
                )
        if config.api_key and self.path.startswith("/v1"):
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                raise ApiError(
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    code="invalid_api_key",
                    kind="authentication_error",
                )

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(
                411,
                "send the body with a Content-Length (chunked bodies are not read)",
                code="length_required",
            )
        if length is None:
            raise ApiError(411, "Content-Length is required", code="length_required")
        try:
            size = int(length)
        except ValueError:
            raise bad("Content-Length is not a number") from None
        if size < 0:
            raise bad("Content-Length is negative")
        if size > self.state.config.max_body_bytes:
            raise ApiError(
                413,
                f"the body is larger than {self.state.config.max_body_bytes} bytes",
                code="body_too_large",
            )
        raw = self.rfile.read(size)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(
                f"the body is not valid UTF-8 (byte offset {e.start})", code="invalid_utf8"
            ) from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise bad(
                f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                code="invalid_json",
            ) from None
        except RecursionError:
            raise bad("the body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object", code="invalid_json")
        return body

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes = {
            "/health": {"GET": self._health},
            "/v1/models": {"GET": self._models},
            "/v1/chat/completions": {"POST": self._chat},
            "/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/completions": {"POST": self._completions},
        }
        self._body_read = False
        try:
            self._guard()
            if path.startswith("/v1/models/"):
                handlers = {"GET": lambda: self._model(path[len("/v1/models/") :])}
            elif path in ("/v1/embeddings", "/embeddings"):
                raise ApiError(
                    404,
                    "embeddings are not served: Gemma 4 has no embedding mode",
                    code="not_found",
                )
            else:
                handlers = routes.get(path)
            if handlers is None:
                raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
            if method not in handlers:
                raise ApiError(
                    405,
                    f"{path} does not take {method}",
                    code="method_not_allowed",
                    headers={"Allow": ", ".join(handlers)},
                )
            handlers[method]()
        except ApiError as e:
            if method == "POST" and e.status >= 400 and not getattr(self, "_body_read", False):
                self.close_connection = True  # the unread body would be taken for a request
            self._send_error(e)
        except (TimeoutError, BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True
        except Exception as e:  # a bug must still answer in OpenAI's shape
            log.exception("request failed")
            self._send_error(
                ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")
            )

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_OPTIONS(self) -> None:
        origin = self.headers.get("Origin")
        if not origin or origin not in self.state.config.cors_origins:
            self.close_connection = True
            self._send_error(
                ApiError(
                    403,
                    "CORS: this origin is not allowed (--cors-origin)",
                    code="cors_forbidden",
                    kind="permission_error",
                )
            )
            return
        self.send_response(204)
        for key, value in self._cors_headers().items():
            self.send_header(key, value)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # -- endpoints -----------------------------------------------------------------------

    def _ready_api(self) -> Api:
        state = self.state
        if state.api is None:
            raise ApiError(
                503,
                "the model is loading",
                code="loading",
                kind="server_error",
                headers={"Retry-After": "5"},
            )
        if not state.api.engine.alive():
            raise ApiError(
                503, "the worker thread is not running", code="worker_dead", kind="server_error"
            )
        return state.api

    def _health(self) -> None:
        api = self._ready_api()
        stalled = api.engine.stalled_for()
        if stalled > self.state.config.wedged_after_s:
            raise ApiError(
                503,
                f"the worker has made no progress for {stalled:.0f} s",
                code="worker_wedged",
                kind="server_error",
            )
        self._send_json(200, {"status": "ok", "queue": api.engine.jobs.qsize()})

    def _models(self) -> None:
        self._send_json(200, self._ready_api().models())

    def _model(self, name: str) -> None:
        api = self._ready_api()
        if name != api.config.model_id:
            raise ApiError(
                404,
                f"model {name!r} is not served here (this server serves {api.config.model_id!r})",
                "model",
                "model_not_found",
            )
        self._send_json(200, api.model_card())

    def _chat(self) -> None:
        api = self._ready_api()
        body = self._body()
        self._body_read = True
        self._answer(api, api.prepare_chat(body))

    def _completions(self) -> None:
        api = self._ready_api()
        body = self._body()
        self._body_read = True
        self._answer(api, api.prepare_completion(body))

    # -- answering -----------------------------------------------------------------------

    def _client_gone(self) -> bool:
        """True when the client closed its end (readable and nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _answer(self, api: Api, prep: Prepared) -> None:
        meta = {
            "id": ("chatcmpl-" if prep.chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": api.config.model_id,
            "system_fingerprint": api.info.get("fingerprint", ""),
        }
        if prep.stream:
            self._stream(api, prep, meta)
        else:
            self._whole(api, prep, meta)

    def _whole(self, api: Api, prep: Prepared, meta: dict) -> None:
        counter = {"n": 0}

        def tick(cheap: bool = False) -> None:
            counter["n"] += 1
            if (not cheap or counter["n"] % 8 == 0) and self._client_gone():
                raise ClientGone()

        parts = {"content": [], "reasoning": []}
        calls = []
        for item in run_job(api, prep, tick):
            if item[0] == "delta":
                delta = item[1]
                if delta.kind == "tool_error":
                    raise tool_error(delta)
                if delta.kind == "tool_call":
                    calls.append(tool_call_json(delta.call, len(calls)))
                else:
                    parts[delta.kind].append(delta.text)
            else:
                _, outcome, router = item
        finish = outcome.finish_reason
        if calls and finish == "stop":
            finish = "tool_calls"
        content = "".join(parts["content"])
        if prep.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [
                    {k: v for k, v in c.items() if k != "index"} for c in calls
                ]
                message["content"] = content or None
            if parts["reasoning"]:
                message["reasoning_content"] = message["reasoning"] = "".join(parts["reasoning"])
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        self._send_json(
            200, {**meta, "object": obj, "choices": [choice], "usage": usage(outcome, router)}
        )

    def _stream(self, api: Api, prep: Prepared, meta: dict) -> None:
        obj = "chat.completion.chunk" if prep.chat else "text_completion"
        started = {"headers": False}

        def write(data: bytes) -> None:
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except (TimeoutError, BrokenPipeError, ConnectionResetError, OSError):
                raise ClientGone() from None

        def start() -> None:
            if started["headers"]:
                return
            started["headers"] = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            for key, value in self._cors_headers().items():
                self.send_header(key, value)
            self.end_headers()
            self.close_connection = True

        def event(payload: dict) -> None:
            write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        def chunk(delta: dict | None, finish: str | None = None, text: str = "") -> None:
            if prep.chat:
                choice = {
                    "index": 0,
                    "delta": delta or {},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            event({**meta, "object": obj, "choices": [choice]})

        def tick(cheap: bool = False) -> None:
            if not cheap:
                start()
                write(b": keepalive\n\n")

        calls = 0
        try:
            items = run_job(api, prep, tick)
            first = next(items)  # validation and queue errors come before any header
            start()
            if prep.chat:
                chunk({"role": "assistant", "content": ""})
            for item in _chain(first, items):
                if item[0] == "delta":
                    delta = item[1]
                    if delta.kind == "tool_error":
                        raise tool_error(delta)
                    if delta.kind == "tool_call":
                        call = tool_call_json(delta.call, calls)
                        calls += 1
                        chunk({"tool_calls": [call]})
                    elif delta.kind == "reasoning":
                        chunk({"reasoning_content": delta.text, "reasoning": delta.text})
                    elif prep.chat:
                        chunk({"content": delta.text})
                    else:
                        chunk(None, text=delta.text)
                else:
                    _, outcome, router = item
            finish = outcome.finish_reason
            if calls and finish == "stop":
                finish = "tool_calls"
            chunk({}, finish)
            if prep.include_usage:
                event({**meta, "object": obj, "choices": [], "usage": usage(outcome, router)})
            write(b"data: [DONE]\n\n")
        except StopIteration:
            pass
        except ApiError as e:
            if not started["headers"]:
                raise
            event(e.body())  # after the headers: an error event, then close


def _chain(first: Any, rest: Any) -> Any:
    yield first
    yield from rest


@dataclass
class ServerState:
    config: ServerConfig
    api: Api | None = None


class Server:
    """The HTTP server in a background thread (``url``, ``close()``); the model may be attached
    later (``attach``), and until then every endpoint but /health answers 503 'loading'."""

    def __init__(self, config: ServerConfig):
        config.check()
        self.state = ServerState(config)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        try:
            self.httpd = ThreadingHTTPServer((config.host, config.port), handler)
        except OSError as e:
            raise BadArgument(
                "port", f"cannot listen on {config.host}:{config.port} ({e.strerror})"
            ) from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="gemma4-http", daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def attach(
        self,
        model: Any,
        tokenizer: Any,
        model_dir: Any = None,
        chat_template: str | None = None,
        draft: tuple[Any, int] | None = None,
    ) -> Api:
        """Serve ``model``: start its worker. ``chat_template``: instead of the tokenizer's.
        ``draft``: (draft model or assistant drafter, tokens per step) from
        ``gemma4_mlx.speculative.prepare_draft``: speculative decoding for requests without a
        response schema or tool grammar."""
        from gemma4_mlx.cache import bound_policy
        from gemma4_mlx.engine.worker import Engine
        from gemma4_mlx.generate import generation_defaults, kv_bytes_per_token
        from gemma4_mlx.tokenizer import own_template

        config = self.state.config
        policy = bound_policy(model)
        model.make_cache()  # a policy that cannot serve this model fails now, not on a request
        stop_ids = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        tool_response = tokenizer._tokenizer.get_vocab().get("<|tool_response>")
        if tool_response is not None and tool_response not in stop_ids:
            stop_ids.append(tool_response)  # the model stops there to wait for the result
        engine = Engine(
            model,
            tokenizer,
            cache_key=f"{config.model_id}|{policy}",
            stop_ids=stop_ids,
            max_queue=config.max_queue,
            prompt_cache_bytes=config.prompt_cache_bytes,
            draft=draft,
        )
        info = {
            "template": chat_template or own_template(tokenizer),
            "sampling": generation_defaults(model_dir) if model_dir else {},
            "policy": str(policy),
            "kv_bytes_per_token": kv_bytes_per_token(model, policy),
            "created": int(time.time()),
            "fingerprint": f"gemma4-mlx-{policy}",
        }
        api = Api(config, model, tokenizer, engine, info)
        self.state.api = api
        if info["template"] and importlib.util.find_spec("llguidance") is not None:
            # llguidance's tokenizer takes seconds on a 262K vocabulary: build it now, in the
            # background, rather than inside the first constrained request.
            threading.Thread(target=api.warm_compiler, name="gemma4-grammar", daemon=True).start()
        return api

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.state.api is not None:
            self.state.api.engine.close()
