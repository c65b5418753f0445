"""The one place where attention is dispatched on what the cache returned.

``keys`` / ``values`` are whatever ``cache.update_and_fetch`` returned (for a KV-shared consumer,
what its producer's cache returned): plain arrays, mlx-lm's quantized tuples (QuantizedKVCache),
or compressed stream views (TurboQuant caches), never dequantized as a whole. Exact keys and
values are read as the cache's ``attention`` says (``KVPolicy.attention``): mlx-lm's
``mx.fast.scaled_dot_product_attention`` (``sdpa``, the default) or ``grouped_attention``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from turboquant.attention import attention as turboquant_attention
from turboquant.stream import StreamView


def grouped_attention(
    queries: mx.array,  # (B, n_heads, L, D)
    keys: mx.array,  # (B, n_kv_heads, T, D): the last L are the queries' own positions
    values: mx.array,
    *,
    scale: float,
    mask: Any = None,  # None, "causal" or a boolean / additive array broadcasting to (L, T)
) -> mx.array:  # (B, n_heads, L, D)
    """Exact attention with the query heads of each kv head as the rows of one matmul.

    On the CPU, ``mx.fast.scaled_dot_product_attention`` runs grouped-query decode as one
    matrix-vector product per query head, each reading all of its kv head's K and V; one
    (heads x L, D) @ (D, T) product reads them once (benchmarks/attention.py measures both).
    """
    B, n_q, L, D = queries.shape
    n_kv, T = keys.shape[1], keys.shape[2]
    groups = n_q // n_kv
    q = (queries * scale).reshape(B, n_kv, groups * L, D)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(B, n_kv, groups, L, T)
    if isinstance(mask, str):  # "causal": the queries are the last L positions
        q_pos = mx.arange(T - L, T)[:, None]
        mask = mx.arange(T)[None, :] <= q_pos
    if mask is not None:
        if mask.ndim == 4:  # (B or 1, n_heads or 1, L, T)
            mask = mask.reshape(mask.shape[0], -1, 1, L, T) if mask.shape[1] == 1 else (
                mask.reshape(mask.shape[0], n_kv, groups, L, T)
            )  # fmt: skip
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True).reshape(B, n_kv, groups * L, T)
    return (weights @ values).reshape(B, n_q, L, D)


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
    form = getattr(cache, "attention", "sdpa")  # KVPolicy.attention, set by make_layer_cache
    if form == "auto":  # the fused kernel on a GPU; on the CPU MLX's SDPA is per query head
        form = "sdpa" if mx.default_device() == mx.gpu else "grouped"
    if form == "grouped":
        return grouped_attention(queries, keys, values, scale=scale, mask=mask)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
