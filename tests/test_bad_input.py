"""Every bad input is one line on stderr and exit status 2: no traceback, no file left behind; in
the chat REPL the error is one line and the conversation goes on. API misuse raises ValueError /
TypeError subclasses whose messages name the API's arguments, not the CLI's flags."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_mlx.cli import main
from gemma4_mlx.errors import BadArgument, BadArgumentType

NO_THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|turn>' + m['role'] + '\n' + m['content'] "
    "+ '<turn|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)


def _setup(kind: str, tmp: Path, models: dict) -> None:
    """Inputs a case needs, made before the directory snapshot."""
    if kind == "file":
        (tmp / "afile").write_text("not a directory")
    elif kind == "dir":
        (tmp / "adir").mkdir()
    elif kind == "no-thinking-template":
        (tmp / "t.jinja").write_text(NO_THINKING_TEMPLATE)
    elif kind == "bad-jinja":
        (tmp / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    elif kind == "latin1-template":
        (tmp / "t.jinja").write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    elif kind == "bad-config":
        shutil.copytree(models["model"], tmp / "broken")
        (tmp / "broken" / "config.json").write_text("{not json")
    elif kind == "truncated":
        shutil.copytree(models["model"], tmp / "broken")
        f = tmp / "broken" / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_cli(argv, monkeypatch, capsys, stdin: bytes = b""):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


G = ["generate", "-m", "{model}"]
B = ["generate", "-m", "{base}"]
# (id, argv, stdin, expected text of the one stderr line, setup)
CASES = [
    # prompts
    ("empty-prompt", [*G, "-p", ""], b"", "the prompt is empty", None),
    ("blank-prompt", [*G, "-p", "  \n "], b"", "the prompt is empty", None),
    ("empty-stdin", [*G, "-p", "-"], b"", "the prompt is empty", None),
    ("stdin-not-utf8", [*G, "-p", "-"], b"caf\xe9 au lait", "not valid UTF-8 (byte 0xe9", None),
    ("argv-not-utf8", [*G, "-p", "caf\udce9"], b"", "the prompt is not valid UTF-8", None),
    ("missing-prompt", G, b"", "Missing option '--prompt'", None),
    # sampling: ranges, and nan/inf for every float option
    ("temp-negative", [*G, "-p", "hi", "--temp", "-1"], b"", "--temp must be >= 0", None),
    ("temp-nan", [*G, "-p", "hi", "--temp", "nan"], b"", "'--temp': 'nan' is not a finite", None),
    ("temp-inf", [*G, "-p", "hi", "--temp", "inf"], b"", "'inf' is not a finite number", None),
    ("top-p-nan", [*G, "-p", "hi", "--top-p", "nan"], b"", "'--top-p': 'nan' is not a", None),
    ("top-p-zero", [*G, "-p", "hi", "--top-p", "0"], b"", "--top-p must be in (0, 1]", None),
    ("top-p-big", [*G, "-p", "hi", "--top-p", "1.5"], b"", "--top-p must be in (0, 1]", None),
    ("min-p-inf", [*G, "-p", "hi", "--min-p", "-inf"], b"", "'--min-p': '-inf' is not a", None),
    ("min-p-big", [*G, "-p", "hi", "--min-p", "2"], b"", "--min-p must be in [0, 1]", None),
    ("top-k-negative", [*G, "-p", "hi", "--top-k", "-1"], b"", "--top-k must be >= 0", None),
    (
        "serve-cap-zero",
        ["serve", "-m", "{model}", "--max-tokens-cap", "0"],
        b"",
        "--max-tokens-cap is out of range: 0",
        None,
    ),
    (
        "serve-cache-negative",
        ["serve", "-m", "{model}", "--prompt-cache-bytes", "-1"],
        b"",
        "--prompt-cache-bytes is out of range: -1",
        None,
    ),
    # option combinations that speculative decoding, media and prompt files cannot serve (yet)
    (
        "draft-with-image",
        [*G, "-p", "hi", "--draft-model", "{model}", "--image", "x.png"],
        b"",
        "--draft-model is for text prompts only",
        None,
    ),
    (
        "draft-with-schema",
        [*G, "-p", "hi", "--draft-model", "{model}", "--json-schema", "s.json"],
        b"",
        "--draft-model cannot be combined with --json-schema",
        None,
    ),
    (
        "n-draft-without-draft",
        [*G, "-p", "hi", "--num-draft-tokens", "2"],
        b"",
        "--num-draft-tokens needs --draft-model",
        None,
    ),
    (
        "prompt-file-with-image",
        [*G, "-p", "hi", "--prompt-cache-file", "c.bin", "--image", "x.png"],
        b"",
        "--prompt-cache-file cannot be combined with --image/--video/--audio",
        None,
    ),
    ("kv-bits-nan", [*G, "-p", "hi", "--kv-bits", "nan"], b"", "'--kv-bits': 'nan' is not", None),
    ("key-bits-inf", [*G, "-p", "hi", "--key-bits", "inf"], b"", "'--key-bits': 'inf'", None),
    ("value-bits-nan", [*G, "-p", "hi", "--value-bits", "nan"], b"", "'--value-bits'", None),
    ("temp-word", [*G, "-p", "hi", "--temp", "hot"], b"", "'hot' is not a number", None),
    # lengths
    ("max-tokens-0", [*G, "-p", "hi", "--max-tokens", "0"], b"", "--max-tokens must be >= 1", None),
    (
        "max-tokens-neg",
        [*G, "-p", "hi", "--max-tokens", "-3"],
        b"",
        "--max-tokens must be >=",
        None,
    ),
    ("max-tokens-float", [*G, "-p", "hi", "--max-tokens", "2.5"], b"", "'--max-tokens'", None),
    ("max-tokens-word", [*G, "-p", "hi", "--max-tokens", "many"], b"", "'--max-tokens'", None),
    # the context error comes alone: no memory warning before it
    ("max-tokens-context", [*G, "-p", "hi", "--max-tokens", "9999999"], b"", "exceeds the", None),
    ("seed-word", [*G, "-p", "hi", "--seed", "x"], b"", "Invalid value for '--seed'", None),
    ("dtype", [*G, "-p", "hi", "--dtype", "float64"], b"", "'--dtype': 'float64' is not", None),
    ("unknown-option", [*G, "-p", "hi", "--bogus"], b"", "No such option: --bogus", None),
    ("unknown-command", ["frobnicate"], b"", "No such command 'frobnicate'", None),
    # chat template rule: options that need a template are refused, never ignored
    (
        "thinking-base",
        [*B, "-p", "hi", "--thinking"],
        b"",
        "--thinking needs a chat template",
        None,
    ),
    ("system-base", [*B, "-p", "hi", "--system", "be brief"], b"", "--system needs a chat", None),
    ("thinking-raw", [*G, "-p", "hi", "--raw", "--thinking"], b"", "fed raw", None),
    ("system-raw", [*G, "-p", "hi", "--raw", "--system", "x"], b"", "--system needs a chat", None),
    (
        "thinking-no-mode",
        [*G, "-p", "hi", "--thinking", "--chat-template", "{tmp}/t.jinja"],
        b"",
        "--thinking is not available: this model's chat template has no thinking mode",
        "no-thinking-template",
    ),
    (
        "template-missing",
        [*G, "-p", "hi", "--chat-template", "{tmp}/no.jinja"],
        b"",
        "cannot read the chat template",
        None,
    ),
    (
        "template-dir",
        [*G, "-p", "hi", "--chat-template", "{tmp}/adir"],
        b"",
        "cannot read the chat template",
        "dir",
    ),
    (
        "template-latin1",
        [*G, "-p", "hi", "--chat-template", "{tmp}/t.jinja"],
        b"",
        "t.jinja is not valid UTF-8",
        "latin1-template",
    ),
    (
        "template-syntax",
        [*G, "-p", "hi", "--chat-template", "{tmp}/t.jinja"],
        b"",
        "cannot apply the chat template",
        "bad-jinja",
    ),
    (
        "template-and-raw",
        [*G, "-p", "hi", "--raw", "--chat-template", "{tmp}/t.jinja"],
        b"",
        "--raw and --chat-template",
        "bad-jinja",
    ),
    # loading faults (these already worked: kept working)
    (
        "no-model",
        ["generate", "-m", "{tmp}/nope", "-p", "hi"],
        b"",
        "no such model directory",
        None,
    ),
    ("model-is-file", ["generate", "-m", "{tmp}/afile", "-p", "hi"], b"", "found a file", "file"),
    ("no-tokenizer", ["generate", "-m", "{notok}", "-p", "hi"], b"", "no tokenizer", None),
    (
        "bad-config",
        ["generate", "-m", "{tmp}/broken", "-p", "hi"],
        b"",
        "config.json",
        "bad-config",
    ),
    (
        "truncated-weights",
        ["generate", "-m", "{tmp}/broken", "-p", "hi"],
        b"",
        "truncated",
        "truncated",
    ),
    (
        "demo-cache-unwritable",
        ["generate", "-m", "demo", "-p", "hi"],
        b"",
        "GEMMA4_MLX_CACHE",
        "file",
    ),
    # convert
    (
        "convert-force-onto-file",
        ["convert", "--hf-path", "{model}", "--mlx-path", "{tmp}/afile", "--force"],
        b"",
        "afile: is a file, not a model directory",
        "file",
    ),
    (
        "convert-exists",
        ["convert", "--hf-path", "{model}", "--mlx-path", "{tmp}/adir"],
        b"",
        "already exists",
        "dir",
    ),
    (
        "convert-q-bits-alone",
        ["convert", "--hf-path", "{model}", "--mlx-path", "{tmp}/o", "--q-bits", "8"],
        b"",
        "--q-bits only apply with --quantize",
        None,
    ),
    (
        "convert-q-mode-alone",
        ["convert", "--hf-path", "{model}", "--mlx-path", "{tmp}/o", "--q-mode", "mxfp4"],
        b"",
        "--q-mode only apply",
        None,
    ),
    (
        "convert-q-bits-7",
        ["convert", "--hf-path", "{model}", "--mlx-path", "{tmp}/o", "-q", "--q-bits", "7"],
        b"",
        "--q-bits 7 is not available with affine (choose 2, 3, 4, 5, 6 or 8)",
        None,
    ),
    (
        "convert-q-group-size",
        ["convert", "--hf-path", "{model}", "--mlx-path", "{tmp}/o", "-q", "--q-group-size", "48"],
        b"",
        "--q-group-size must be 32, 64 or 128, got 48",
        None,
    ),
    (
        "convert-q-mode",
        ["convert", "--hf-path", "{model}", "--mlx-path", "{tmp}/o", "-q", "--q-mode", "fp3"],
        b"",
        "--q-mode must be affine, mxfp4, nvfp4 or mxfp8, got 'fp3'",
        None,
    ),
    (
        "convert-under-file",
        ["convert", "--hf-path", "{model}", "--mlx-path", "{tmp}/afile/o"],
        b"",
        "cannot write the output directory",
        "file",
    ),
    (
        "convert-no-source",
        ["convert", "--hf-path", "{tmp}/nope", "--mlx-path", "{tmp}/o"],
        b"",
        "no such model directory",
        None,
    ),
    # bench
    ("bench-unknown", ["bench", "bogus"], b"", "unknown benchmark 'bogus'", None),
    (
        "bench-lengths-word",
        ["bench", "quality", "--lengths", "abc"],
        b"",
        "gemma4-mlx bench quality: argument --lengths",
        None,
    ),
    (
        "bench-lengths-zero",
        ["bench", "quality", "--lengths", "0"],
        b"",
        "expected positive integers",
        None,
    ),
    (
        "bench-lengths-chunk",
        ["bench", "quality", "--lengths", "100"],
        b"",
        "multiples of 256",
        None,
    ),
    (
        "bench-needle-negative",
        ["bench", "needle", "--lengths", "-5"],
        b"",
        "gemma4-mlx bench needle: argument --lengths",
        None,
    ),
    (
        "bench-needle-depth",
        ["bench", "needle", "--depths", "2"],
        b"",
        "expected numbers in [0, 1]",
        None,
    ),
    (
        "bench-speed-lengths",
        ["bench", "speed", "--lengths", "1,x"],
        b"",
        "gemma4-mlx bench speed",
        None,
    ),
    (
        "bench-unknown-option",
        ["bench", "quality", "--bogus"],
        b"",
        "unrecognized arguments: --bogus",
        None,
    ),
    # chat: errors before the REPL starts
    (
        "chat-thinking-base",
        ["chat", "-m", "{base}", "--thinking"],
        b"",
        "--thinking needs a chat",
        None,
    ),
    (
        "chat-system-base",
        ["chat", "-m", "{base}", "--system", "x"],
        b"",
        "--system needs a chat",
        None,
    ),
    (
        "chat-max-tokens",
        ["chat", "-m", "{model}", "--max-tokens", "0"],
        b"",
        "--max-tokens must be",
        None,
    ),
    (
        "chat-temp-nan",
        ["chat", "-m", "{model}", "--temp", "nan"],
        b"",
        "is not a finite number",
        None,
    ),
]


@pytest.fixture(scope="module")
def models(tiny_chat_model, tiny_base_model, tiny_checkpoints):
    return {
        "model": tiny_chat_model,
        "base": tiny_base_model,
        "notok": tiny_checkpoints("31b")[0],  # weights and config, no tokenizer
    }


@pytest.mark.parametrize(
    "argv, stdin, expected, setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    argv, stdin, expected, setup, models, tmp_path, monkeypatch, capsys
):
    if setup:
        _setup(setup, tmp_path, models)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEMMA4_MLX_CACHE", str(tmp_path / "afile"))
    before = _files(tmp_path)
    names = {**{k: str(v) for k, v in models.items()}, "tmp": str(tmp_path)}
    code, out, err = run_cli([a.format(**names) for a in argv], monkeypatch, capsys, stdin)
    print(err)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert expected in err
    assert _files(tmp_path) == before


# REPL: (id, the bad line, expected text of its error line, setup)
REPL_CASES = [
    ("unknown-command", b"/bogus", "unknown command /bogus: the commands are /reset", None),
    ("save-into-directory", b"/save {tmp}/adir", "adir", "dir"),
    ("save-under-file", b"/save {tmp}/afile/c.safetensors", "afile", "file"),
    ("line-not-utf8", b"caf\xe9", "the line is not valid UTF-8", None),
    ("turn-past-context", b"the quick brown fox " * 300, "exceeds the model's context", None),
]


@pytest.mark.parametrize(
    "line, expected, setup", [c[1:] for c in REPL_CASES], ids=[c[0] for c in REPL_CASES]
)
def test_chat_error_is_one_line_and_the_session_goes_on(
    line, expected, setup, models, tmp_path, monkeypatch, capsys
):
    if setup:
        _setup(setup, tmp_path, models)
    monkeypatch.chdir(tmp_path)
    line = line.replace(b"{tmp}", str(tmp_path).encode())
    stdin = b"hello\n" + line + b"\nthe quick\n/quit\n"
    argv = ["chat", "-m", str(models["model"]), "--max-tokens", "8"]
    code, out, err = run_cli(argv, monkeypatch, capsys, stdin)
    print(err)
    assert code == 0
    lines = err.splitlines()
    errors = [n for n, text in enumerate(lines) if text.startswith("error: ")]
    assert len(errors) == 1 and expected in lines[errors[0]] and "Traceback" not in err
    turns = [n for n, text in enumerate(lines) if text.startswith("[prefilled")]
    assert len(turns) == 2 and turns[0] < errors[0] < turns[1]  # the turn after the error ran


# Python API: (id, call, exception type, message)
API_CASES = [
    (
        "token-id-too-big",
        lambda m, t: _generate(m, t, [999999999]),
        ValueError,
        "token id 999999999 is outside the vocabulary",
    ),
    ("token-id-negative", lambda m, t: _generate(m, t, [-1]), ValueError, "token id -1 is outside"),
    (
        "num-draft-without-draft",
        lambda m, t: _generate(m, t, "hi", num_draft_tokens=2),
        ValueError,
        "num_draft_tokens needs draft_model",
    ),
    (
        "draft-with-schema",
        lambda m, t: _generate(m, t, "hi", draft_model=m, json_schema={"type": "object"}),
        ValueError,
        "draft_model cannot be combined with json_schema",
    ),
    (
        "token-id-float",
        lambda m, t: _generate(m, t, [2, 1.5]),
        TypeError,
        "prompt token ids must be ints",
    ),
    (
        "prompt-none",
        lambda m, t: _generate(m, t, None),
        TypeError,
        "prompt must be a str or a list",
    ),
    ("prompt-empty-text", lambda m, t: _generate(m, t, ""), ValueError, "prompt is empty"),
    ("prompt-empty-ids", lambda m, t: _generate(m, t, []), ValueError, "prompt is empty"),
    (
        "max-tokens-float",
        lambda m, t: _generate(m, t, "hi", max_tokens=2.5),
        TypeError,
        "max_tokens must be an int, got 2.5",
    ),
    (
        "max-tokens-zero",
        lambda m, t: _generate(m, t, "hi", max_tokens=0),
        ValueError,
        "max_tokens must be >= 1",
    ),
    (
        "max-tokens-context",
        lambda m, t: _generate(m, t, "hi", max_tokens=10**6),
        ValueError,
        "max_tokens (1000000) + the prompt",
    ),
    (
        "temp-nan",
        lambda m, t: _generate(m, t, "hi", sampling=_sampling(temp=float("nan"))),
        ValueError,
        "temp must be a finite number",
    ),
    (
        "top-p-big",
        lambda m, t: _generate(m, t, "hi", sampling=_sampling(top_p=2.0)),
        ValueError,
        "top_p must be in (0, 1]",
    ),
    (
        "temp-text",
        lambda m, t: _generate(m, t, "hi", sampling=_sampling(temp="hot")),
        TypeError,
        "temp must be a number",
    ),
    (
        "stream-token-id",
        lambda m, t: next(_stream(m, t, [10**9])),
        ValueError,
        "token id 1000000000",
    ),
    ("chat-empty", lambda m, t: _chat(m, t).send(""), ValueError, "text is empty"),
    ("chat-not-text", lambda m, t: _chat(m, t).send(42), TypeError, "text must be a str"),
]


def _generate(model, tokenizer, prompt, **kwargs):
    from gemma4_mlx import generate

    return generate(model, tokenizer, prompt, **kwargs)


def _stream(model, tokenizer, prompt):
    from gemma4_mlx import stream_generate

    return stream_generate(model, tokenizer, prompt)


def _sampling(**kwargs):
    from gemma4_mlx import SamplingOptions

    return SamplingOptions(**kwargs)


def _chat(model, tokenizer):
    from gemma4_mlx import Chat

    return Chat(model, tokenizer)


@pytest.fixture(scope="module")
def loaded(tiny_chat_model):
    from gemma4_mlx import load

    return load(str(tiny_chat_model))


@pytest.mark.parametrize(
    "call, kind, message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_api_misuse_raises_value_or_type_error_in_api_terms(call, kind, message, loaded):
    with pytest.raises(kind) as info:
        call(*loaded)
    print(info.value)
    assert isinstance(info.value, BadArgument)
    assert message in str(info.value) and "--" not in str(info.value)
    assert isinstance(info.value, BadArgumentType) == (kind is TypeError)


def test_thinking_on_a_model_without_a_thinking_mode_is_refused_by_the_api(tiny_base_model):
    from gemma4_mlx import Chat, load

    model, tokenizer = load(str(tiny_base_model))
    with pytest.raises(ValueError, match="thinking needs a chat template"):
        Chat(model, tokenizer, thinking=True)


def test_ctrl_c_after_start_up_is_interrupted_and_130(models, monkeypatch, capsys):
    import gemma4_mlx.cli as cli

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupt)
    code, out, err = run_cli(
        ["generate", "-m", str(models["model"]), "-p", "hi"], monkeypatch, capsys
    )
    assert code == 130 and err.strip() == "interrupted"


def test_ctrl_c_during_the_first_imports_is_interrupted_and_130():
    """A Ctrl-C while the CLI is still importing (here: raised by the import of typer)."""
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name == 'typer':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "from gemma4_mlx.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert proc.returncode == 130 and proc.stderr == "interrupted\n"


def test_json_output_has_no_note_and_the_base_model_note_is_one_line(models, monkeypatch, capsys):
    argv = ["generate", "-m", str(models["base"]), "-p", "hello world", "--max-tokens", "3"]
    code, out, err = run_cli([*argv, "--json"], monkeypatch, capsys)
    assert code == 0 and err == ""
    json.loads(out)
    code, out, err = run_cli(argv, monkeypatch, capsys)
    assert code == 0 and err.count("note: the tokenizer has no chat template") == 1
