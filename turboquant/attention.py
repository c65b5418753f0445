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

Uniform-grid codes (``CodecSpec.qmm_ready``) are read in place instead of decoded: the codes of
one codebook group are MLX affine codes, so for key group g (bits b, step Δ, centre c = (2^b-1)/2,
block norm n_t per token) <R q, k_t>_g = n_t Δ Σ_j q_j (code_tj - c) is
``mx.quantized_matmul(Δ q_g, codes_g, scales=n, biases=-c n)``: the stored norms are the scales
(tier-major storage: a contiguous slice), the step is folded into the query and the zero point
into the bias. The centring means enter through the scores (q . mean per block) and the softmax
weights (Σ p per block @ the value means); the values are one quantized matmul per group
(``transpose=False``) times its step, rotated back once. For a decode step the whole storage is
one block (slots past the live codes are masked), so no code is copied; prefill chunks go block
by block as above. On the CPU, MLX's quantized matmul unpacks the codes once per query row, so
calls with many query rows (prefill) dequantize each block with ``mx.dequantize`` and use
BLAS instead (``QMM_MAX_ROWS``); on a GPU the quantized kernels take every call.

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
# CPU: query rows per kv head up to which quantized matmuls beat dequantize + BLAS (measured in
# benchmarks/attention.py: MLX's x86 qmm is scalar and unpacks once per row)
QMM_MAX_ROWS = 16
READS = ("auto", "qmm", "dequant", "decode")  # how compressed uniform-grid codes are read


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


def _compressed_reads(qs: _Queries, keys: StreamView, values: StreamView):
    """(first, end, rotated queries, rotated means or None): the stored compressed tokens
    [first, end) that some query of this call reads, or None when none does."""
    layout, offset, n_sink = keys.layout, keys.offset, keys.n_sink
    if offset - 1 < layout.sink + layout.center:
        return None  # no query reads anything compressed yet
    end = min(keys.n_quantized, offset - 1 - layout.fp_window)  # the newest query's reads
    first = n_sink
    if qs.sliding_window is not None:
        first = max(n_sink, offset - qs.pos.shape[0] - qs.sliding_window + 1)
    if end <= first:
        return None
    q_rot = rotate(keys.to_code_order(qs.q), keys.spec)  # key tiers: each head's order first
    means = None
    if keys.means is not None:  # compressed tokens were centred: their means, rotated
        means = (
            rotate(keys.to_code_order(keys.means), keys.spec),
            rotate(values.to_code_order(values.means), values.spec),
        )
    return first, end, q_rot, means


def _attend_compressed(s: Softmax, qs: _Queries, keys: StreamView, values: StreamView) -> Softmax:
    """Every compressed token some query reads, in blocks of bounded size."""
    reads = _compressed_reads(qs, keys, values)
    if reads is None:
        return s
    first, end, q_rot, means = reads
    n_sink = keys.n_sink
    B, n_kv, rows, D = qs.q.shape
    step = _block_tokens(rows * B * n_kv, B * n_kv, D)
    start = n_sink + (first - n_sink) // step * step
    while start < end:
        stop = min(start + step, end)
        s = _compressed_block(s, qs, q_rot, keys, values, means, start, stop)
        start = stop
    return s


class _GroupRead(NamedTuple):
    """One codebook group of a uniform-grid stream, as quantized-matmul arguments."""

    first: int  # first rotated channel
    count: int  # channels (the qmm group size)
    bits: int
    step: float
    block: int  # index of its block (norm)


def _group_reads(view: StreamView) -> list[_GroupRead]:
    spec = view.spec
    return [
        _GroupRead(first, count, int(bits), step, block)
        for (first, count, bits), (block, _), step in zip(
            spec.groups, spec.group_block, spec.group_steps
        )
    ]


def _affine(view: StreamView, groups: list[_GroupRead], a: int, b: int, s, fold_step: bool):
    """Storage slots [a, b) of every group: (codes, scales, biases) for quantized_matmul or
    dequantize: the scales the block norms (B, H, T, 1) float32 (times the group's step if
    ``fold_step``), the biases -centre x scale. ``s``: made to wait for those accumulators
    (blockwise prefill: one block's transient at a time)."""
    whole = a == 0 and b == view.capacity
    codes = [c if whole else c[:, :, a:b] for c in view.codes.codes]
    norms = view.codes.norms if whole else view.codes.norms[..., a:b]  # (blocks, B, H, T)
    if s is not None:
        *codes, norms = mx.depends([*codes, norms], [s.acc_rot, s.acc_exact, s.denom])
    norms = norms.astype(mx.float32)[..., None]
    out = []
    for code, g in zip(codes, groups):
        scale = norms[g.block] * g.step if fold_step else norms[g.block]
        out.append((code, scale, scale * -((2**g.bits - 1) / 2)))
    return out


def _per_block(x: mx.array, layout, a: int, b: int, axis: int = -1) -> mx.array:
    """Per-mean values along ``axis`` (one per block of center_block slots) -> one per storage
    slot of [a, b) (slot i: mean i // center_block); no blocks: the one mean (size 1)."""
    x = mx.moveaxis(x, axis, -1)
    if not layout.center_block:
        return mx.moveaxis(x[..., :1], -1, axis)
    size = layout.center_block
    lo, hi = a // size, (b - 1) // size + 1
    if hi > x.shape[-1]:  # storage slots past the live codes (masked): no mean yet
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, hi - x.shape[-1])])
    x = mx.broadcast_to(x[..., lo:hi, None], (*x.shape[:-1], hi - lo, size))
    x = x.reshape(*x.shape[:-2], (hi - lo) * size)
    return mx.moveaxis(x[..., a - lo * size : b - lo * size], -1, axis)


def _block_sums(p: mx.array, layout, a: int, b: int) -> tuple[mx.array, int]:
    """(..., T) weights of slots [a, b) -> (..., means) their sums per mean, first mean index."""
    if not layout.center_block:
        return mx.sum(p, axis=-1, keepdims=True), 0
    size = layout.center_block
    lo, hi = a // size, (b - 1) // size + 1
    pad_lo, pad_hi = a - lo * size, hi * size - b
    if pad_lo or pad_hi:
        p = mx.pad(p, [(0, 0)] * (p.ndim - 1) + [(pad_lo, pad_hi)])
    return mx.sum(p.reshape(*p.shape[:-1], hi - lo, size), axis=-1), lo


def _dequantized(args, groups: list[_GroupRead]) -> mx.array:
    """(B, H, T, D) float rotated vectors from ``_affine(..., fold_step=True)``."""
    parts = [
        mx.dequantize(code, scale, bias, group_size=g.count, bits=g.bits)
        for g, (code, scale, bias) in zip(groups, args)
    ]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def _qmm_block(s, qs, q_rot, keys, values, means, a, b, read, wait):
    """Fold storage slots [a, b) (positions n_sink + a ...) in, reading the codes in place
    (``qmm``) or dequantized to floats (``dequant``: the means then join the vectors)."""
    kg, vg = _group_reads(keys), _group_reads(values)
    dequant = read == "dequant"
    k_args = _affine(keys, kg, a, b, s if wait else None, dequant)
    v_args = _affine(values, vg, a, b, s if wait else None, dequant)
    if dequant:
        k_dec, v_dec = _dequantized(k_args, kg), _dequantized(v_args, vg)
        if means is not None:
            k_dec = k_dec + _per_block(means[0], keys.layout, a, b, axis=-2)
            v_dec = v_dec + _per_block(means[1], values.layout, a, b, axis=-2)
        scores = q_rot @ k_dec.swapaxes(-1, -2)  # (B, n_kv, rows, T)
    else:
        scores = None
        for g, (code, scale, bias) in zip(kg, k_args):
            x = q_rot[..., g.first : g.first + g.count] * g.step
            part = mx.quantized_matmul(
                x, code, scale, bias, transpose=True, group_size=g.count, bits=g.bits
            )
            scores = part if scores is None else scores + part
        if means is not None:  # q . (the mean its slot was centred on)
            scores = scores + _per_block(q_rot @ means[0].swapaxes(-1, -2), keys.layout, a, b)
    k_pos = keys.n_sink + mx.arange(a, b)
    ok = (k_pos[None, :] < qs.exact_from) & (k_pos[None, :] < keys.n_quantized)
    s, p = softmax_step(s, scores, qs.visible(k_pos, ok))
    if dequant:
        return s._replace(acc_rot=s.acc_rot + p @ v_dec)
    parts = [
        mx.quantized_matmul(p, code, scale, bias, transpose=False, group_size=g.count, bits=g.bits)
        * g.step
        for g, (code, scale, bias) in zip(vg, v_args)
    ]
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    if means is not None:
        sums, lo = _block_sums(p, values.layout, a, b)
        v_means = means[1][:, :, lo : lo + sums.shape[-1]]
        out = out + sums[..., : v_means.shape[2]] @ v_means  # past the means: masked, p = 0
    return s._replace(acc_rot=s.acc_rot + out)


def _attend_compressed_qmm(
    s: Softmax, qs: _Queries, keys: StreamView, values: StreamView, read: str
) -> Softmax:
    """``_attend_compressed`` for uniform-grid codes read in place (see the module docstring)."""
    reads = _compressed_reads(qs, keys, values)
    if reads is None:
        return s
    first, end, q_rot, means = reads
    n_sink = keys.n_sink
    B, n_kv, rows, D = qs.q.shape
    if read == "auto":
        on_gpu = mx.default_device() == mx.gpu
        read = "qmm" if on_gpu or rows <= QMM_MAX_ROWS else "dequant"
    capacity = keys.capacity
    if capacity * rows * B * n_kv <= SCORE_BUDGET:  # one block over all storage: no copies
        return _qmm_block(s, qs, q_rot, keys, values, means, 0, capacity, read, False)
    step = _block_tokens(rows * B * n_kv, B * n_kv, D)
    a, stop = (first - n_sink) // step * step, end - n_sink
    while a < stop:
        b = min(a + step, stop)
        s = _qmm_block(s, qs, q_rot, keys, values, means, a, b, read, True)
        a = b
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
    read: str = "auto",
) -> mx.array:  # (B, n_q_heads, L, D), dtype of queries
    """``read``: how uniform-grid codes are read: ``qmm`` (quantized matmuls), ``dequant``
    (``mx.dequantize`` a block, then BLAS), ``decode`` (the Lloyd-Max path: unpack, look up,
    matmul; the reference the others are tested against), ``auto`` (qmm on a GPU; on the CPU
    qmm up to QMM_MAX_ROWS query rows per kv head, else dequant). Lloyd-Max codes and groups
    qmm cannot take (``CodecSpec.qmm_ready``) are always decoded."""
    if read not in READS:
        raise ValueError(f"read must be one of {', '.join(READS)}, got {read!r}")
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
    if read != "decode" and keys.spec.qmm_ready and values.spec.qmm_ready:
        s = _attend_compressed_qmm(s, qs, keys, values, read)
    else:
        s = _attend_compressed(s, qs, keys, values)
    s = _attend_exact(s, qs, keys, values)
    acc_rot = values.to_code_order(unrotate(s.acc_rot, values.spec), inverse=True)
    out = (acc_rot + s.acc_exact) / mx.maximum(s.denom, 1e-30)
    return out.reshape(B, n_kv, n_q // n_kv, L, D).reshape(B, n_q, L, D).astype(queries.dtype)
