"""The README's quick-start command, run as written on the offline demo, prints the raw
continuation that the Python API gives for the same prompt (the demo is a base model: no chat
template, so the CLI must not wrap the prompt in one)."""

from __future__ import annotations

import io
import re
import shlex
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_command() -> list[str]:
    """The arguments of the first `gemma4-mlx generate --model demo ...` in the README."""
    match = re.search(r"gemma4-mlx (generate --model demo [^\n`]*)", README.read_text())
    assert match, "README.md has no quick-start `gemma4-mlx generate --model demo` command"
    return shlex.split(match.group(1))


def test_quick_start_prints_the_api_raw_continuation(demo_cache, monkeypatch, capsys):
    from gemma4_mlx import KVPolicy, generate, load
    from gemma4_mlx.cli import main

    argv = quick_start_command()
    monkeypatch.setenv("GEMMA4_MLX_CACHE", str(demo_cache))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    assert (exit_info.value.code or 0) == 0, out.err
    assert out.err.count("note: the tokenizer has no chat template") == 1

    prompt = argv[argv.index("-p") + 1]
    max_tokens = int(argv[argv.index("--max-tokens") + 1]) if "--max-tokens" in argv else 256
    kind = argv[argv.index("--kv-cache") + 1] if "--kv-cache" in argv else "fp16"
    model, tokenizer = load("demo")
    api = generate(model, tokenizer, prompt, max_tokens=max_tokens, kv_policy=KVPolicy(kind))
    print(repr(out.out))
    assert out.out == api.raw_text + "\n"
    assert len(api.raw_text.split()) >= 10  # a sentence, not a parroted template
    assert "<start_of_turn>" not in out.out and "<end_of_turn>" not in out.out
