"""The cache plan: which KV cache each decoder layer gets.

One function decides it for every variant: global (full-attention) layers get a growing cache,
sliding layers a ring buffer of ``sliding_window`` tokens, and KV-shared consumer layers nothing
(they read their producer's keys/values). The list has one entry per cache-owning layer, in layer
order; consumers always come last in Gemma 4, so mlx-lm's generate_step sees a plain list.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import KVCache, RotatingKVCache

from gemma4_mlx.config import LayerSpec, TextConfig


def cache_layers(config: TextConfig) -> list[LayerSpec]:
    """The layers that own a cache (all but KV-shared consumers), in order."""
    return [spec for spec in config.layers if not spec.is_kv_shared]


def make_layer_cache(config: TextConfig, spec: LayerSpec, policy: Any = None) -> Any:
    if spec.is_sliding:
        return RotatingKVCache(max_size=config.sliding_window, keep=0)
    return KVCache()


def make_cache(config: Any, policy: Any = None) -> list[Any]:
    """One cache per cache-owning layer. ``config`` is a TextConfig or a model with ``.config``."""
    if not isinstance(config, TextConfig):
        config = config.config
    return [make_layer_cache(config, spec, policy) for spec in cache_layers(config)]
