"""End-to-end CLI and Python API on a tiny checkpoint with a tiny tokenizer."""

import json
import subprocess
import sys

import pytest

from gemma4_mlx.cli import main
from gemma4_mlx.loading import load


def run_cli(args, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io

        data = stdin if isinstance(stdin, bytes) else stdin.encode()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def test_streaming_equals_non_streaming_json(tiny_chat_model, capsys):
    base = ["generate", "-m", str(tiny_chat_model), "-p", "hello world", "--max-tokens", "12"]
    code, streamed, err = run_cli(base, capsys)
    assert code == 0, err
    code, out, err = run_cli([*base, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    for key in (
        "text",
        "thinking",
        "tool_calls",
        "tokens",
        "prompt_tps",
        "generation_tps",
        "peak_memory_gb",
        "finish_reason",
        "prompt_tokens",
    ):
        assert key in result
    assert streamed.rstrip("\n") == result["raw_text"]
    assert len(result["tokens"]) <= 12


def test_seed_makes_sampling_reproducible(tiny_chat_model, capsys):
    args = [
        "generate",
        "-m",
        str(tiny_chat_model),
        "-p",
        "the quick",
        "--max-tokens",
        "10",
        "--temp",
        "1.5",
        "--json",
    ]
    runs = [json.loads(run_cli([*args, "--seed", str(s)], capsys)[1])["tokens"] for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_turboquant_kv_options_run(tiny_chat_model, capsys):
    code, out, err = run_cli(
        [
            "generate",
            "-m",
            str(tiny_chat_model),
            "-p",
            "hello",
            "--max-tokens",
            "8",
            "--kv-cache",
            "turboquant",
            "--kv-bits",
            "3.5",
            "--kv-window",
            "0",
            "--kv-center",
            "2",
            "--kv-center-block",
            "4",
            "--kv-key-tiers",
            "2",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(out)["kv_cache"].startswith("turboquant mse K5/V2, keys in 2 channel tiers")
    assert "centred on 2 tokens, then on each previous block of 4" in json.loads(out)["kv_cache"]


def test_prompt_from_stdin_and_prompt_cache_file(tiny_chat_model, capsys, monkeypatch, tmp_path):
    cache_file = tmp_path / "prefix.safetensors"
    args = [
        "generate",
        "-m",
        str(tiny_chat_model),
        "-p",
        "-",
        "--raw",
        "--max-tokens",
        "5",
        "--json",
        "--prompt-cache-file",
        str(cache_file),
    ]
    code, out, err = run_cli(args, capsys, stdin="the quick brown fox", monkeypatch=monkeypatch)
    assert code == 0, err
    first = json.loads(out)
    assert cache_file.is_file() and first["prefilled_tokens"] == first["prompt_tokens"]
    code, out, err = run_cli(
        args, capsys, stdin="the quick brown fox jumps over", monkeypatch=monkeypatch
    )
    second = json.loads(out)
    assert second["prefilled_tokens"] < second["prompt_tokens"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-p", ""], "the prompt is empty"),
        (["-p", "hi", "--temp", "-1"], "--temp must be >= 0"),
        (["-p", "hi", "--kv-cache", "turboquant", "--kv-bits", "9"], "--kv-bits must be in 1..8"),
        (["-p", "hi", "--max-tokens", "0"], "--max-tokens must be >= 1"),
        (
            ["-p", "hi", "--kv-center", "64", "--kv-center-block", "32"],
            "must be <= --kv-center-block",
        ),
        (["-p", "hi", "--kv-key-tiers", "7"], "--kv-key-tiers must be 0 (off) or 2..5"),
        (["-p", "hi", "--max-tokens", "5000"], "exceeds the model's context of 1024 tokens"),
        (["-p", "hi", "--max-tokens", "many"], "Invalid value for '--max-tokens'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_chat_model, capsys, extra, message):
    code, out, err = run_cli(["generate", "-m", str(tiny_chat_model), *extra], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_model_and_missing_tokenizer(tiny_checkpoints, capsys, tmp_path):
    code, _, err = run_cli(["generate", "-m", str(tmp_path / "nope"), "-p", "hi"], capsys)
    assert code == 2 and "no such model directory" in err
    path, _ = tiny_checkpoints("31b")  # weights and config, no tokenizer
    code, _, err = run_cli(["generate", "-m", str(path), "-p", "hi"], capsys)
    assert code == 2 and "no tokenizer" in err


def test_console_script_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gemma4_mlx.cli", "generate", "-m", str(tmp_path / "x"), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_chat_reuses_the_cache_between_turns(tiny_chat_model):
    from gemma4_mlx import Chat

    model, tokenizer = load(str(tiny_chat_model))
    chat = Chat(model, tokenizer, system="be brief")
    first = chat.send("hello world", max_tokens=6)
    assert chat.last_prefilled == first.prompt_tokens
    assert chat.cache[0].offset == len(chat.cached_tokens)  # the cache holds exactly these
    second = chat.send("the quick fox", max_tokens=6)
    history = second.prompt_tokens - first.prompt_tokens - len(first.tokens)
    print(f"turn 2: {second.prompt_tokens} prompt tokens, {chat.last_prefilled} prefilled")
    assert chat.last_prefilled < second.prompt_tokens
    assert chat.last_prefilled <= history + 2


def test_chat_command_with_reset(tiny_chat_model, capsys, monkeypatch):
    code, out, err = run_cli(
        ["chat", "-m", str(tiny_chat_model), "--max-tokens", "4"],
        capsys,
        stdin="hello\n/reset\nthe quick\n/quit\n",
        monkeypatch=monkeypatch,
    )
    assert code == 0, err
    assert "[conversation reset]" in err and err.count("prefilled") == 2


def test_python_api_generate_and_stream(tiny_chat_model):
    from gemma4_mlx import KVPolicy, SamplingOptions, generate, stream_generate

    model, tokenizer = load(str(tiny_chat_model))
    result = generate(
        model, tokenizer, "hello world", max_tokens=8, kv_policy=KVPolicy("turboquant", bits=4)
    )
    pieces = [
        r.text
        for r in stream_generate(
            model,
            tokenizer,
            "hello world",
            max_tokens=8,
            sampling=SamplingOptions(),
            kv_policy=KVPolicy("turboquant", bits=4),
        )
    ]
    assert "".join(pieces) == result.raw_text
