"""GGUF (llama.cpp) -> an HF-layout directory: config.json, safetensors with HF names, tokenizer.

Tensors are dequantized with the ``gguf`` package (every ggml type) and renamed with its own
tensor-name tables (``gguf.get_tensor_name_map``), undoing what llama.cpp's Gemma conversion
changed: RMSNorm weights were stored as (1 + w). config.json is rebuilt from the GGUF metadata
and the tokenizer files by transformers' GGUF tokenizer converter.

Supported: ``gemma3`` (the offline demo model). ``gemma4`` GGUF input is refused with a clear
error for now: its tensor layout (fused experts, per-layer embeddings) has not been checked
against a real file, and a silently wrong conversion is worse than none.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gemma4_mlx.errors import UserError

SUPPORTED = ("gemma3",)


def _reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # truncated files raise ValueError / struct / memmap errors
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gemma3_config(reader, path: Path) -> dict:
    arch = "gemma3"

    def get(key, default=None, required=False):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None and required:
            raise UserError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    n_layers = int(get("block_count", required=True))
    head_dim = int(get("attention.key_length", required=True))
    pattern = int(get("attention.sliding_window_pattern", 6) or 6)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise UserError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens")
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab,
        "hidden_size": int(get("embedding_length", required=True)),
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(get("attention.head_count", required=True)),
        "num_key_value_heads": int(get("attention.head_count_kv", required=True)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(get("attention.sliding_window", 512)),
        "layer_types": [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
        ],
        "rope_theta": float(get("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": float(get("rope.freq_base_swa", 10_000.0)),
        "max_position_embeddings": int(get("context_length", 32768)),
        "query_pre_attn_scalar": head_dim,
        "final_logit_softcapping": get("final_logit_softcapping"),
        "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "torch_dtype": "float32",
    }
    factor = get("rope.scaling.factor")
    if factor:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return config


def _hf_tensors(reader, config: dict, path: Path) -> dict[str, np.ndarray]:
    """GGUF tensors -> {HF name: float32 array}, norm shift undone."""
    import gguf
    from mlx.utils import tree_flatten

    from gemma4_mlx.config import parse_config
    from gemma4_mlx.models.text import build_model

    # Reverse gguf's HF -> GGUF name table over the parameters this config implies.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"])
    expected = [
        k.removesuffix(".weight")
        for k, _ in tree_flatten(build_model(parse_config(config)).parameters())
    ]
    to_hf = {name_map.get_name(k): k for k in expected if name_map.get_name(k)}
    out = {}
    for tensor in reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")
        hf = to_hf.get(base)
        if hf is None or suffix != "weight":
            raise UserError(f"{path}: unexpected tensor {tensor.name!r} for a gemma3 model")
        try:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise UserError(f"{path}: cannot dequantize {tensor.name} ({e})") from None
        data = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        if hf.endswith("norm"):  # llama.cpp stores Gemma's RMSNorm weights as (1 + w)
            data = data - 1.0
        out[f"{hf}.weight"] = data
    return out


def _write_tokenizer(path: Path, out_dir: Path, config: dict) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise UserError(f"{path}: cannot rebuild the tokenizer from GGUF metadata ({e})") from None
    tok.save_pretrained(str(out_dir))
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [config["eos_token_id"]],
        "pad_token_id": config["pad_token_id"],
    }
    # Gemma's end-of-turn marker stops generation too, when the vocabulary has it.
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tok.unk_token_id:
        generation["eos_token_id"].append(end_of_turn)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert a GGUF file into an HF-layout directory, atomically (temp dir, then rename)."""
    from safetensors.numpy import save_file

    path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir}: output directory already exists")
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise UserError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)}); "
            "for Gemma 4 convert from the Hugging Face checkpoint instead"
        )
    config = gemma3_config(reader, path)
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        raise UserError(f"dtype {dtype!r}: GGUF conversion writes float32 or float16")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tensors = {k: v.astype(np_dtype) for k, v in _hf_tensors(reader, config, path).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(path, tmp, config)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
