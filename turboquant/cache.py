"""Prompt-cache files for our caches (moving to gemma4_mlx with the policy-bound files).

The cache classes themselves follow mlx-lm's protocol and live in ``gemma4_mlx.kv.cache``; the
tensors-in/tensors-out pieces are ``turboquant.stream`` and ``turboquant.attention``. These two
functions import mlx-lm and gemma4_mlx only when called.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from turboquant.tiers import plan_tiers, tier_sizes, tiers_fit

__all__ = ["load_prompt_cache", "plan_tiers", "save_prompt_cache", "tier_sizes", "tiers_fit"]


def save_prompt_cache(path: str, cache: list[Any], metadata: dict[str, str] | None = None) -> None:
    """mlx-lm's format; our caches' state is a nested dict it already serialises."""
    from mlx_lm.models import cache as mlx_cache

    mlx_cache.save_prompt_cache(path, cache, metadata)


def load_prompt_cache(path: str, return_metadata: bool = False):
    """mlx-lm's loader, but resolving our cache classes as well as mlx-lm's."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models import cache as mlx_cache

    from gemma4_mlx.kv.cache import SlidingKVCache, TurboQuantKVCache

    arrays, meta = mx.load(path, return_metadata=True)
    meta = tree_unflatten(list(meta.items()))
    metadata, classes, scalars = meta
    for pos, kind in scalars[1:]:
        a = arrays[pos]
        if kind == "scalar":
            arrays[pos] = a.item()
        elif kind == "string":
            arrays[pos] = "".join(chr(i) for i in a.tolist())
        else:
            arrays[pos] = None
    states = tree_unflatten(list(arrays.items()))
    registry = {cls.__name__: cls for cls in (SlidingKVCache, TurboQuantKVCache)}
    cache = []
    for name, state in zip(classes, states):
        cls = registry.get(name) or getattr(mlx_cache, name)
        cache.append(cls.from_state(state))
    return (cache, metadata) if return_metadata else cache
