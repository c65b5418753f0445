"""Gemma 4's tool-call dialect and the token-level router that splits a generation.

Gemma 4 writes a call as ``<|tool_call>call:NAME{key:value,...}<tool_call|>``: bare keys,
strings between two ``<|"|>`` tokens with no escaping (``<|"|>`` is one special token, so
nothing inside a string can close it early), numbers and ``true``/``false``/``null`` bare,
nested objects with bare keys and lists in brackets. ``parse_call`` reads that dialect with a
small recursive-descent parser (quotes, backslashes and braces inside strings are plain text),
and also accepts JSON-quoted keys and strings, which the model sometimes writes.

``Router`` consumes generated token ids one at a time and splits them into reasoning (the
``<|channel>thought ... <channel|>`` block), content and tool calls, emitting text deltas that
are identical whether the caller streams or not: the non-streaming answer is the concatenation
of the streamed deltas.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

QUOTE = '<|"|>'
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_KEY = re.compile(r"[A-Za-z_][\w\-]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


class ToolCallError(ValueError):
    """A tool call the dialect cannot read; the message says where."""


class _Reader:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str) -> ToolCallError:
        near = self.text[self.pos : self.pos + 20]
        return ToolCallError(f"{what} at offset {self.pos} (near {near!r})")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def take(self, literal: str) -> bool:
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str) -> None:
        self.skip_space()
        if not self.take(literal):
            raise self.fail(f"expected {literal!r}")

    def value(self) -> Any:
        self.skip_space()
        if self.take(QUOTE):
            end = self.text.find(QUOTE, self.pos)
            if end < 0:
                raise self.fail('unterminated <|"|> string')
            out, self.pos = self.text[self.pos : end], end + len(QUOTE)
            return out
        if self.text.startswith('"', self.pos):
            try:
                out, end = json.JSONDecoder().raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                raise self.fail("bad JSON string") from None
            self.pos = end
            return out
        if self.take("{"):
            return self.object_body()
        if self.take("["):
            return self.array_body()
        for word, out in (("true", True), ("false", False), ("null", None)):
            if self.take(word):
                return out
        match = _NUMBER.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            number = match.group()
            return float(number) if any(c in number for c in ".eE") else int(number)
        raise self.fail("expected a value")

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith(QUOTE, self.pos) or self.text.startswith('"', self.pos):
            key = self.value()
            return key
        match = _KEY.match(self.text, self.pos)
        if not match:
            raise self.fail("expected a key")
        self.pos = match.end()
        return match.group()

    def object_body(self) -> dict:
        out: dict[str, Any] = {}
        self.skip_space()
        if self.take("}"):
            return out
        while True:
            key = self.key()
            self.expect(":")
            out[key] = self.value()
            self.skip_space()
            if self.take("}"):
                return out
            if not self.take(","):
                raise self.fail("expected ',' or '}'")

    def array_body(self) -> list:
        out: list[Any] = []
        self.skip_space()
        if self.take("]"):
            return out
        while True:
            out.append(self.value())
            self.skip_space()
            if self.take("]"):
                return out
            if not self.take(","):
                raise self.fail("expected ',' or ']'")


def parse_call(text: str) -> dict:
    """``call:NAME{...}`` (the text between the call markers) -> {"name", "arguments"}."""
    reader = _Reader(text.strip())
    reader.expect("call:")
    match = _NAME.match(reader.text, reader.pos)
    if not match:
        raise reader.fail("expected a function name")
    reader.pos = match.end()
    reader.expect("{")
    arguments = reader.object_body()
    reader.skip_space()
    if reader.pos != len(reader.text):
        raise reader.fail("unexpected text after the arguments")
    return {"name": match.group(), "arguments": arguments}


def format_value(value: Any) -> str:
    """A Python value in Gemma's dialect (what the chat template writes for arguments)."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Delta:
    """One step of output: text for one field, or one finished tool call."""

    # "reasoning" | "content" | "tool_call" | "tool_error" (unparseable) | "tool_partial"
    # (a call still open when generation ended: max_tokens cut it)
    kind: str
    text: str = ""
    call: dict | None = None


@dataclass
class MarkerIds:
    """Token ids of Gemma 4's markers in this tokenizer (None where it has no such token)."""

    channel_open: int | None = None
    channel_close: int | None = None
    call_open: int | None = None
    call_close: int | None = None
    quote: int | None = None

    @classmethod
    def of(cls, tokenizer: Any) -> MarkerIds:
        tok = getattr(tokenizer, "_tokenizer", tokenizer)
        vocab = tok.get_vocab()
        return cls(
            vocab.get(CHANNEL_OPEN),
            vocab.get(CHANNEL_CLOSE),
            vocab.get(CALL_OPEN),
            vocab.get(CALL_CLOSE),
            vocab.get(QUOTE),
        )


@dataclass
class _Segment:
    kind: str
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of this segment's text already emitted


class Router:
    """Token ids in, deltas out: thought -> reasoning, calls -> tool calls, the rest -> content.

    Text is decoded per segment (the whole segment each time, emitting what is new), so a
    multi-byte character split over tokens is emitted once complete. ``stop`` strings end the
    content; text that could be the start of a stop string is held back until it cannot."""

    def __init__(
        self,
        tokenizer: Any,
        stop: list[str] | None = None,
        parse_tools: bool = True,
        raw: bool = False,
    ):
        """``raw``: every token is content (a plain completion); no thought or calls split."""
        self.tok = getattr(tokenizer, "_tokenizer", tokenizer)
        self.ids = MarkerIds() if raw else MarkerIds.of(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        self.parse_tools = parse_tools
        self.segment = _Segment("content")
        self.stopped = False  # a stop string was seen
        self.content_seen = False  # any content emitted (for the bare "call:" recovery)
        self.calls = 0
        self.reasoning_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def feed(self, token: int) -> list[Delta]:
        if self.stopped:
            return []
        ids, seg = self.ids, self.segment
        if seg.kind == "reasoning" or token == ids.channel_open:
            self.reasoning_tokens += 1
        if seg.kind == "tool":
            if token == ids.call_close:
                return self._close_call()
            seg.ids.append(token)
            return []
        if token == ids.channel_open and seg.kind == "content":
            return self._switch("reasoning")
        if token == ids.channel_close and seg.kind == "reasoning":
            return self._switch("content")
        if token == ids.call_open and self.parse_tools:
            out = self._flush(final=True)
            self.segment = _Segment("tool")
            return out
        seg.ids.append(token)
        return self._flush(final=False)

    def finish(self) -> list[Delta]:
        """End of generation: flush held-back text; an unclosed call is an error delta."""
        if self.stopped:
            return []
        if self.segment.kind == "tool":
            text = self._decode(self.segment.ids)
            self.segment = _Segment("content")
            return [Delta("tool_partial", text=f"unterminated tool call: {CALL_OPEN}{text}")]
        return self._flush(final=True)

    def _switch(self, kind: str) -> list[Delta]:
        out = self._flush(final=True)
        self.segment = _Segment(kind)
        return out

    def _close_call(self) -> list[Delta]:
        text = self._decode(self.segment.ids)
        self.segment = _Segment("content")
        try:
            call = parse_call(text)
        except ToolCallError as e:
            return [Delta("tool_error", text=f"{e}: {CALL_OPEN}{text}{CALL_CLOSE}")]
        self.calls += 1
        return [Delta("tool_call", call=call)]

    def _flush(self, final: bool) -> list[Delta]:
        seg = self.segment
        text = self._decode(seg.ids)
        if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
            return []
        if seg.kind == "reasoning":
            # The channel opens with its name: "<|channel>thought\n...".
            if not final and "thought\n".startswith(text[:8]) and len(text) < 8:
                return []
            body = text.removeprefix("thought").removeprefix("\n")
            start = len(text) - len(body)
            new = text[max(seg.sent, start) :]
            seg.sent = len(text)
            return [Delta("reasoning", new)] if new else []
        # content
        if (
            self.parse_tools
            and self.ids.call_open is not None
            and not self.content_seen
            and seg.sent == 0
        ):
            stripped = text.lstrip()
            if stripped.startswith("call:") and _NAME.match(stripped, 5):
                # A call right after <channel|> without <|tool_call> (seen in real Gemma 4
                # output): read it as a call, up to <tool_call|> or the end.
                self.segment = _Segment("tool", list(seg.ids))
                return []
            if not final and "call:".startswith(stripped) and stripped:
                return []
        end = len(text)
        for stop in self.stop:
            at = text.find(stop, max(0, seg.sent - len(stop) + 1))
            if at >= 0 and at < end:
                end = at
        if end < len(text):
            self.stopped = True
        elif not final:
            for stop in self.stop:  # hold back a suffix that may begin a stop string
                for n in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:n]):
                        end = min(end, len(text) - n)
                        break
        new = text[seg.sent : end] if end > seg.sent else ""
        seg.sent = max(seg.sent, end)
        if new:
            self.content_seen = True
            return [Delta("content", new)]
        return []
