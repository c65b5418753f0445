"""Chat prompts, thinking/answer separation and tool-call parsing for Gemma 4 (and Gemma 3).

The tokenizer's own chat template is used when it has one. Checkpoints without one (the GGUF demo
model, tiny test tokenizers) get the Gemma turn format that matches their vocabulary:
Gemma 4 ``<|turn>role\\n...<turn|>`` or Gemma 3 ``<start_of_turn>role\\n...<end_of_turn>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gemma4_mlx.errors import UserError

GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{% if enable_thinking or (messages and messages[0]['role'] == 'system') %}"
    "{{ '<|turn>system\n' }}{% if enable_thinking %}{{ '<|think|>' }}{% endif %}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{{ '<turn|>\n' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] + '<turn|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if loop.index == 2 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ m['content'] + '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

THOUGHT = re.compile(r"<\|channel\>thought\n?(.*?)(?:<channel\|>|$)", re.S)
TOOL_CALL = re.compile(r"<\|tool_call\>call:([\w.\-]+)(\{.*?\})<tool_call\|>", re.S)
MARKERS = re.compile(
    r"<\|turn\>|<turn\|>|<end_of_turn>|<start_of_turn>|<eos>|<\|tool_response\>|<tool_response\|>"
)


def _vocab(tokenizer: Any) -> dict:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        return tok.get_vocab()
    except Exception:
        return {}


def chat_template(tokenizer: Any) -> str:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    if getattr(tok, "chat_template", None):
        return tok.chat_template
    vocab = _vocab(tokenizer)
    if "<|turn>" in vocab:
        return GEMMA4_TEMPLATE
    if "<start_of_turn>" in vocab:
        return GEMMA3_TEMPLATE
    raise UserError("the tokenizer has no chat template and no Gemma turn markers: use --raw")


def build_prompt(
    tokenizer: Any,
    prompt: str,
    system: str | None = None,
    thinking: bool = False,
    raw: bool = False,
    history: list[dict] | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids for one turn (or a whole conversation with ``history``)."""
    if raw:
        return list(tokenizer.encode(prompt))
    messages = list(history or [])
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if prompt:
        messages.append({"role": "user", "content": prompt})
    return conversation_tokens(tokenizer, messages, thinking=thinking, tools=tools)


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    thinking: bool = False,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> str:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    kwargs = {
        "add_generation_prompt": add_generation_prompt,
        "enable_thinking": thinking,
        "tokenize": False,
    }
    if tools:
        kwargs["tools"] = tools
    try:
        return tok.apply_chat_template(messages, chat_template=chat_template(tokenizer), **kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot apply the chat template ({type(e).__name__}: {e})") from None


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Token ids of template output: the template writes BOS itself, so add no specials."""
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    return list(tok.encode(text, add_special_tokens=False))


def conversation_tokens(
    tokenizer: Any, messages: list[dict], thinking: bool = False, tools: list[dict] | None = None
) -> list[int]:
    return encode_rendered(tokenizer, render_chat(tokenizer, messages, thinking, True, tools))


@dataclass
class ParsedOutput:
    text: str  # the answer, thinking and tool calls removed
    thinking: str | None = None
    tool_calls: list[dict] = field(default_factory=list)


def _parse_arguments(body: str) -> Any:
    """Gemma 4 writes tool arguments as a JSON-like object, sometimes with bare keys and
    <|"|> string quotes; normalise to JSON, else keep the raw text."""
    normalized = body.replace('<|"|>', '"')
    try:
        return json.loads(normalized)
    except json.JSONDecodeError:
        pass
    quoted = re.sub(r"([{,]\s*)([A-Za-z_][\w\-]*)\s*:", r'\1"\2":', normalized)
    try:
        return json.loads(quoted)
    except json.JSONDecodeError:
        return {"_raw": body}


def parse_output(text: str) -> ParsedOutput:
    """Split a generated text into answer, thinking channel and tool calls."""
    thoughts = [m.group(1).strip() for m in THOUGHT.finditer(text)]
    answer = THOUGHT.sub("", text)
    calls = [
        {"name": m.group(1), "arguments": _parse_arguments(m.group(2))}
        for m in TOOL_CALL.finditer(answer)
    ]
    answer = TOOL_CALL.sub("", answer)
    answer = MARKERS.sub("", answer).strip()
    return ParsedOutput(answer, "\n".join(thoughts) if thoughts else None, calls)
