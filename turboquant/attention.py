"""Attention over a TurboQuant cache, block by block with an online softmax.

Queries are rotated once (<R q, R k> = <q, k>), compressed keys are decoded one block of tokens
at a time in the rotated domain, and values are accumulated in the rotated domain and rotated back
once at the end. The exact tokens (the sink and each query's recent window) are attended in the
original domain with their own accumulator that shares the running max and sum. Peak extra memory is one block of decoded
keys/values and one block of scores, whatever the context length: never a full-precision copy
of the cache, never the full query x key score matrix.

Masks come from positions: the queries are the last L tokens of the cache; keys are visible if
causal (k <= q) and, for a sliding window w, q - k < w. An explicit array mask (..., L, offset)
from mlx-lm is applied on top, sliced per block.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from turboquant.codec import decode_rotated, rotate, unrotate

SCORE_BUDGET = 1 << 22  # floats in one block of scores (16 MiB in float32)
KV_BUDGET = 1 << 22  # floats in one block of decoded keys (and as many values)


def _block_tokens(rows: int, kv_rows: int, dim: int) -> int:
    by_scores = SCORE_BUDGET // max(rows, 1)
    by_kv = KV_BUDGET // max(kv_rows * dim, 1)
    return max(64, min(by_scores, by_kv) // 64 * 64)


def _visible(q_pos: mx.array, k_pos: mx.array, window: int | None) -> mx.array:
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok = ok & (q_pos[:, None] - k_pos[None, :] < window)
    return ok  # (L, T)


def attention(
    queries: mx.array,  # (B, n_q_heads, L, D)
    view: Any,  # CompressedView
    scale: float,
    mask: Any = None,
) -> mx.array:  # (B, n_q_heads, L, D), dtype of queries
    cache = view.cache
    window = cache.window
    offset = view.offset
    B, n_q, L, D = queries.shape
    n_kv = cache.n_kv_heads
    groups = n_q // n_kv
    kspec, vspec = cache.key_spec, cache.value_spec
    out_dtype = queries.dtype

    # (B, n_kv, groups * L, D): every query head of a group against its kv head
    q = (
        (queries.astype(mx.float32) * scale)
        .reshape(B, n_kv, groups, L, D)
        .reshape(B, n_kv, groups * L, D)
    )
    q_rot = rotate(cache.key_domain(q), kspec)  # key tiers: each head's channel order first
    # compressed tokens were centred before encoding: their means, in the rotated domain
    k_means = None if cache.key_mean is None else rotate(cache.key_domain(cache.key_mean), kspec)
    v_means = None if cache.value_mean is None else rotate(cache.value_mean, vspec)

    def mean_weights(start: int, stop: int) -> tuple[mx.array, mx.array, mx.array]:
        """How compressed tokens [start, stop) read their centring means: (token -> mean one-hot
        (T, blocks), the keys' and values' rotated means of those blocks (B, n_kv, blocks, D))."""
        first, last = cache.block_of(start), cache.block_of(stop - 1)
        if first == last:
            onehot = mx.ones((stop - start, 1), dtype=mx.float32)
        else:
            index = (mx.arange(start, stop) - n_sink) // cache.center_block - first
            onehot = (index[:, None] == mx.arange(last + 1 - first)[None, :]).astype(mx.float32)
        return onehot, k_means[:, :, first : last + 1], v_means[:, :, first : last + 1]

    q_pos = mx.arange(offset - L, offset)
    # query t reads key j exactly for j >= boundary(t) (its recent window, where this call holds
    # exact copies) and compressed below it; the sink (j < n_sink) is always exact
    n_sink = 0 if view.sink_keys is None else view.sink_keys.shape[2]
    # (before sink + center tokens, whose mean centres the codes, everything is exact)
    boundary = mx.maximum(q_pos - cache.fp_window, view.fp_start)
    boundary = mx.where(q_pos < cache.sink + cache.center, view.fp_start, boundary)[:, None]
    array_mask = mask if isinstance(mask, mx.array) else None

    if array_mask is not None and array_mask.ndim != 2:
        raise NotImplementedError("TurboQuant attention takes (L, keys) array masks only")

    def block_mask(k_pos: mx.array, ok: mx.array) -> mx.array:
        ok = ok & _visible(q_pos, k_pos, window)  # (L, T)
        if array_mask is not None:
            extra = array_mask[:, k_pos]
            ok = ok & (extra if extra.dtype == mx.bool_ else extra > -1e30)
        return mx.tile(ok, (groups, 1))  # rows are (group, query) pairs: (groups * L, T)

    m = mx.full((B, n_kv, groups * L, 1), -mx.inf, dtype=mx.float32)
    denom = mx.zeros((B, n_kv, groups * L, 1), dtype=mx.float32)
    acc_rot = mx.zeros((B, n_kv, groups * L, D), dtype=mx.float32)  # rotated value domain
    acc_fp = mx.zeros((B, n_kv, groups * L, D), dtype=mx.float32)  # exact tokens, original domain

    def online(scores, visible):
        nonlocal m, denom, acc_rot, acc_fp
        scores = mx.where(visible, scores, -mx.inf)
        new_m = mx.maximum(m, mx.max(scores, axis=-1, keepdims=True))
        safe_m = mx.where(mx.isinf(new_m), 0.0, new_m)  # rows that saw nothing visible yet
        correction = mx.exp(m - safe_m)
        p = mx.exp(scores - safe_m)
        denom = denom * correction + mx.sum(p, axis=-1, keepdims=True)
        acc_rot, acc_fp = acc_rot * correction, acc_fp * correction
        m = new_m
        return p

    # compressed tokens: positions [n_sink, end), storage index = position - n_sink; no query
    # reads a compressed key at or beyond its boundary
    end = min(cache.n_quantized, max(view.fp_start, offset - 1 - cache.fp_window))
    first_visible = n_sink if window is None else max(n_sink, offset - L - window + 1)
    rows = groups * L  # query rows per kv head
    step = _block_tokens(rows * B * n_kv, B * n_kv, D)
    start = n_sink + (first_visible - n_sink) // step * step
    while start < end:
        stop = min(start + step, end)
        k_enc, v_enc = cache.compressed_block(start - n_sink, stop - n_sink)
        k_dec, v_dec = decode_rotated(k_enc, kspec), decode_rotated(v_enc, vspec)  # (B,n_kv,T,D)
        # The means (a few per block) go in through the scores and the softmax weights when
        # there are few query rows (decode: no (T, D) array of per-token means); with many
        # (prefill) adding them to the decoded keys and values costs less.
        through_scores = False
        if k_means is not None:
            onehot, k_mean, v_mean = mean_weights(start, stop)
            through_scores = rows * onehot.shape[1] < D
            if not through_scores:
                if onehot.shape[1] > 1:
                    k_mean, v_mean = onehot @ k_mean, onehot @ v_mean
                k_dec, v_dec = k_dec + k_mean, v_dec + v_mean
        scores = q_rot @ k_dec.swapaxes(-1, -2)  # (B, n_kv, rows, T)
        if through_scores:
            scores = scores + (q_rot @ k_mean.swapaxes(-1, -2)) @ onehot.T
        k_pos = mx.arange(start, stop)
        p = online(scores, block_mask(k_pos, k_pos[None, :] < boundary))
        acc_rot = acc_rot + p @ v_dec
        if through_scores:
            acc_rot = acc_rot + (p @ onehot) @ v_mean
        # Evaluate block by block: a lazy graph over all blocks could hold every block's
        # decoded keys/values at once, which is exactly the transient this kernel avoids.
        mx.eval(m, denom, acc_rot, acc_fp)
        start = stop

    # exact tokens: the sink and this call's recent window
    exact_k, exact_v, positions = [], [], []
    if n_sink:
        exact_k.append(view.sink_keys)
        exact_v.append(view.sink_values)
        positions.append(mx.arange(0, n_sink))
    n_fp = offset - view.fp_start
    if n_fp > 0:
        exact_k.append(view.fp_keys[:, :, :n_fp])
        exact_v.append(view.fp_values[:, :, :n_fp])
        positions.append(mx.arange(view.fp_start, offset))
    if exact_k:
        fp_k = mx.concatenate(exact_k, axis=2).astype(mx.float32)
        fp_v = mx.concatenate(exact_v, axis=2).astype(mx.float32)
        k_pos = mx.concatenate(positions)
        ok = (k_pos[None, :] < n_sink) | (k_pos[None, :] >= boundary)
        p = online(q @ fp_k.swapaxes(-1, -2), block_mask(k_pos, ok))
        acc_fp = acc_fp + p @ fp_v

    out = (unrotate(acc_rot, vspec) + acc_fp) / mx.maximum(denom, 1e-30)
    return out.reshape(B, n_kv, groups, L, D).reshape(B, n_q, L, D).astype(out_dtype)
