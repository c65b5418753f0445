"""HF directory / hub id / GGUF -> an MLX directory (optionally quantized) that mlx-lm loads too.

Weights are written with mlx-lm's names and its ``quantization`` config (including per-layer
overrides: the mixed recipe keeps per-layer embeddings and the MoE router at 8 bits, since 4-bit
PLE tables are known to give garbage). config.json is written in Google's released form
(``global_head_dim``/``num_global_key_value_heads``), which mlx-lm 0.32 reads, instead of newer
transformers' ``per_layer_config``. Output goes to a temporary directory renamed at the end: an
interrupted or failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemma4_mlx.errors import BadArgument, UserError

SHARD_BYTES = 5 * 2**30
Q_MODES = {"affine": (2, 3, 4, 5, 6, 8), "mxfp4": (4,), "nvfp4": (4,), "mxfp8": (8,)}
COPY_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template*",
    "processor_config.json",
    "preprocessor_config.json",  # image processor + audio feature extractor, token counts
    "video_preprocessor_config.json",
    "*.jinja",
    "tokenizer.model",
)


def _released_form(text: dict) -> dict:
    """per_layer_config -> global_head_dim / num_global_key_value_heads where that is exact."""
    per_layer = text.get("per_layer_config")
    if not isinstance(per_layer, dict):
        return text
    text = dict(text)
    full = [i for i, t in enumerate(text.get("layer_types", [])) if t == "full_attention"]
    entries = [
        per_layer.get(str(i)) or per_layer.get(f"{i:02d}") or per_layer.get(i) or {} for i in full
    ]
    head_dims = {e.get("head_dim", text.get("head_dim")) for e in entries}
    kv_heads = {e.get("num_key_value_heads") for e in entries}
    if len(head_dims) == 1 and len(kv_heads) == 1:
        text.pop("per_layer_config")
        text["global_head_dim"] = head_dims.pop()
        kv = kv_heads.pop()
        if kv is not None:
            text["num_global_key_value_heads"] = kv
    return text


def _one_of(values) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check_quantization(bits: int, group_size: int, mode: str) -> None:
    """Refuse a quantization setting before any weight is read."""
    if mode not in Q_MODES:
        raise BadArgument("q_mode", f"must be {_one_of(Q_MODES)}, got {mode!r}")
    if bits not in Q_MODES[mode]:
        raise BadArgument(
            "q_bits", f"{bits} is not available with {mode} (choose {_one_of(Q_MODES[mode])})"
        )
    if mode == "affine" and group_size not in (32, 64, 128):
        raise BadArgument("q_group_size", f"must be 32, 64 or 128, got {group_size}")


def _quantize(model: nn.Module, bits: int, group_size: int, mode: str) -> dict:
    check_quantization(bits, group_size, mode)
    if mode != "affine":
        group_size = 16 if mode == "nvfp4" else 32
    overrides: dict[str, Any] = {}
    keep_high = model.quant_predicate

    def predicate(path: str, module: nn.Module):
        weight = getattr(module, "weight", None)
        if not hasattr(module, "to_quantized") or weight is None or weight.shape[-1] % group_size:
            return False
        rule = keep_high(path, module)
        if rule is False:  # kept in float (the audio tower)
            return False
        if isinstance(rule, dict) and mode == "affine" and rule["bits"] > bits:
            overrides[path] = {"group_size": group_size, "bits": rule["bits"]}
            return overrides[path]
        return True

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)
    return {"group_size": group_size, "bits": bits, "mode": mode, **overrides}


def _save_weights(model: nn.Module, out: Path) -> None:
    weights = dict(tree_flatten(model.parameters()))
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        mx.save_safetensors(str(out / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(w.nbytes for w in weights.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def _load_source(source: Path, dtype: str | None) -> nn.Module:
    """The model to convert: a Gemma checkpoint, or a gemma4_assistant drafter."""
    from gemma4_mlx.config import ASSISTANT_MODEL_TYPES
    from gemma4_mlx.loading import load_assistant, load_model

    try:
        kind = json.loads((source / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None  # load_model says what is wrong with it
    if kind in ASSISTANT_MODEL_TYPES:
        return load_assistant(source, dtype=dtype)[0]
    return load_model(source, dtype=dtype)[0]


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_mode: str = "affine",
    dtype: str | None = None,
    force: bool = False,
    upload_repo: str | None = None,
) -> Path:
    from gemma4_mlx.loading import resolve_model_path

    if quantize:
        check_quantization(q_bits, q_group_size, q_mode)
    out = Path(mlx_path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a model directory (--force only replaces those)")
    if out.exists() and not force:
        raise UserError(f"{out}: output directory already exists (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out}: cannot write the output directory ({e.strerror or e})") from None
    try:
        source = Path(str(hf_path))
        if source.suffix == ".gguf":
            from gemma4_mlx.gguf import gguf_to_hf

            source = gguf_to_hf(source, tmp / "hf")
        else:
            source = resolve_model_path(hf_path)
        model = _load_source(source, dtype)
        raw = json.loads((source / "config.json").read_text())
        if isinstance(raw.get("text_config"), dict):
            raw["text_config"] = _released_form(raw["text_config"])
        else:
            raw = _released_form(raw)
        raw.pop("quantization", None)
        raw.pop("quantization_config", None)
        if quantize:
            q = _quantize(model, q_bits, q_group_size, q_mode)
            raw["quantization"] = q
            raw["quantization_config"] = q
        if dtype is not None:
            raw["torch_dtype"] = dtype
        stage = tmp / "out"
        stage.mkdir()
        _save_weights(model, stage)
        (stage / "config.json").write_text(json.dumps(raw, indent=2))
        for pattern in COPY_PATTERNS:
            for f in source.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, stage / f.name)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except OSError as e:  # a full disk or an unwritable output directory
        raise UserError(f"{out}: cannot write the converted model ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if upload_repo:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(upload_repo, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=upload_repo)
    return out
