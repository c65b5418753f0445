"""Attention over compressed key and value streams, block by block with an online softmax.

Which copy a query at position t reads for key j (``Layout``; the same in a chunked prefill and
in token-by-token decode, so results do not depend on how a prompt is split):

- j < n_sink: exact (the first tokens, where Gemma parks most of its attention mass);
- t - fp_window <= j <= t: exact (the query's most recent tokens and itself);
- anything older: compressed, even while the stream still holds its exact copy for rewinds;
- t < sink + center: everything exact (the mean the codes refer to is not known yet).

Queries are rotated once (<R q, R k> = <q, k>), compressed keys are decoded one block of tokens
at a time in the rotated domain, and values are accumulated in the rotated domain and rotated back
once at the end. The exact tokens are attended in the original domain with their own accumulator
that shares the running max and sum. The graph is built lazily (no evaluation inside the forward
pass); each block's decoded keys/values and scores are freed as soon as the accumulators have
consumed them, so the transient is bounded by the block size (SCORE_BUDGET, KV_BUDGET), never a
full-precision copy of the cache or the full query x key score matrix.

Masks come from positions: the queries are the last L tokens; keys are visible if causal (k <= q)
and, for a sliding window w, q - k < w. An explicit (L, offset) array mask is applied on top.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx

from turboquant.codec import Encoded, decode_rotated, rotate, unrotate
from turboquant.stream import StreamView

SCORE_BUDGET = 1 << 22  # floats in one block of scores (16 MiB in float32)
KV_BUDGET = 1 << 22  # floats in one block of decoded keys (and as many values)


class Softmax(NamedTuple):
    """Online-softmax state per query row: running max, sum, and value accumulators (rotated
    value domain for compressed tokens, the original one for exact tokens)."""

    m: mx.array  # (B, n_kv, rows, 1)
    denom: mx.array  # (B, n_kv, rows, 1)
    acc_rot: mx.array  # (B, n_kv, rows, D)
    acc_exact: mx.array  # (B, n_kv, rows, D)


def softmax_step(s: Softmax, scores: mx.array, visible: mx.array) -> tuple[Softmax, mx.array]:
    """Fold one block of scores (B, n_kv, rows, T) in: the rescaled state and the block's
    unnormalised weights p; the caller adds p @ values to one accumulator."""
    scores = mx.where(visible, scores, -mx.inf)
    m = mx.maximum(s.m, mx.max(scores, axis=-1, keepdims=True))
    safe_m = mx.where(mx.isinf(m), 0.0, m)  # rows that saw nothing visible yet
    correction = mx.exp(s.m - safe_m)
    p = mx.exp(scores - safe_m)
    denom = s.denom * correction + mx.sum(p, axis=-1, keepdims=True)
    return Softmax(m, denom, s.acc_rot * correction, s.acc_exact * correction), p


def _block_tokens(rows: int, kv_rows: int, dim: int) -> int:
    by_scores = SCORE_BUDGET // max(rows, 1)
    by_kv = KV_BUDGET // max(kv_rows * dim, 1)
    return max(64, min(by_scores, by_kv) // 64 * 64)


class _Queries(NamedTuple):
    """The queries of one call, grouped per kv head, and what decides what they see."""

    q: mx.array  # (B, n_kv, groups * L, D), scaled, float32
    pos: mx.array  # (L,) positions
    exact_from: mx.array  # (L, 1) first position each query reads exact (besides the sink)
    groups: int
    sliding_window: int | None
    mask: mx.array | None  # (L, offset) extra array mask

    def visible(self, k_pos: mx.array, ok: mx.array) -> mx.array:
        """(groups * L, T): ``ok`` (L, T) and causal, in the window, and the array mask."""
        ok = ok & (k_pos[None, :] <= self.pos[:, None])
        if self.sliding_window is not None:
            ok = ok & (self.pos[:, None] - k_pos[None, :] < self.sliding_window)
        if self.mask is not None:
            extra = self.mask[:, k_pos]
            ok = ok & (extra if extra.dtype == mx.bool_ else extra > -1e30)
        return mx.tile(ok, (self.groups, 1))  # rows are (group, query) pairs


def _mean_onehot(layout, n_sink: int, start: int, stop: int) -> tuple[mx.array, int, int]:
    """Which block mean tokens [start, stop) were centred on: one-hot (T, blocks), blocks."""
    first, last = layout.block_of(start), layout.block_of(stop - 1)
    if first == last:
        return mx.ones((stop - start, 1), dtype=mx.float32), first, last + 1
    index = (mx.arange(start, stop) - n_sink) // layout.center_block - first
    onehot = (index[:, None] == mx.arange(last + 1 - first)[None, :]).astype(mx.float32)
    return onehot, first, last + 1


def _after(enc: Encoded, s: Softmax) -> Encoded:
    """``enc`` made to wait for the blocks before it (their accumulated values), so that the
    lazily built graph decodes one block at a time: the transient stays one block, as with an
    evaluation per block, without a sync in the forward pass."""
    arrays = mx.depends(enc.arrays(), [s.acc_rot, s.acc_exact, s.denom])
    n = len(enc.codes)
    extra = arrays[n + 1 :] if enc.signs is not None else (None, None)
    return Encoded(tuple(arrays[:n]), arrays[n], *extra)


def _compressed_block(s: Softmax, qs: _Queries, q_rot, keys, values, means, start, stop):
    """Fold compressed tokens [start, stop) in. ``means``: the rotated key and value means."""
    k_dec = decode_rotated(_after(keys.block(start, stop), s), keys.spec)  # (B, n_kv, T, D)
    v_dec = decode_rotated(_after(values.block(start, stop), s), values.spec)
    through_scores = False
    if means is not None:
        # With few query rows (decode) the means enter through the scores and the softmax
        # weights (no (T, D) array of per-token means); with many (prefill) adding them to the
        # decoded keys and values costs less.
        onehot, a, b = _mean_onehot(keys.layout, keys.n_sink, start, stop)
        k_mean, v_mean = means[0][:, :, a:b], means[1][:, :, a:b]
        through_scores = q_rot.shape[2] * onehot.shape[1] < q_rot.shape[3]
        if not through_scores:
            if onehot.shape[1] > 1:
                k_mean, v_mean = onehot @ k_mean, onehot @ v_mean
            k_dec, v_dec = k_dec + k_mean, v_dec + v_mean
    scores = q_rot @ k_dec.swapaxes(-1, -2)  # (B, n_kv, rows, T)
    if through_scores:
        scores = scores + (q_rot @ k_mean.swapaxes(-1, -2)) @ onehot.T
    k_pos = mx.arange(start, stop)
    s, p = softmax_step(s, scores, qs.visible(k_pos, k_pos[None, :] < qs.exact_from))
    acc = s.acc_rot + p @ v_dec
    if through_scores:
        acc = acc + (p @ onehot) @ v_mean
    return s._replace(acc_rot=acc)


def _attend_compressed(s: Softmax, qs: _Queries, keys: StreamView, values: StreamView) -> Softmax:
    """Every compressed token some query reads, in blocks of bounded size."""
    layout, offset, n_sink = keys.layout, keys.offset, keys.n_sink
    if offset - 1 < layout.sink + layout.center:
        return s  # no query reads anything compressed yet
    end = min(keys.n_quantized, offset - 1 - layout.fp_window)  # the newest query's reads
    L = qs.pos.shape[0]
    first = n_sink
    if qs.sliding_window is not None:
        first = max(n_sink, offset - L - qs.sliding_window + 1)
    if end <= first:
        return s
    q_rot = rotate(keys.to_code_order(qs.q), keys.spec)  # key tiers: each head's order first
    means = None
    if keys.means is not None:  # compressed tokens were centred: their means, rotated
        means = (
            rotate(keys.to_code_order(keys.means), keys.spec),
            rotate(values.to_code_order(values.means), values.spec),
        )
    B, n_kv, rows, D = qs.q.shape
    step = _block_tokens(rows * B * n_kv, B * n_kv, D)
    start = n_sink + (first - n_sink) // step * step
    while start < end:
        stop = min(start + step, end)
        s = _compressed_block(s, qs, q_rot, keys, values, means, start, stop)
        start = stop
    return s


def _attend_exact(s: Softmax, qs: _Queries, keys: StreamView, values: StreamView) -> Softmax:
    """The sink and the exact tail from the oldest position any query reads exact."""
    parts_k, parts_v, positions = [], [], []
    if keys.n_sink:
        parts_k.append(keys.sink)
        parts_v.append(values.sink)
        positions.append(mx.arange(0, keys.n_sink))
    oldest = max(keys.tail_start, keys.layout.first_exact(keys.offset - qs.pos.shape[0]))
    if keys.offset > oldest:
        parts_k.append(keys.tail[:, :, oldest - keys.tail_start :])
        parts_v.append(values.tail[:, :, oldest - keys.tail_start :])
        positions.append(mx.arange(oldest, keys.offset))
    if not parts_k:
        return s
    k = mx.concatenate(parts_k, axis=2).astype(mx.float32)
    v = mx.concatenate(parts_v, axis=2).astype(mx.float32)
    k_pos = mx.concatenate(positions)
    ok = (k_pos[None, :] < keys.n_sink) | (k_pos[None, :] >= qs.exact_from)
    s, p = softmax_step(s, qs.q @ k.swapaxes(-1, -2), qs.visible(k_pos, ok))
    return s._replace(acc_exact=s.acc_exact + p @ v)


def attention(
    queries: mx.array,  # (B, n_q_heads, L, D): the last L positions
    keys: StreamView,
    values: StreamView,
    scale: float,
    mask: Any = None,  # None / "causal" (positions decide) or an (L, offset) array
    sliding_window: int | None = None,
) -> mx.array:  # (B, n_q_heads, L, D), dtype of queries
    B, n_q, L, D = queries.shape
    n_kv = keys.shape[1]
    array_mask = mask if isinstance(mask, mx.array) else None
    if array_mask is not None and array_mask.ndim != 2:
        raise NotImplementedError("TurboQuant attention takes (L, keys) array masks only")
    q = (queries.astype(mx.float32) * scale).reshape(B, n_kv, (n_q // n_kv) * L, D)
    pos = mx.arange(keys.offset - L, keys.offset)
    exact_from = keys.layout.exact_from(pos)[:, None]
    qs = _Queries(q, pos, exact_from, n_q // n_kv, sliding_window, array_mask)
    rows = (B, n_kv, q.shape[2])
    s = Softmax(
        mx.full((*rows, 1), -mx.inf, dtype=mx.float32),
        mx.zeros((*rows, 1), dtype=mx.float32),
        mx.zeros((*rows, D), dtype=mx.float32),
        mx.zeros((*rows, D), dtype=mx.float32),
    )
    s = _attend_compressed(s, qs, keys, values)
    s = _attend_exact(s, qs, keys, values)
    acc_rot = values.to_code_order(unrotate(s.acc_rot, values.spec), inverse=True)
    out = (acc_rot + s.acc_exact) / mx.maximum(s.denom, 1e-30)
    return out.reshape(B, n_kv, n_q // n_kv, L, D).reshape(B, n_q, L, D).astype(queries.dtype)
