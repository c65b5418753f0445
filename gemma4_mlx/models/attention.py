"""The one place where attention is dispatched on what the cache returned.

``keys`` / ``values`` are whatever ``cache.update_and_fetch`` returned (for a KV-shared consumer,
what its producer's cache returned): plain arrays, mlx-lm's quantized tuples (QuantizedKVCache),
or compressed stream views (TurboQuant caches), never dequantized as a whole.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from turboquant.attention import attention as turboquant_attention
from turboquant.stream import StreamView


def attend(
    queries: mx.array,  # (B, n_heads, L, D)
    keys: Any,
    values: Any,
    *,
    scale: float,
    mask: Any = None,
    cache: Any = None,
) -> mx.array:  # (B, n_heads, L, D)
    if isinstance(keys, StreamView):  # TurboQuant: blockwise over the codes
        return turboquant_attention(queries, keys, values, scale=scale, mask=mask)
    # mlx-lm affine-quantized keys: (packed, scales, biases); a list once mlx-lm's
    # load_prompt_cache has restored the cache
    if isinstance(keys, (tuple, list)):
        return quantized_scaled_dot_product_attention(
            queries,
            keys,
            values,
            scale=scale,
            mask=mask,
            group_size=cache.group_size,
            bits=cache.bits,
        )
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
