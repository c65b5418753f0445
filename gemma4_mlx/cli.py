"""``gemma4-mlx``: generate, chat, convert, bench.

Every user error is one line on stderr (``error: ...``) and exit status 2, never a traceback;
Ctrl-C is ``interrupted`` and exit status 130, from the first import on. Heavy modules (mlx_lm,
transformers, the model code) are imported inside the commands, after the options are checked,
so ``--help``, ``--version`` and option errors return in a fraction of a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:  # Ctrl-C while Python is still importing gets the same one word as later on
    import typer

    from gemma4_mlx.errors import BadArgument, UserError
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None


def finite_float(text: str) -> float:
    """A float option that refuses nan and inf (they pass every range check, then sample
    garbage). Used by every float option."""
    import math

    try:
        number = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite number")
    return number


def dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise ValueError(f"{text!r} is not one of {', '.join(DTYPES)}")
    return text


DTYPES = ("float32", "bfloat16", "float16")
FLAG = ""  # metavar of on/off options: they take no value, so the help shows none

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: no rich import, no type column for flags
    help="Gemma 4 on MLX with a TurboQuant-compressed KV cache.",
)


def _show_version(value: bool) -> None:
    if value:
        from gemma4_mlx import __version__

        typer.echo(f"gemma4-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        callback=_show_version,
        is_eager=True,
        metavar=FLAG,
        help="Print the version and exit.",
    ),
):
    """Gemma 4 on MLX with a TurboQuant-compressed KV cache."""


# Options shared by generate and chat: declared once here, listed in both signatures.
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
    parser=finite_float,
    metavar="BITS",
    help="Quantize the KV cache: turboquant's average key/value bits (2.5 = K3/V2, 3.5 = K5/V2; "
    "without bits options: K3.125/V2) or the affine bits.",
)
KEY_BITS = typer.Option(
    None,
    "--key-bits",
    parser=finite_float,
    metavar="BITS",
    help="TurboQuant key bits (1..8, steps of 0.5; 1/8 with key tiers, the default).",
)
VALUE_BITS = typer.Option(
    None,
    "--value-bits",
    parser=finite_float,
    metavar="BITS",
    help="TurboQuant value bits (1..8, steps of 0.5).",
)
KV_SPEC = typer.Option(
    None,
    "--kv",
    metavar="SPEC",
    help="The whole KV policy in one string, e.g. 'turboquant:k3,v2,window=64,sink=4' "
    "(research settings: README, KV options); instead of the options above.",
)
DTYPE = typer.Option(
    None,
    "--dtype",
    parser=dtype_name,
    help="Cast weights: float32 | bfloat16 | float16.",
)
SYSTEM = typer.Option(None, "--system", help="System prompt (needs a chat template).")
TEMP = typer.Option(
    None, "--temp", parser=finite_float, help="Temperature (default: generation_config or 0)."
)
TOP_P = typer.Option(None, "--top-p", parser=finite_float, help="Nucleus sampling: (0, 1].")
TOP_K = typer.Option(None, "--top-k", help="Sample from the k most likely tokens; 0: off.")
MIN_P = typer.Option(None, "--min-p", parser=finite_float, help="Minimum probability: [0, 1].")
SEED = typer.Option(None, "--seed", help="Random seed for sampling.")
THINKING = typer.Option(
    False,
    "--thinking/--no-thinking",
    metavar=FLAG,
    help="Let the model think first (needs a chat template with a thinking mode).",
)
CHAT_TEMPLATE = typer.Option(
    None,
    "--chat-template",
    help="Jinja chat template file (default: the tokenizer's own; none: raw continuation).",
)


KV_FLAGS = {"kind": "--kv-cache", "bits": "--kv-bits", "key_bits": "--key-bits"}
KV_FLAGS["value_bits"] = "--value-bits"


DRAFT_MODEL = typer.Option(
    None,
    "--draft-model",
    help="Speculative decoding: a small gemma4_text/gemma3_text model with the same tokenizer, "
    "or Gemma 4's assistant drafter (gemma4_assistant), drafts tokens the model verifies "
    "(same output, greedy: token for token).",
)
NUM_DRAFT_TOKENS = typer.Option(
    None,
    "--num-draft-tokens",
    help="Tokens the draft model proposes per step (default 3; at most the KV cache's rewind).",
)


def _draft_summary(result) -> str:
    if not result.num_draft_tokens:
        return ""
    return (
        f", draft accepted {result.accepted_tokens}/{result.drafted_tokens} "
        f"({100 * result.acceptance_rate:.0f}%, {result.num_draft_tokens} per step, "
        f"{len(result.accepted_per_step)} steps)"
    )


def _check_draft_options(draft_model: str | None, num_draft_tokens: int | None) -> None:
    if num_draft_tokens is not None:
        from gemma4_mlx.speculative import check_num_draft_tokens

        check_num_draft_tokens(num_draft_tokens)
        if draft_model is None:
            raise UserError("--num-draft-tokens needs --draft-model")


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


def _sampling(model_dir: Path | None, temp, top_p, top_k, min_p, seed):
    """The sampling options: the user's, else generation_config.json's, else neutral; checked.
    With ``model_dir=None`` (before the model is found) only the user's values are checked."""
    from gemma4_mlx.generate import SamplingOptions, generation_defaults

    defaults = generation_defaults(model_dir)
    sampling = SamplingOptions(
        temp=temp if temp is not None else defaults.get("temp", 0.0),
        top_p=top_p if top_p is not None else defaults.get("top_p", 1.0),
        top_k=top_k if top_k is not None else defaults.get("top_k", 0),
        min_p=min_p if min_p is not None else defaults.get("min_p", 0.0),
        seed=seed,
    )
    sampling.validate()
    return sampling


def _load(model: str, dtype: str | None, quiet: bool, text_only: bool = False):
    from gemma4_mlx.loading import load_model, load_tokenizer, resolve_model_path

    if model == "demo" and not Path(model).is_dir():
        from gemma4_mlx.demo import ensure_demo_model

        ensure_demo_model(progress=None if quiet else _note)
    model_dir = resolve_model_path(model)
    m, config = load_model(model_dir, dtype=dtype, text_only=text_only)
    return model_dir, m, load_tokenizer(model_dir, config)


def _note(text: str) -> None:
    typer.echo(text, err=True)


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def _read_prompt(prompt: str) -> str:
    """``-p TEXT``, or ``-p -``: stdin, less the one newline that ends a piped line or file."""
    if prompt == "-":
        return _decode(sys.stdin.buffer.read(), "the prompt (stdin)").removesuffix("\n")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raw = prompt.encode("utf-8", "surrogateescape")
        return _decode(raw, "the prompt")
    return prompt


def _read_json(path: Path, what: str):
    """A JSON file an option names, read before the model loads; one-line errors."""
    import json

    try:
        return json.loads(_decode(path.read_bytes(), f"{path}"))
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


def _read_schema(path: Path | None) -> dict | None:
    """--json-schema FILE: a JSON object."""
    if path is None:
        return None
    schema = _read_json(path, "JSON schema")
    if not isinstance(schema, dict):
        raise UserError(f"{path}: a JSON schema must be an object")
    return schema


def _read_tools(path: Path | None, raw: bool) -> list | None:
    """--tools FILE: a JSON list of OpenAI function tools."""
    if path is None:
        return None
    if raw:
        raise UserError("--tools needs the chat template (it declares the tools): drop --raw")
    from gemma4_mlx.engine.grammar import check_tools

    tools = _read_json(path, "tools")
    check_tools(tools)
    return tools


def _read_template(path: Path | None, raw: bool) -> str | None:
    if path is None:
        return None
    if raw:
        raise UserError("--raw and --chat-template contradict each other: pass one")
    try:
        return _decode(path.read_bytes(), f"{path}")
    except OSError as e:
        raise UserError(f"{path}: cannot read the chat template ({e.strerror})") from None


@app.command()
def generate(
    model: str = MODEL,
    prompt: str = typer.Option(
        ..., "--prompt", "-p", help="The prompt, or '-' to read it from stdin."
    ),
    system: str | None = SYSTEM,
    max_tokens: int = typer.Option(256, "--max-tokens", help="Maximum tokens to generate."),
    temp: float | None = TEMP,
    top_p: float | None = TOP_P,
    top_k: int | None = TOP_K,
    min_p: float | None = MIN_P,
    seed: int | None = SEED,
    thinking: bool = THINKING,
    raw: bool = typer.Option(
        False, "--raw", metavar=FLAG, help="Feed the prompt as is, without the chat template."
    ),
    chat_template: Path | None = CHAT_TEMPLATE,
    kv_cache: str | None = KV_CACHE,
    kv_bits: float | None = KV_BITS,
    key_bits: float | None = KEY_BITS,
    value_bits: float | None = VALUE_BITS,
    kv_spec: str | None = KV_SPEC,
    prompt_cache_file: Path | None = typer.Option(
        None, "--prompt-cache-file", help="Reuse/save the prompt's KV cache."
    ),
    json_out: bool = typer.Option(
        False, "--json", metavar=FLAG, help="Print one JSON object instead of streaming text."
    ),
    json_schema: Path | None = typer.Option(
        None, "--json-schema", help="JSON schema file: the answer is enforced to be its JSON."
    ),
    tools: Path | None = typer.Option(
        None,
        "--tools",
        help="JSON file of OpenAI function tools: declared in the prompt, calls enforced to "
        "their schemas and printed as JSON.",
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
        False,
        "--text-only",
        metavar=FLAG,
        help="Skip the vision and audio towers (less memory, text only).",
    ),
    audio: list[Path] | None = typer.Option(
        None,
        "--audio",
        metavar="PATH",
        help="Audio file (WAV/FLAC/MP3/M4A/..., or a video's soundtrack) before the prompt; "
        "repeatable. E2B/E4B only.",
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
    video_audio: bool = typer.Option(
        False,
        "--video-audio",
        metavar=FLAG,
        help="Also pass each --video file's soundtrack as audio (E2B/E4B).",
    ),
    draft_model: str | None = DRAFT_MODEL,
    num_draft_tokens: int | None = NUM_DRAFT_TOKENS,
):
    """Generate text from a prompt, streamed to the terminal.

    The prompt goes through the tokenizer's chat template when it has one; a base model (no
    template, like the demo) continues it as raw text."""
    import json

    from gemma4_mlx.generate import (
        check_context,
        check_max_tokens,
        check_prompt_text,
        memory_warning,
    )
    from gemma4_mlx.generate import generate as run_generate
    from gemma4_mlx.tokenizer import NO_TEMPLATE_NOTE, build_prompt, prompt_template

    # Everything the options alone decide is checked before the model loads.
    prompt = _read_prompt(prompt)
    check_prompt_text(prompt)
    check_max_tokens(max_tokens)
    _sampling(None, temp, top_p, top_k, min_p, seed)
    template_text = _read_template(chat_template, raw)
    policy = _policy(kv_cache, kv_bits, key_bits, value_bits, kv_spec)
    if prompt_cache_file is not None and prompt_cache_file.is_dir():  # before the model loads
        raise UserError(f"--prompt-cache-file {prompt_cache_file} is a directory; give a file")
    if image_tokens is not None and not image:
        raise UserError("--image-tokens needs --image (video frames take 70 soft tokens each)")
    if (video_frames is not None or video_fps is not None) and not video:
        raise UserError("--video-frames/--video-fps need --video")
    if video_audio:
        if not video:
            raise UserError("--video-audio needs --video")
        audio = list(audio or []) + [Path(v) for v in video]
    for path in audio or []:
        if not path.is_file():  # before the (slow) model load
            raise UserError(f"{path}: no such audio file")
    if image and image_tokens is not None:
        from gemma4_mlx.media.image import check_budget

        check_budget(image_tokens)
    _check_draft_options(draft_model, num_draft_tokens)
    if draft_model is not None and (image or video or audio or video_audio):
        raise UserError("--draft-model is for text prompts only: drop --image/--video/--audio")
    if draft_model is not None and (json_schema or tools):
        raise UserError("--draft-model cannot be combined with --json-schema or --tools yet")
    if prompt_cache_file is not None and (image or video or audio):
        raise UserError("--prompt-cache-file cannot be combined with --image/--video/--audio")
    schema = _read_schema(json_schema)
    tool_list = _read_tools(tools, raw)
    model_dir, m, tokenizer = _load(model, dtype, quiet=json_out, text_only=text_only)
    if image and image_tokens is None:
        from gemma4_mlx.media.image import default_budget

        image_tokens = default_budget(model_dir)
    draft = None
    if draft_model is not None:
        from gemma4_mlx.speculative import load_draft

        draft = load_draft(draft_model, dtype=dtype)
    sampling = _sampling(model_dir, temp, top_p, top_k, min_p, seed)
    template = prompt_template(tokenizer, template_text, raw, system, thinking)
    if tool_list and "tools" not in (template or ""):
        raise UserError("--tools needs a chat template that declares tools (--chat-template)")
    if audio:  # one placeholder per file before the text (after the images), as the template
        from gemma4_mlx.media.audio import audio_placeholder
        from gemma4_mlx.models.multimodal import check_audio_supported

        check_audio_supported(m)
        prompt = audio_placeholder(tokenizer, m.media_tokens) * len(audio) + prompt
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
                _note(f"note: {path}: {videos[-1].note}")
        prompt = with_image_placeholders(tokenizer, m.media_tokens, prompt, len(image), len(video))
    tokens = build_prompt(
        tokenizer, prompt, system, thinking, raw, tools=tool_list, chat_template=template_text
    )
    check_context(m, len(tokens), max_tokens)
    warning = memory_warning(model_dir, m, policy, len(tokens) + max_tokens)
    if warning:
        _note(warning)
    if template is None and not raw and not json_out:
        _note(NO_TEMPLATE_NOTE)
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
        audio=list(audio) if audio else None,
        videos=videos or None,
        json_schema=schema,
        thinking=thinking,
        tools=tool_list,
        draft_model=draft,
        num_draft_tokens=num_draft_tokens,
    )
    if json_out:
        typer.echo(result.to_json())
    else:
        sys.stdout.write("\n")
        for call in result.tool_calls if tool_list else ():
            typer.echo(json.dumps(call))
        speculative = _draft_summary(result)
        _note(
            f"[{result.prompt_tokens} prompt tokens ({result.prefilled_tokens} prefilled) at "
            f"{result.prompt_tps:.1f} tok/s, {len(result.tokens)} generated at {result.generation_tps:.1f} tok/s, "
            f"peak {result.peak_memory_gb:.2f} GB, KV {result.kv_cache}{speculative}]"
        )


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


CHAT_COMMANDS = "/reset, /save [PATH], /image PATH, /audio PATH, /quit (start a message with // to send a leading /)"


@app.command()
def chat(
    model: str = MODEL,
    system: str | None = SYSTEM,
    max_tokens: int = typer.Option(512, "--max-tokens", help="Maximum tokens per answer."),
    temp: float | None = TEMP,
    top_p: float | None = TOP_P,
    top_k: int | None = TOP_K,
    min_p: float | None = MIN_P,
    seed: int | None = SEED,
    thinking: bool = THINKING,
    chat_template: Path | None = CHAT_TEMPLATE,
    kv_cache: str | None = KV_CACHE,
    kv_bits: float | None = KV_BITS,
    key_bits: float | None = KEY_BITS,
    value_bits: float | None = VALUE_BITS,
    kv_spec: str | None = KV_SPEC,
    dtype: str | None = DTYPE,
    draft_model: str | None = DRAFT_MODEL,
    num_draft_tokens: int | None = NUM_DRAFT_TOKENS,
):
    """Multi-turn chat that reuses the KV cache between turns. /image PATH and /audio PATH
    (E2B/E4B) attach media to the next message; /reset, /save PATH, /quit.

    An error in a turn or a command is one line and the conversation goes on; Ctrl-C during an
    answer stops that answer."""
    from gemma4_mlx.generate import Chat, check_max_tokens
    from gemma4_mlx.tokenizer import NO_TEMPLATE_NOTE

    check_max_tokens(max_tokens)
    _sampling(None, temp, top_p, top_k, min_p, seed)
    template_text = _read_template(chat_template, raw=False)
    policy = _policy(kv_cache, kv_bits, key_bits, value_bits, kv_spec)
    _check_draft_options(draft_model, num_draft_tokens)
    model_dir, m, tokenizer = _load(model, dtype, quiet=False)
    draft = None
    if draft_model is not None:
        from gemma4_mlx.speculative import load_draft

        draft = load_draft(draft_model, dtype=dtype)
    session = Chat(
        m,
        tokenizer,
        system=system,
        thinking=thinking,
        kv_policy=policy,
        sampling=_sampling(model_dir, temp, top_p, top_k, min_p, seed),
        chat_template=template_text,
        draft_model=draft,
        num_draft_tokens=num_draft_tokens,
    )
    if session.template is None:
        _note(NO_TEMPLATE_NOTE)
    interactive = sys.stdin.isatty()
    # media for the next message, and the checkpoint's own image budget (as generate uses)
    pending: dict = {"audio": [], "images": [], "image_tokens": 280}
    if getattr(m, "has_vision", False):
        from gemma4_mlx.media.image import default_budget

        pending["image_tokens"] = default_budget(model_dir)
    while True:
        if interactive:
            sys.stdout.write(">> ")
            sys.stdout.flush()
        data = sys.stdin.buffer.readline()
        if not data:
            break
        try:
            line = _decode(data, "the line").strip()
            if _chat_line(session, line, max_tokens, pending) == "quit":
                break
        except (UserError, OSError) as e:  # one line, and the conversation goes on
            message = e.worded_for(_cli_names()) if isinstance(e, BadArgument) else e
            _note(f"error: {message}")
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            _note("[interrupted: answer stopped]")


def _chat_line(session, line: str, max_tokens: int, pending: dict) -> str | None:
    """One line of the REPL: a /command or a message. Returns "quit" to end the session."""
    if not line:
        return None
    if line.startswith("/") and not line.startswith("//"):
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return "quit"
        if command == "/reset":
            session.reset()
            _note("[conversation reset]")
        elif command == "/save":
            path = argument.strip() or "chat-cache.safetensors"
            session.save(path)
            _note(f"[saved the conversation's KV cache to {path}]")
        elif command == "/audio":
            from gemma4_mlx.models.multimodal import check_audio_supported

            check_audio_supported(session.model)
            path = Path(argument.strip())
            if not path.is_file():
                raise UserError(f"{path}: no such audio file")
            pending["audio"].append(path)
            _note(f"[{path} goes with the next message]")
        elif command == "/image":
            from gemma4_mlx.media.image import open_image
            from gemma4_mlx.models.multimodal import check_media_supported

            check_media_supported(session.model)
            path = argument.strip()
            open_image(path)  # fail now, not after the next message
            pending["images"].append(path)
            _note(f"[{path} attached to the next message]")
        else:
            raise UserError(f"unknown command {command}: the commands are {CHAT_COMMANDS}")
        return None
    # Attached media go with this message whatever happens to it (an error drops them).
    audio, pending["audio"] = pending["audio"], []
    images, pending["images"] = pending["images"], []
    result = session.send(
        line.removeprefix("/"),
        max_tokens=max_tokens,
        on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
        audio=audio or None,
        images=images or None,
        image_tokens=pending["image_tokens"],
    )
    sys.stdout.write("\n")
    _note(
        f"[prefilled {session.last_prefilled} new tokens, generated {len(result.tokens)} at "
        f"{result.generation_tps:.1f} tok/s{_draft_summary(result)}]"
    )
    return None


@app.command()
def convert(
    hf_path: str = typer.Option(
        ..., "--hf-path", help="HF model directory, hub repo id, or a .gguf file."
    ),
    mlx_path: Path = typer.Option(
        ..., "--mlx-path", help="Output directory (must not exist unless --force)."
    ),
    quantize: bool = typer.Option(
        False, "--quantize", "-q", metavar=FLAG, help="Quantize the weights."
    ),
    q_bits: int | None = typer.Option(None, "--q-bits", help="With -q: bits per weight [4]."),
    q_group_size: int | None = typer.Option(
        None, "--q-group-size", help="With -q: weights per scale [64]."
    ),
    q_mode: str | None = typer.Option(
        None, "--q-mode", help="With -q: affine | mxfp4 | nvfp4 | mxfp8 [affine]."
    ),
    dtype: str | None = DTYPE,
    force: bool = typer.Option(
        False, "--force", metavar=FLAG, help="Replace an existing output directory."
    ),
    upload_repo: str | None = typer.Option(
        None, "--upload-repo", help="Upload the result to this hub repo."
    ),
):
    """Convert (and optionally quantize) a checkpoint into an MLX directory mlx-lm can also load."""
    given = [
        flag
        for flag, value in (
            ("--q-bits", q_bits),
            ("--q-group-size", q_group_size),
            ("--q-mode", q_mode),
        )
        if value is not None
    ]
    if given and not quantize:
        raise UserError(f"{', '.join(given)} only apply with --quantize (-q)")
    from gemma4_mlx.convert import convert as run_convert

    out = run_convert(
        hf_path,
        mlx_path,
        quantize=quantize,
        q_bits=4 if q_bits is None else q_bits,
        q_group_size=64 if q_group_size is None else q_group_size,
        q_mode=q_mode or "affine",
        dtype=dtype,
        force=force,
        upload_repo=upload_repo,
    )
    typer.echo(f"wrote {out}")


BENCH_HELP = (
    "quality | needle | speed | memory | distortion | weights | startup | audio | vision | serve"
    " | speculative"
)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(
    ctx: typer.Context,
    name: str = typer.Argument(
        "--help", help=f"{BENCH_HELP} (then its own options, or --help)", show_default=False
    ),
):
    """Run a benchmark (JSON + PNG under --out, default benchmarks/results; --quick for a smoke run)."""
    from gemma4_mlx.bench import BENCHMARKS, run

    if name in ("--help", "-h"):
        typer.echo(ctx.get_help())
        return
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    try:
        run(name, list(ctx.args), prog=f"gemma4-mlx bench {name}")
    except SystemExit as e:  # argparse: --help (0) or a bad option (2, message already printed)
        if isinstance(e.code, str):  # SystemExit("error: ..."): the one line is the message
            raise UserError(e.code.removeprefix("error: ")) from None
        if e.code not in (0, None):
            raise typer.Exit(2) from None


# -- serve (gemma4_mlx.server) ---------------------------------------------------------------


@app.command()
def serve(
    model: str = MODEL,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind (default: loopback only)."
    ),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    model_id: str | None = typer.Option(
        None, "--model-id", help="The id /v1/models reports (default: the model directory's name)."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="GEMMA4_MLX_API_KEY", help="Require 'Authorization: Bearer KEY'."
    ),
    allow_unauthenticated: bool = typer.Option(
        False,
        "--allow-unauthenticated",
        metavar=FLAG,
        help="Serve a non-loopback --host without an API key (anyone on the network can use it).",
    ),
    cors_origin: list[str] = typer.Option(
        [],
        "--cors-origin",
        metavar="URL",
        help="Allow browser requests from this origin (repeatable); none by default.",
    ),
    allowed_host: list[str] = typer.Option(
        [],
        "--allowed-host",
        metavar="HOST",
        help="Accept this Host header on a loopback bind (repeatable).",
    ),
    max_tokens_cap: int | None = typer.Option(
        None,
        "--max-tokens-cap",
        help="Largest max_tokens a request may ask (default: the context).",
    ),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait; more get 429."),
    prompt_cache_bytes: int = typer.Option(
        2 << 30, "--prompt-cache-bytes", help="Budget of the prefix cache (real KV bytes)."
    ),
    kv_cache: str | None = KV_CACHE,
    kv_bits: float | None = KV_BITS,
    key_bits: float | None = KEY_BITS,
    value_bits: float | None = VALUE_BITS,
    kv_spec: str | None = KV_SPEC,
    chat_template: Path | None = CHAT_TEMPLATE,
    dtype: str | None = DTYPE,
    draft_model: str | None = DRAFT_MODEL,
    num_draft_tokens: int | None = NUM_DRAFT_TOKENS,
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /v1/completions, /v1/models, /health). One worker owns the model and requests queue; a
    TurboQuant cache is served one request at a time. With --draft-model, requests without a
    schema or tools decode speculatively."""
    import logging

    from gemma4_mlx.cache import bind_policy
    from gemma4_mlx.server import Server, ServerConfig, is_loopback

    _check_draft_options(draft_model, num_draft_tokens)
    policy = _policy(kv_cache, kv_bits, key_bits, value_bits, kv_spec)
    template = _read_template(chat_template, raw=False)
    if not 0 <= port <= 65535:
        raise UserError(f"--port is out of range: {port}")
    for name, value in (
        ("--max-queue", max_queue),
        ("--max-tokens-cap", max_tokens_cap),
        ("--prompt-cache-bytes", prompt_cache_bytes),
    ):
        if value is not None and value < (0 if name == "--prompt-cache-bytes" else 1):
            raise UserError(f"{name} is out of range: {value}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = ServerConfig(
        host=host,
        port=port,
        model_id=model_id or ("demo" if model == "demo" else Path(model).name or model),
        api_key=api_key,
        allow_unauthenticated=allow_unauthenticated,
        cors_origins=list(cors_origin),
        allowed_hosts=list(allowed_host),
        max_tokens_cap=max_tokens_cap,
        max_queue=max_queue,
        prompt_cache_bytes=prompt_cache_bytes,
    )
    if not is_loopback(host) and not api_key:
        if allow_unauthenticated:
            _note(f"warning: serving {host} WITHOUT an API key: anyone who can reach it can use it")
    server = Server(config)  # /health answers 503 while the model loads
    _note(f"listening on {server.url} (loading the model)")
    model_dir, m, tokenizer = _load(model, dtype, quiet=False)
    bind_policy(m, policy)
    draft = None
    if draft_model is not None:
        from gemma4_mlx.speculative import load_draft, prepare_draft

        draft = prepare_draft(m, load_draft(draft_model, dtype=dtype), num_draft_tokens, policy)
    server.attach(m, tokenizer, model_dir, chat_template=template, draft=draft)
    _note(f"serving {config.model_id} at {server.url}/v1 (KV cache: {policy})")
    try:
        server.thread.join()
    finally:
        server.close()


def _cli_names() -> dict[str, str]:
    """API argument name -> how the CLI names it, for ``BadArgument`` messages."""
    names = {"prompt": "the prompt", "text": "the message", "thinking": "--thinking"}
    for command in typer.main.get_command(app).commands.values():
        for param in command.params:
            long = [o for o in param.opts if o.startswith("--")]
            if param.name and long:
                names.setdefault(param.name, long[0])
    return names


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line and exit status 2, Ctrl-C 130."""
    try:
        code = app(args=argv, standalone_mode=False)
        if code == 130:  # typer catches Ctrl-C in a command and returns 130 without a word
            typer.echo("interrupted", err=True)
        if isinstance(code, int) and code:
            sys.exit(code)
    except BadArgument as e:
        typer.echo(f"error: {e.worded_for(_cli_names())}", err=True)
        sys.exit(2)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # bad option values, missing options (click's errors)
        message = e.format_message().replace(": Value error, ", ": ")  # a parser's ValueError
        if message:  # an empty message is the help text shown for a bare command
            typer.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
