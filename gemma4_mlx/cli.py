"""``gemma4-mlx``: generate, chat, convert.

Every user error is one line on stderr (``error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gemma4_mlx.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Gemma 4 on MLX with a TurboQuant-compressed KV cache.",
)

MODEL = typer.Option(
    "demo", "--model", "-m", help="Model directory, hub repo id, or 'demo' (offline Gemma 3 270M)."
)
KV_CACHE = typer.Option(
    None,
    "--kv-cache",
    metavar="KIND",
    help="KV cache of the global layers: exact (the model's dtype; default) | affine (mlx-lm) | "
    "turboquant (default when a bits option is given).",
)
KV_BITS = typer.Option(
    None,
    "--kv-bits",
    metavar="BITS",
    help="Quantize the KV cache: turboquant's average key/value bits (2.5 = K3/V2, 3.5 = K5/V2) "
    "or the affine bits.",
)
KEY_BITS = typer.Option(
    None, "--key-bits", metavar="BITS", help="TurboQuant key bits (1..8, steps of 0.5)."
)
VALUE_BITS = typer.Option(
    None, "--value-bits", metavar="BITS", help="TurboQuant value bits (1..8, steps of 0.5)."
)
KV_SPEC = typer.Option(
    None,
    "--kv",
    metavar="SPEC",
    help="The whole KV policy in one string, e.g. 'turboquant:k3,v2,window=64,sink=4' "
    "(research settings: README, KV options); instead of the options above.",
)
DTYPE = typer.Option(None, "--dtype", help="Cast weights: float32 | bfloat16 | float16.")


KV_FLAGS = {"kind": "--kv-cache", "bits": "--kv-bits", "key_bits": "--key-bits"}
KV_FLAGS["value_bits"] = "--value-bits"


def _policy(kv_cache, kv_bits, key_bits, value_bits, kv_spec):
    """The KV policy the KV options say, checked before the model loads. One rule for bits
    (mlx-lm's: ``--kv-bits`` turns quantization on): a bits option without ``--kv-cache``
    means turboquant; with ``--kv-cache exact`` it is refused, as are key/value bits with
    affine. ``--kv SPEC`` is the whole policy (KVPolicy.parse) and excludes the others."""
    from gemma4_mlx.cache import KIND_ALIASES, KVPolicy, KVPolicyError

    flags = {"--kv-cache": kv_cache, "--kv-bits": kv_bits, "--key-bits": key_bits}
    flags["--value-bits"] = value_bits
    given = {flag: value for flag, value in flags.items() if value is not None}
    if kv_spec is not None:
        if given:
            raise UserError(f"--kv SPEC is the whole KV policy: drop {', '.join(given)}")
        try:
            return KVPolicy.parse(kv_spec)
        except KVPolicyError as e:
            raise UserError(f"--kv {e.key}: {e.reason}") from None
    bits_flags = [f for f in ("--kv-bits", "--key-bits", "--value-bits") if f in given]
    kind = KIND_ALIASES.get(kv_cache, kv_cache) or ("turboquant" if bits_flags else "exact")
    if kind == "exact" and bits_flags:
        raise UserError(
            f"{bits_flags[0]} quantizes the KV cache: use --kv-cache turboquant or affine, "
            "not exact"
        )
    split = [f for f in ("--key-bits", "--value-bits") if f in given]
    if kind == "affine" and split:
        raise UserError(f"{split[0]} needs --kv-cache turboquant (affine has one --kv-bits)")
    try:
        return KVPolicy(kind, key_bits=key_bits, value_bits=value_bits, bits=kv_bits)
    except KVPolicyError as e:
        flag = KV_FLAGS.get(e.field, "--kv-cache")
        if flag not in given and kv_bits is not None:  # value bits made up from the average
            others = " and ".join(f"{f} {given[f]:g}" for f in bits_flags)
            name = e.field.replace("_", " ")
            raise UserError(f"{others}: the {name} they leave {e.reason}") from None
        raise UserError(f"{flag} {e.reason}") from None


def _sampling(model_dir: Path, temp, top_p, top_k, min_p, seed):
    from gemma4_mlx.generate import SamplingOptions, generation_defaults

    defaults = generation_defaults(model_dir)
    return SamplingOptions(
        temp=temp if temp is not None else defaults.get("temp", 0.0),
        top_p=top_p if top_p is not None else defaults.get("top_p", 1.0),
        top_k=top_k if top_k is not None else defaults.get("top_k", 0),
        min_p=min_p if min_p is not None else defaults.get("min_p", 0.0),
        seed=seed,
    )


def _load(model: str, dtype: str | None):
    from gemma4_mlx.loading import load_model, load_tokenizer, resolve_model_path

    model_dir = resolve_model_path(model)
    m, config = load_model(model_dir, dtype=dtype)
    return model_dir, m, load_tokenizer(model_dir, config)


@app.command()
def generate(
    model: str = MODEL,
    prompt: str = typer.Option(
        ..., "--prompt", "-p", help="The prompt, or '-' to read it from stdin."
    ),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Maximum tokens to generate."),
    temp: float | None = typer.Option(
        None, "--temp", help="Temperature (default: generation_config or 0)."
    ),
    top_p: float | None = typer.Option(None, "--top-p"),
    top_k: int | None = typer.Option(None, "--top-k"),
    min_p: float | None = typer.Option(None, "--min-p"),
    seed: int | None = typer.Option(None, "--seed", help="Random seed for sampling."),
    thinking: bool = typer.Option(
        False, "--thinking/--no-thinking", help="Let the model think first."
    ),
    raw: bool = typer.Option(
        False, "--raw", help="Feed the prompt as is, without the chat template."
    ),
    kv_cache: str | None = KV_CACHE,
    kv_bits: float | None = KV_BITS,
    key_bits: float | None = KEY_BITS,
    value_bits: float | None = VALUE_BITS,
    kv_spec: str | None = KV_SPEC,
    prompt_cache_file: Path | None = typer.Option(
        None, "--prompt-cache-file", help="Reuse/save the prompt's KV cache."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON object instead of streaming text."
    ),
    dtype: str | None = DTYPE,
):
    """Generate text from a prompt, streamed to the terminal."""
    from gemma4_mlx.generate import generate as run_generate
    from gemma4_mlx.generate import memory_warning
    from gemma4_mlx.tokenizer import build_prompt

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("the prompt is empty")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    policy = _policy(kv_cache, kv_bits, key_bits, value_bits, kv_spec)
    if prompt_cache_file is not None and prompt_cache_file.is_dir():  # before the model loads
        raise UserError(f"--prompt-cache-file {prompt_cache_file} is a directory; give a file")
    model_dir, m, tokenizer = _load(model, dtype)
    sampling = _sampling(model_dir, temp, top_p, top_k, min_p, seed)
    sampling.validate()
    use_template = not raw and _has_template(tokenizer)
    tokens = build_prompt(tokenizer, prompt, system=system, thinking=thinking, raw=not use_template)
    warning = memory_warning(model_dir, m, policy, len(tokens) + max_tokens)
    if warning:
        typer.echo(warning, err=True)
    progress = None if json_out or not sys.stderr.isatty() else _progress_bar()
    stream = None if json_out else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    result = run_generate(
        m,
        tokenizer,
        tokens,
        max_tokens=max_tokens,
        sampling=sampling,
        kv_policy=policy,
        prompt_cache_file=prompt_cache_file,
        on_text=stream,
        progress=progress,
    )
    if json_out:
        typer.echo(result.to_json())
    else:
        sys.stdout.write("\n")
        typer.echo(
            f"[{result.prompt_tokens} prompt tokens ({result.prefilled_tokens} prefilled) at "
            f"{result.prompt_tps:.1f} tok/s, {len(result.tokens)} generated at {result.generation_tps:.1f} tok/s, "
            f"peak {result.peak_memory_gb:.2f} GB, KV {result.kv_cache}]",
            err=True,
        )


def _has_template(tokenizer) -> bool:
    from gemma4_mlx.tokenizer import chat_template

    try:
        chat_template(tokenizer)
        return True
    except UserError:
        return False


def _progress_bar():
    def show(done: int, total: int) -> None:
        if total > 256:
            width = 30
            filled = int(width * done / max(total, 1))
            sys.stderr.write(f"\rprompt [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
            if done >= total:
                sys.stderr.write("\r" + " " * (width + 30) + "\r")
            sys.stderr.flush()

    return show


@app.command()
def chat(
    model: str = MODEL,
    system: str | None = typer.Option(None, "--system"),
    max_tokens: int = typer.Option(512, "--max-tokens"),
    temp: float | None = typer.Option(None, "--temp"),
    top_p: float | None = typer.Option(None, "--top-p"),
    top_k: int | None = typer.Option(None, "--top-k"),
    min_p: float | None = typer.Option(None, "--min-p"),
    seed: int | None = typer.Option(None, "--seed"),
    thinking: bool = typer.Option(False, "--thinking/--no-thinking"),
    kv_cache: str | None = KV_CACHE,
    kv_bits: float | None = KV_BITS,
    key_bits: float | None = KEY_BITS,
    value_bits: float | None = VALUE_BITS,
    kv_spec: str | None = KV_SPEC,
    dtype: str | None = DTYPE,
):
    """Multi-turn chat that reuses the KV cache between turns. /reset, /save PATH, /quit."""
    from gemma4_mlx.generate import Chat

    policy = _policy(kv_cache, kv_bits, key_bits, value_bits, kv_spec)
    model_dir, m, tokenizer = _load(model, dtype)
    session = Chat(
        m,
        tokenizer,
        system=system,
        thinking=thinking,
        kv_policy=policy,
        sampling=_sampling(model_dir, temp, top_p, top_k, min_p, seed),
    )
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write(">> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            typer.echo("[conversation reset]", err=True)
            continue
        if line.startswith("/save"):
            path = line.removeprefix("/save").strip() or "chat-cache.safetensors"
            try:
                session.save(path)
            except UserError as e:  # the conversation goes on
                typer.echo(f"error: {e}", err=True)
                continue
            typer.echo(f"[saved the conversation's KV cache to {path}]", err=True)
            continue
        result = session.send(
            line, max_tokens=max_tokens, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush())
        )
        sys.stdout.write("\n")
        typer.echo(
            f"[prefilled {session.last_prefilled} new tokens, generated {len(result.tokens)} at "
            f"{result.generation_tps:.1f} tok/s]",
            err=True,
        )


@app.command()
def convert(
    hf_path: str = typer.Option(
        ..., "--hf-path", help="HF model directory, hub repo id, or a .gguf file."
    ),
    mlx_path: Path = typer.Option(
        ..., "--mlx-path", help="Output directory (must not exist unless --force)."
    ),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the weights."),
    q_bits: int = typer.Option(4, "--q-bits"),
    q_group_size: int = typer.Option(64, "--q-group-size"),
    q_mode: str = typer.Option("affine", "--q-mode", help="affine | mxfp4 | nvfp4 | mxfp8"),
    dtype: str | None = DTYPE,
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    upload_repo: str | None = typer.Option(
        None, "--upload-repo", help="Upload the result to this hub repo."
    ),
):
    """Convert (and optionally quantize) a checkpoint into an MLX directory mlx-lm can also load."""
    from gemma4_mlx.convert import convert as run_convert

    out = run_convert(
        hf_path,
        mlx_path,
        quantize=quantize,
        q_bits=q_bits,
        q_group_size=q_group_size,
        q_mode=q_mode,
        dtype=dtype,
        force=force,
        upload_repo=upload_repo,
    )
    typer.echo(f"wrote {out}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(
    ctx: typer.Context,
    name: str = typer.Argument(
        ...,
        help="quality | needle | speed | memory | distortion | weights (then its own options, or --help)",
    ),
):
    """Run a benchmark (JSON + PNG under --out, default benchmarks/results; --quick for a smoke run)."""
    from gemma4_mlx.bench import BENCHMARKS, run

    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    try:
        run(name, list(ctx.args))
    except SystemExit as e:  # argparse: --help (0) or a bad option (2, message already printed)
        if e.code not in (0, None):
            raise typer.Exit(2) from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line and exit status 2."""
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # bad option values, missing options (click's errors)
        message = e.format_message()
        if message:  # an empty message is the help text shown for a bare command
            typer.echo(f"error: {message}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
