"""Constrained decoding with llguidance: Lark grammars for Gemma 4 answers and tool calls.

One grammar covers a whole answer: an optional thought block (only when thinking is on), then
either the JSON the schema asks for or native Gemma 4 tool calls whose names are declared tools
and whose arguments follow each tool's JSON schema, in Gemma's dialect (gemma4_mlx.toolcalls).
Special tokens are written ``<[id]>``: they never match text lexemes, so a string runs until the
``<|"|>`` token and free text until ``<|tool_call>``.

The mask is applied in plain MLX (llguidance's own MLX helper is a Metal kernel, so it would not
run on CPU): the matcher fills a numpy bit mask (32 tokens per int32 word), which is unpacked
with shifts and turned into -inf where a token is not allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from gemma4_mlx.errors import BadArgument

# Arguments grammar for values a schema does not pin down (and for untranslatable schemas).
_GENERIC = r"""
gval: gstr | NUMBER | "true" | "false" | "null" | gobj | garr
gstr: <[{q}]> STR <[{q}]>
gobj: "{{" (KEY ":" gval ("," KEY ":" gval)*)? "}}"
garr: "[" (gval ("," gval)*)? "]"
KEY: /[A-Za-z_][A-Za-z0-9_\-]*/
STR: /(.|\n)*/
NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/
INTEGER: /-?(0|[1-9][0-9]*)/
TEXT: /(.|\n)+/
"""


def _literal(text: str) -> str:
    return json.dumps(text)


class _ToolGrammar:
    """Translates JSON schemas into Lark rules for Gemma's argument dialect."""

    def __init__(self, quote: int):
        self.quote = quote
        self.rules: list[str] = []
        self.count = 0
        self.untranslated: list[str] = []

    def rule(self, body: str) -> str:
        self.count += 1
        name = f"r{self.count}"
        self.rules.append(f"{name}: {body}")
        return name

    def string(self, inner: str = "STR") -> str:
        return f"<[{self.quote}]> {inner} <[{self.quote}]>"

    def value(self, schema: Any, where: str) -> str:
        if schema is True or schema == {}:
            return "gval"
        if not isinstance(schema, dict):
            raise BadArgument(where, "must be a JSON schema object")
        if "enum" in schema or "const" in schema:
            options = schema.get("enum", [schema.get("const")])
            if not isinstance(options, list) or not options:
                raise BadArgument(where, "enum must be a non-empty list")
            alts = []
            for option in options:
                if isinstance(option, str):
                    alts.append(self.string(_literal(option)))
                else:
                    alts.append(_literal(json.dumps(option)))
            return self.rule(" | ".join(alts))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = [self.value(s, f"{where}.{key}") for s in schema[key]]
                return self.rule(" | ".join(alts))
        kind = schema.get("type")
        if isinstance(kind, list):
            alts = [self.value({**schema, "type": k}, where) for k in kind]
            return self.rule(" | ".join(alts))
        if kind == "string":
            return self.rule(self.string())
        if kind == "integer":
            return "INTEGER"
        if kind == "number":
            return "NUMBER"
        if kind == "boolean":
            return self.rule('"true" | "false"')
        if kind == "null":
            return self.rule('"null"')
        if kind == "array":
            items = self.value(schema.get("items", {}), f"{where}.items")
            return self.rule(f'"[" ({items} ("," {items})*)? "]"')
        if kind == "object" or "properties" in schema:
            return self.object(schema, where)
        self.untranslated.append(where)
        return "gval"

    def object(self, schema: dict, where: str) -> str:
        properties = schema.get("properties")
        if not properties:
            return "gobj"
        if not isinstance(properties, dict):
            raise BadArgument(where, "properties must be an object")
        required = set(schema.get("required", []))
        # Keys in sorted order: the chat template replays arguments dictsorted, so the model
        # sees its own past calls that way; optional keys may be left out.
        keys = sorted(properties)
        # first_names[i]: keys[i:] with no leading comma; rest_names[i]: each after a comma.
        first_names: dict[int, str] = {}
        rest_names: dict[int, str] = {}
        for i in range(len(keys) - 1, -1, -1):
            key = keys[i]
            value = self.value(properties[key], f"{where}.properties.{key}")
            pair = f"{_literal(key + ':')} {value}"
            nxt_first = first_names.get(i + 1, '""')
            nxt_rest = rest_names.get(i + 1, '""')
            first_alts = [f"{pair} {nxt_rest}"]
            rest_alts = [f'"," {pair} {nxt_rest}']
            if key not in required:
                first_alts.append(nxt_first)
                rest_alts.append(nxt_rest)
            first_names[i] = self.rule(" | ".join(first_alts))
            rest_names[i] = self.rule(" | ".join(rest_alts))
        return self.rule(f'"{{" {first_names[0]} "}}"')


@dataclass
class Constraint:
    """What a request asks the grammar for."""

    json_schema: dict | None = None  # the answer must be this JSON (response_format)
    tools: list[dict] | None = None  # OpenAI function tools the model may call
    tool_mode: str = "auto"  # auto | required | named (none: no tools given)
    parallel: bool = True
    thinking: bool = False


def build_grammar(c: Constraint, markers: Any) -> str | None:
    """A Lark grammar (llguidance's dialect) for the constraint; None when nothing constrains.

    ``markers``: gemma4_mlx.toolcalls.MarkerIds of the tokenizer (special-token ids)."""
    if c.json_schema is None and not c.tools:
        return None
    lines = ["%llguidance {}"]
    alts = []
    if c.json_schema is not None:
        schema = dict(c.json_schema)
        # Compact JSON: flexible whitespace lets a model emit blanks forever.
        schema["x-guidance"] = {"whitespace_flexible": False}
        lines.append("body: %json " + json.dumps(schema))
        alts.append("body")
    if c.tools:
        missing = [
            name
            for name, value in (
                ("<|tool_call>", markers.call_open),
                ("<tool_call|>", markers.call_close),
                ('<|"|>', markers.quote),
            )
            if value is None
        ]
        if missing:
            raise BadArgument("tools", f"this model's tokenizer has no {', '.join(missing)} token")
        g = _ToolGrammar(markers.quote)
        calls = []
        for i, tool in enumerate(c.tools):
            function = tool["function"]
            params = function.get("parameters") or {"type": "object", "properties": {}}
            args = g.object(params, f"tools[{i}].function.parameters")
            calls.append(f"{_literal('call:' + function['name'])} {args}")
        one = g.rule(f"<[{markers.call_open}]> ({' | '.join(calls)}) <[{markers.call_close}]>")
        many = f"{one}+" if c.parallel else one
        if c.tool_mode == "auto":
            alts.append(many)
            if c.json_schema is None:
                alts.append(f"TEXT {many}")
                alts.append("TEXT")
        else:
            alts = [many]
        lines += g.rules
        lines.append(_GENERIC.format(q=markers.quote))
    thought = ""
    if c.thinking and markers.channel_open is not None and markers.channel_close is not None:
        lines.append(f"thought: <[{markers.channel_open}]> /(.|\\n)*/ <[{markers.channel_close}]>")
        thought = "thought? "
    lines.insert(1, f"start: {thought}({' | '.join(alts)})")
    return "\n".join(lines) + "\n"


class GrammarCompiler:
    """llguidance bound to one tokenizer: compiles grammars into matchers (checked, cached)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise BadArgument(
                "response_format", "needs llguidance: pip install 'gemma4-mlx[server]'"
            ) from None
        self._llg = llguidance
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=stop_ids)

    def matcher(self, grammar: str, field: str) -> Any:
        llg = self._llg
        text = llg.LLMatcher.grammar_from_lark(grammar)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
        if is_error:
            raise BadArgument(field, f"cannot be enforced: {_one_line(messages[0])}")
        matcher = llg.LLMatcher(self.tokenizer, text)
        if matcher.is_error():
            raise BadArgument(field, f"cannot be enforced: {_one_line(matcher.get_error())}")
        return matcher


def _one_line(message: str) -> str:
    """llguidance's first line, without its position in our grammar text ("at 3(7): ")."""
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    if line.startswith("at ") and ": " in line:
        line = line.split(": ", 1)[1]
    return line[:300]


class GrammarError(RuntimeError):
    """The matcher refused a token it had allowed (a bug, reported as a server error)."""


class GrammarProcessor:
    """Masks logits to the tokens the grammar allows; feeds each sampled token to the matcher."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.words = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)
        # MLX arrays are made in mask(), on the worker thread (streams are per thread).

    def mask(self, logits: mx.array) -> mx.array:
        """(1, V) logits -> the same with disallowed tokens at -inf."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        words = mx.array(self.words[0])  # (V/32,) int32
        # (V/32, 32): bit j of word i allows token 32i + j
        bits = (words[:, None] >> mx.arange(32, dtype=mx.int32)) & 1
        allowed = bits.reshape(-1)[: logits.shape[-1]].astype(mx.bool_)
        return mx.where(allowed, logits, -mx.inf)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


class SchemaLogitsProcessor:
    """The grammar as an mlx-lm logits processor (``processor(tokens, logits) -> logits``), for
    ``generate(..., json_schema=...)``: mlx-lm calls it once per sampled token with the tokens
    so far, so each call after the first feeds the newest token to the matcher."""

    def __init__(self, processor: GrammarProcessor):
        self.processor = processor
        self.first = True

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if not self.first:
            self.processor.consume(int(tokens[-1].item()))
        self.first = False
        return self.processor.mask(logits.astype(mx.float32))


def check_tools(tools: Any) -> None:
    """OpenAI function tools: [{"type": "function", "function": {"name", "parameters"}}]."""
    if not isinstance(tools, list) or not tools:
        raise BadArgument("tools", "must be a non-empty list of function tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
        ):
            raise BadArgument(
                "tools", f'[{i}] must be {{"type": "function", "function": {{"name": ...}}}}'
            )


def grammar_processor(
    model: Any,
    tokenizer: Any,
    json_schema: dict | None = None,
    tools: list[dict] | None = None,
    thinking: bool = False,
) -> SchemaLogitsProcessor:
    """An mlx-lm logits processor for the answer grammar: ``json_schema``'s JSON and/or
    Gemma 4 calls of ``tools`` (tool_choice auto), after an optional thought block when
    ``thinking``; BadArgument if it cannot be enforced."""
    from gemma4_mlx.toolcalls import MarkerIds

    if json_schema is not None and not isinstance(json_schema, dict):
        raise BadArgument("json_schema", f"must be a dict, got {type(json_schema).__name__}")
    if tools is not None:
        check_tools(tools)
    # mlx-lm stops on the tokenizer's EOS ids only: the grammar ends on those.
    stop_ids = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size, stop_ids)
    constraint = Constraint(json_schema=json_schema, tools=tools, thinking=thinking)
    grammar = build_grammar(constraint, MarkerIds.of(tokenizer))
    matcher = compiler.matcher(grammar, "json_schema" if json_schema is not None else "tools")
    return SchemaLogitsProcessor(GrammarProcessor(matcher, model.config.vocab_size))
