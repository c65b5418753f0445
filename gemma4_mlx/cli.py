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
    "fp16", "--kv-cache", help="fp16 (model dtype) | affine (mlx-lm) | turboquant."
)
KV_BITS = typer.Option(
    None, "--kv-bits", help="Average K/V bits (turboquant: 3.5 means K5/V2) or affine bits."
)
KEY_BITS = typer.Option(None, "--key-bits", help="TurboQuant key bits (overrides the split).")
VALUE_BITS = typer.Option(None, "--value-bits", help="TurboQuant value bits (overrides the split).")
KV_WINDOW = typer.Option(
    None, "--kv-window", help="TurboQuant: recent tokens each query reads exact (default: policy)."
)
KV_SINK = typer.Option(
    None, "--kv-sink", help="TurboQuant: first tokens kept exact (default: policy)."
)
KV_CENTER = typer.Option(
    None,
    "--kv-center",
    help="TurboQuant: tokens after the sink whose mean centres the codes; 0: off (default: policy).",
)
KV_CENTER_BLOCK = typer.Option(
    None,
    "--kv-center-block",
    help="TurboQuant: a new mean (the previous block's) every N tokens; 0: one mean "
    "(default: policy).",
)
KV_KEY_TIERS = typer.Option(
    None,
    "--kv-key-tiers",
    help="TurboQuant: key channels in N tiers by their variance over the centring tokens, "
    "strong ones with more bits; 0: one rotation over all (default: policy).",
)
KV_CODEC = typer.Option(
    "mse", "--kv-codec", help="TurboQuant codec: mse (norm-corrected) | prod (+1-bit QJL)."
)
DTYPE = typer.Option(None, "--dtype", help="Cast weights: float32 | bfloat16 | float16.")


def _policy(options: dict):
    """The KV policy that a command's ``--kv-*``/``--key-bits``/``--value-bits`` options say;
    ``options`` is the command's ``locals()``. Options left unset take the policy's defaults."""
    from gemma4_mlx.cache import KVPolicy

    extra = {
        "fp_window": options["kv_window"],
        "sink": options["kv_sink"],
        "center": options["kv_center"],
        "center_block": options["kv_center_block"],
        "key_tiers": options["kv_key_tiers"],
    }
    return KVPolicy(
        kind=options["kv_cache"],
        bits=options["kv_bits"],
        key_bits=options["key_bits"],
        value_bits=options["value_bits"],
        codec=options["kv_codec"],
        **{k: v for k, v in extra.items() if v is not None},
    )


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


def _load(model: str, dtype: str | None, text_only: bool = False):
    from gemma4_mlx.loading import load_model, load_tokenizer, resolve_model_path

    model_dir = resolve_model_path(model)
    m, config = load_model(model_dir, dtype=dtype, text_only=text_only)
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
    kv_cache: str = KV_CACHE,
    kv_bits: float | None = KV_BITS,
    key_bits: float | None = KEY_BITS,
    value_bits: float | None = VALUE_BITS,
    kv_window: int | None = KV_WINDOW,
    kv_sink: int | None = KV_SINK,
    kv_center: int | None = KV_CENTER,
    kv_center_block: int | None = KV_CENTER_BLOCK,
    kv_key_tiers: int | None = KV_KEY_TIERS,
    kv_codec: str = KV_CODEC,
    prompt_cache_file: Path | None = typer.Option(
        None, "--prompt-cache-file", help="Reuse/save the prompt's KV cache."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON object instead of streaming text."
    ),
    dtype: str | None = DTYPE,
    image: list[str] = typer.Option(
        [], "--image", help="An image file or http(s) URL (repeatable); shown before the text."
    ),
    image_tokens: int | None = typer.Option(
        None,
        "--image-tokens",
        help="Soft tokens per image: 70 | 140 | 280 | 560 | 1120 (default: the checkpoint's "
        "processor config, else 280).",
    ),
    text_only: bool = typer.Option(
        False, "--text-only", help="Skip the vision tower's weights (less memory, no images)."
    ),
    video: list[str] = typer.Option(
        [], "--video", help="A video file (repeatable): frames at 70 soft tokens each."
    ),
    video_frames: int | None = typer.Option(
        None, "--video-frames", help="Frames sampled uniformly per video (default 32)."
    ),
    video_fps: float | None = typer.Option(
        None, "--video-fps", help="Sample this many frames per second instead of a count."
    ),
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
    policy = _policy(locals())
    if image and image_tokens is not None:
        from gemma4_mlx.media.image import check_budget

        check_budget(image_tokens)
    model_dir, m, tokenizer = _load(model, dtype, text_only)
    if image and image_tokens is None:
        from gemma4_mlx.media.image import default_budget

        image_tokens = default_budget(model_dir)
    sampling = _sampling(model_dir, temp, top_p, top_k, min_p, seed)
    sampling.validate()
    use_template = not raw and _has_template(tokenizer)
    videos = []
    if image or video:
        from gemma4_mlx.media import with_image_placeholders
        from gemma4_mlx.media.video import DEFAULT_FRAMES, load_video
        from gemma4_mlx.models.multimodal import check_media_supported

        check_media_supported(m)
        frames = video_frames if video_frames is not None or video_fps else DEFAULT_FRAMES
        for path in video:
            videos.append(load_video(path, num_frames=frames, fps=video_fps))
            if videos[-1].note:
                typer.echo(f"note: {path}: {videos[-1].note}", err=True)
        prompt = with_image_placeholders(tokenizer, m.media_tokens, prompt, len(image), len(video))
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
        images=image or None,
        image_tokens=image_tokens or 280,
        videos=videos or None,
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
    kv_cache: str = KV_CACHE,
    kv_bits: float | None = KV_BITS,
    key_bits: float | None = KEY_BITS,
    value_bits: float | None = VALUE_BITS,
    kv_window: int | None = KV_WINDOW,
    kv_sink: int | None = KV_SINK,
    kv_center: int | None = KV_CENTER,
    kv_center_block: int | None = KV_CENTER_BLOCK,
    kv_key_tiers: int | None = KV_KEY_TIERS,
    kv_codec: str = KV_CODEC,
    dtype: str | None = DTYPE,
):
    """Multi-turn chat that reuses the KV cache between turns. /image PATH (attach to the next
    message), /reset, /save PATH, /quit."""
    from gemma4_mlx.generate import Chat

    policy = _policy(locals())
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
    pending_images: list[str] = []
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
        if line.startswith("/image"):
            from gemma4_mlx.media.image import open_image
            from gemma4_mlx.models.multimodal import check_media_supported

            try:
                check_media_supported(m)
                path = line.removeprefix("/image").strip()
                open_image(path)  # fail now, not after the next message
                pending_images.append(path)
                typer.echo(f"[{path} attached to the next message]", err=True)
            except UserError as e:
                typer.echo(f"error: {e}", err=True)
            continue
        if line.startswith("/save"):
            path = line.removeprefix("/save").strip() or "chat-cache.safetensors"
            session.save(path)
            typer.echo(f"[saved the conversation's KV cache to {path}]", err=True)
            continue
        result = session.send(
            line,
            max_tokens=max_tokens,
            on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
            images=pending_images or None,
        )
        pending_images = []
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
