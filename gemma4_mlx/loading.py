"""Path or hub id -> (model, tokenizer).

Reads Google's HF checkpoints (single or sharded safetensors, multimodal wrapper included) and
MLX conversions written by mlx-lm or by us (``"quantization"`` in config.json, with per-layer
overrides). Every problem a user can cause is one ``UserError`` line naming the file or tensor.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemma4_mlx.config import ModelConfig, load_config
from gemma4_mlx.errors import BadArgument, UserError
from gemma4_mlx.models.text import build_model

log = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local directory as is; ``demo`` -> the offline Gemma 3 270M; else a hub repo id."""
    text = str(path_or_repo)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text == "demo":
        from gemma4_mlx.demo import ensure_demo_model

        return ensure_demo_model()
    if path.exists():
        raise UserError(f"{path}: expected a model directory, found a file")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise UserError(f"{text}: no such model directory (and not a hub repo id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, network errors
        raise UserError(
            f"{text}: not a local directory and could not be downloaded from the hub "
            f"({type(e).__name__}); pass the path of a downloaded model directory instead"
        ) from None


def _check_safetensors(path: Path) -> None:
    """Header and size check, so a truncated file is an error rather than garbage or a crash."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise UserError(f"{path}: truncated or corrupt safetensors header")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})"
        )


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: unreadable shard index ({e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors weights found")
    return files


def load_weights(model_dir: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in weight_files(model_dir):
        _check_safetensors(f)
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise UserError(f"{f}: cannot read safetensors ({e})") from None
    return weights


def _quantize_like_checkpoint(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Turn Linear/Embedding layers into their quantized twins where the checkpoint has scales."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quantization:  # per-layer override written by mlx-lm or us
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    try:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=predicate,
        )
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(
            f"config.json: unusable quantization settings {quantization} ({e})"
        ) from None


def _check_and_load(model: nn.Module, weights: dict[str, mx.array], model_dir: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise UserError(
            f"{model_dir}: weight {missing[0]!r} is missing from the checkpoint"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if unexpected:
        raise UserError(
            f"{model_dir}: checkpoint has weight {unexpected[0]!r} that config.json does not describe"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for name, param in expected.items():
        if tuple(weights[name].shape) != tuple(param.shape):
            raise UserError(
                f"{model_dir}: weight {name!r} has shape {tuple(weights[name].shape)} but config.json "
                f"implies {tuple(param.shape)}"
            )
    model.load_weights(list(weights.items()), strict=True)


def load_model(
    path: str | Path,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    text_only: bool = False,
) -> tuple[nn.Module, ModelConfig]:
    """An HF-layout or MLX directory -> (model, config). ``dtype`` casts float weights;
    ``text_only`` skips the vision tower's weights (less memory, no images)."""
    model_dir = Path(path)
    config = load_config(model_dir)
    model = build_model(config, text_only=text_only)
    _load_into(model, config.raw, model_dir, dtype, lazy)
    return model, config


def load_assistant(path: str | Path, dtype: str | mx.Dtype | None = None) -> tuple[Any, Any]:
    """A gemma4_assistant directory (HF layout or our conversion) -> (Assistant, its config)."""
    from gemma4_mlx.config import parse_assistant_config
    from gemma4_mlx.models.assistant import Assistant

    model_dir = Path(path)
    source = model_dir / "config.json"
    try:
        raw = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{source}: not a readable config.json ({e})") from None
    config = parse_assistant_config(raw, str(source))
    model = Assistant(config)
    _load_into(model, raw, model_dir, dtype, lazy=False)
    return model, config


def _load_into(model: nn.Module, raw: dict, model_dir: Path, dtype: Any, lazy: bool) -> None:
    """The checkpoint's weights into ``model``: sanitized, quantized like the checkpoint,
    cast to ``dtype``, every name and shape checked."""
    weights = model.sanitize(load_weights(model_dir))
    quantization = raw.get("quantization")
    if quantization is None and isinstance(raw.get("text_config"), dict):
        quantization = raw["text_config"].get("quantization")
    if quantization is not None:
        _quantize_like_checkpoint(model, quantization, weights)
    if dtype is not None:
        target = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(target, mx.Dtype):
            raise BadArgument("dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    _check_and_load(model, weights, model_dir)
    if getattr(model, "has_audio", False):  # the checkpoint's log-mel settings travel with it
        from gemma4_mlx.media.audio import log_mel_config

        model.feature_extractor = log_mel_config(model_dir)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())


def _eos_ids(model_dir: Path, config: ModelConfig) -> list[int] | None:
    ids: list[int] = []
    for source in (model_dir / "generation_config.json", None):
        raw = (
            config.raw
            if source is None
            else (json.loads(source.read_text()) if source.is_file() else {})
        )
        value = raw.get("eos_token_id")
        if value is None and isinstance(raw.get("text_config"), dict):
            value = raw["text_config"].get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids or None


def load_tokenizer(model_dir: Path, config: ModelConfig | None = None) -> Any:
    """mlx-lm's TokenizerWrapper (streaming detokenizer, chat template, eos ids)."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(
            f"{model_dir}: no tokenizer (tokenizer.json or tokenizer.model) in the model directory"
        )
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    config = config or load_config(model_dir)
    try:
        return load_mlx_tokenizer(model_dir, eos_token_ids=_eos_ids(model_dir, config))
    except Exception as e:
        raise UserError(
            f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})"
        ) from None


def load(
    path_or_repo: str | Path,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    kv_policy: Any = None,
    text_only: bool = False,
) -> tuple[nn.Module, Any]:
    """mlx-lm-compatible ``load``: a directory, a hub id or ``demo`` -> (model, tokenizer).

    ``kv_policy`` (a KVPolicy or its text form, e.g. ``"turboquant"``; default: the exact
    cache) is bound to the model: ``model.make_cache()`` and mlx-lm's ``make_prompt_cache``
    build it. ``text_only`` skips the vision and audio towers of a multimodal checkpoint."""
    from gemma4_mlx.cache import as_policy, bind_policy

    policy = as_policy(kv_policy)  # a bad policy fails before the weights load
    model_dir = resolve_model_path(path_or_repo)
    model, config = load_model(model_dir, dtype=dtype, lazy=lazy, text_only=text_only)
    bind_policy(model, policy)
    return model, load_tokenizer(model_dir, config)
