"""Chat prompts, thinking/answer separation and tool-call parsing for Gemma 4 (and Gemma 3).

One rule decides how a prompt becomes tokens, for the CLI and the Python API alike (mlx-lm's
rule): a prompt goes through the tokenizer's own chat template when it has one, through
``chat_template`` when the caller gives one, and is continued as raw text otherwise (a base model
such as the GGUF demo has no template; we never invent one). ``raw=True`` skips the template.
Options that only mean something inside a template (a system prompt, thinking) are refused when
there is none, never ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gemma4_mlx.errors import BadArgument, UserError

# A minimal Gemma 4 turn template (system turn, thinking switch, user/model turns): the tiny
# test tokenizers carry it; users can pass an equivalent file with --chat-template.
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

THOUGHT = re.compile(r"<\|channel\>thought\n?(.*?)(?:<channel\|>|$)", re.S)
TOOL_CALL = re.compile(r"<\|tool_call\>call:([\w.\-]+)(\{.*?\})<tool_call\|>", re.S)
MARKERS = re.compile(
    r"<\|turn\>|<turn\|>|<end_of_turn>|<start_of_turn>|<eos>|<\|tool_response\>|<tool_response\|>"
)
NO_TEMPLATE_NOTE = (
    "note: the tokenizer has no chat template (a base model): continuing the prompt as raw text "
    "(--chat-template FILE to use one)"
)


def own_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template, or None (base models)."""
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    template = getattr(tok, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def prompt_template(
    tokenizer: Any,
    chat_template: str | None = None,
    raw: bool = False,
    system: str | None = None,
    thinking: bool = False,
) -> str | None:
    """The template a prompt goes through (None: raw continuation), by the module's rule.

    Refuses ``system``/``thinking`` where they would be silently dropped."""
    template = None if raw else (chat_template or own_template(tokenizer))
    why = "the prompt is fed raw" if raw else "the tokenizer has none (a base model?)"
    if template is None and system:
        raise BadArgument("system", f"needs a chat template: {why}; pass chat_template")
    if thinking:
        if template is None:
            raise BadArgument("thinking", f"needs a chat template: {why}")
        if "enable_thinking" not in template:
            raise BadArgument(
                "thinking", "is not available: this model's chat template has no thinking mode"
            )
    return template


def build_prompt(
    tokenizer: Any,
    prompt: str,
    system: str | None = None,
    thinking: bool = False,
    raw: bool = False,
    history: list[dict] | None = None,
    tools: list[dict] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Token ids for one turn (or a whole conversation with ``history``), by the module's rule."""
    template = prompt_template(tokenizer, chat_template, raw, system, thinking)
    if template is None:
        return list(tokenizer.encode(prompt))
    messages = list(history or [])
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if prompt:
        messages.append({"role": "user", "content": prompt})
    return conversation_tokens(tokenizer, messages, thinking, tools, template)


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    thinking: bool = False,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    template: str | None = None,
) -> str:
    """The conversation as text through ``template`` (default: the tokenizer's own)."""
    template = template or own_template(tokenizer)
    if template is None:
        raise BadArgument("chat_template", "is needed: the tokenizer has none (a base model?)")
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    kwargs = {
        "add_generation_prompt": add_generation_prompt,
        "enable_thinking": thinking,
        "tokenize": False,
    }
    if tools:
        kwargs["tools"] = tools
    try:
        return tok.apply_chat_template(messages, chat_template=template, **kwargs)
    except Exception as e:  # jinja syntax or runtime errors in a template file
        raise UserError(f"cannot apply the chat template ({type(e).__name__}: {e})") from None


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Token ids of template output: the template writes BOS itself, so add no specials."""
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    return list(tok.encode(text, add_special_tokens=False))


def conversation_tokens(
    tokenizer: Any,
    messages: list[dict],
    thinking: bool = False,
    tools: list[dict] | None = None,
    template: str | None = None,
) -> list[int]:
    text = render_chat(tokenizer, messages, thinking, True, tools, template)
    return encode_rendered(tokenizer, text)


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
