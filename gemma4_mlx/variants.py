"""The released Gemma 4 text decoders as config facts, for what needs their shapes without weights.

Where the facts come from: the ``text_config`` of the released checkpoints' config.json
(google/gemma-4-E2B, -E4B, -26B-A4B, -31B), as summarised from transformers 5.23
(``models/gemma4/configuration_gemma4.py``), mlx-lm 0.32 and mlx-vlm 0.7 and the public configs.
Only the fields that decide the attention layout and the KV cache are kept (hidden sizes and MLP
widths are there so that ``parse_config`` accepts them as it accepts a real config):

| | E2B | E4B | 26B-A4B | 31B |
|---|---|---|---|---|
| layers; pattern | 35; (4 sliding + 1 full) x 7 | 42; (5+1) x 7 | 30; (5+1) x 5 | 60; (5+1) x 10 |
| kv heads sliding / full | 1 / 1 | 2 / 2 | 8 / 2 | 16 / 4 |
| head dim sliding / full | 256 / 512 | 256 / 512 | 256 / 512 | 256 / 512 |
| sliding window | 512 | 512 | 1024 | 1024 |
| KV-shared layers (the last N) | 20 | 18 | 0 | 0 |
| keys = values on full layers | no | no | yes | yes |
| max context | 131072 | 131072 | 262144 | 262144 |

``variant_config(name)`` runs them through ``gemma4_mlx.config.parse_config``: the LayerSpecs,
and so the cache plan (``gemma4_mlx.cache.make_cache``: which layers own a cache and what kind),
are the ones the model would build from the real config.json.
"""

from __future__ import annotations

from typing import Any

from gemma4_mlx.config import FULL, SLIDING, TextConfig, parse_config

__all__ = ["VARIANTS", "variant_config", "variant_raw"]


def _pattern(sliding: int, repeats: int) -> list[str]:
    """``sliding`` sliding layers then one full layer, ``repeats`` times."""
    return ([SLIDING] * sliding + [FULL]) * repeats


_COMMON = {
    "model_type": "gemma4_text",
    "vocab_size": 262144,
    "head_dim": 256,  # sliding layers
    "global_head_dim": 512,  # full layers
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

# name -> the text_config fields (with _COMMON)
VARIANTS: dict[str, dict[str, Any]] = {
    "E2B": {
        "hidden_size": 1536,
        "intermediate_size": 6144,
        "use_double_wide_mlp": True,  # 12288 in the KV-shared layers
        "num_hidden_layers": 35,
        "layer_types": _pattern(4, 7),
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "sliding_window": 512,
        "num_kv_shared_layers": 20,
        "hidden_size_per_layer_input": 256,
        "max_position_embeddings": 131072,
    },
    "E4B": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 42,
        "layer_types": _pattern(5, 7),
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "sliding_window": 512,
        "num_kv_shared_layers": 18,
        "hidden_size_per_layer_input": 256,
        "max_position_embeddings": 131072,
    },
    "26B-A4B": {
        "hidden_size": 2816,
        "intermediate_size": 2112,  # the dense MLP beside the experts
        "enable_moe_block": True,
        "num_experts": 128,
        "top_k_experts": 8,
        "moe_intermediate_size": 704,
        "num_hidden_layers": 30,
        "layer_types": _pattern(5, 5),
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_global_key_value_heads": 2,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "hidden_size_per_layer_input": 0,
        "max_position_embeddings": 262144,
    },
    "31B": {
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_hidden_layers": 60,
        "layer_types": _pattern(5, 10),
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "num_global_key_value_heads": 4,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "hidden_size_per_layer_input": 0,
        "max_position_embeddings": 262144,
    },
}


def variant_raw(name: str) -> dict[str, Any]:
    """The text_config dict of a released variant (a fresh copy)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown Gemma 4 variant {name!r}: choose from {', '.join(VARIANTS)}")
    return {**_COMMON, **VARIANTS[name], "layer_types": list(VARIANTS[name]["layer_types"])}


def variant_config(name: str) -> TextConfig:
    """The TextConfig the model builds from that variant's config.json."""
    return parse_config(variant_raw(name), source=f"Gemma 4 {name} text config").text
