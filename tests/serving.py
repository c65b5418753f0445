"""Helpers of the server tests: a tiny chat model that knows Gemma 4's tool tokens and renders
tools, and a server on a free loopback port."""

from __future__ import annotations

import shutil
from pathlib import Path

# Gemma 4's turn layout plus tool declarations, calls and responses, the way the real template
# writes them (declarations in the system turn, calls in Gemma's dialect, results as
# <|tool_response> blocks in the model's turn).
TOOL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
    "{%- if tools or enable_thinking or sys %}<|turn>system\n"
    "{%- if enable_thinking %}<|think|>{% endif %}{{ sys }}"
    "{%- for t in tools or [] %}<|tool>declaration:{{ t['function']['name'] }}"
    "{{ t['function'].get('parameters', {}) | tojson }}<tool|>{% endfor %}<turn|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}<|turn>user\n{{ m['content'] }}<turn|>\n"
    "{%- elif m['role'] == 'assistant' %}<|turn>model\n{{ m['content'] }}"
    "{%- for c in m.get('tool_calls') or [] %}<|tool_call>call:{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}<tool_call|>{% endfor %}"
    "{%- if not m.get('tool_calls') %}<turn|>\n{% endif %}"
    "{%- elif m['role'] == 'tool' %}<|tool_response>response:{{ m['name'] }}"
    "{value:<|\"|>{{ m['content'] }}<|\"|>}<tool_response|>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt and (not messages or messages[-1]['role'] != 'tool') %}"
    "<|turn>model\n{% endif %}"
)


def make_tool_model(src: Path, dst: Path) -> Path:
    """Copy the tiny chat model, add <|"|> and the tool-response tokens, use TOOL_TEMPLATE."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_special_tokens(
        {"additional_special_tokens": ['<|"|>', "<|tool_response>", "<tool_response|>"]}
    )
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(dst)
    return dst


def start(model_dir: Path, kv_policy: str | None = None, **config):
    """(server, model, tokenizer): the model loaded and served on 127.0.0.1, a free port."""
    from gemma4_mlx.loading import load
    from gemma4_mlx.server import Server, ServerConfig

    model, tokenizer = load(model_dir, kv_policy=kv_policy)
    server = Server(ServerConfig(port=0, model_id="tiny", **config))
    server.attach(model, tokenizer, model_dir)
    return server
