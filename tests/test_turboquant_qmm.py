"""Uniform-grid codes read in place by mx.quantized_matmul (or dequantized per block) give the
attention of the float dequantized reference, for every tier plan, GQA ratio, window and block."""

import mlx.core as mx
import numpy as np
import pytest
from test_turboquant_cache import _rand, _reference

from turboquant import attention as tq_attention
from turboquant.codec import CodecSpec
from turboquant.stream import CompressedStream, Layout

TOL = 1e-4  # relative: the zero point cancels in float32 (MLX's own qmv has the same error)


def _rel(out: mx.array, ref: mx.array) -> float:
    return float(mx.abs(out - ref).max() / mx.abs(ref).max())


class _Cache:
    """The two streams and a layout, as the reference in test_turboquant_cache reads them."""

    def __init__(self, D, key_bits, value_bits, layout, key_tiers):
        self.layout = layout
        self.keys = CompressedStream(CodecSpec(D, key_bits, grid="uniform"), layout, key_tiers)
        self.values = CompressedStream(CodecSpec(D, value_bits, grid="uniform"), layout)


@pytest.mark.parametrize(
    "D, key_bits, value_bits, key_tiers",
    [
        (64, 4, 3, 0),  # one 64-channel group each
        (64, 3.5, 2.5, 2),  # 2 tiers of 32: whole bits only (half bits need 64 channels)
        (128, 3, 2, 3),  # tiers 32/32/64
        (256, 3, 2, 4),  # the default plan: 32/32/64/128, a half-bit tier
        (512, 2.5, 2, 0),  # groups wider than 128 stored as 128-channel groups, one norm
    ],
)
@pytest.mark.parametrize("n_q_heads, n_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("fp_window, sink, center, center_block", [(0, 0, 6, 0), (3, 2, 4, 7)])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_qmm_and_dequant_reads_equal_the_float_dequantized_reference(
    D, key_bits, value_bits, key_tiers, n_q_heads, n_kv_heads, fp_window, sink, center,
    center_block, small_blocks, monkeypatch,
):  # fmt: skip
    """Prefill chunks (many rows: blockwise) and decode steps (the whole storage as one block,
    dead slots masked): ``qmm``, ``dequant`` and ``auto`` equal ``decode`` (unpack + float
    levels) and the reference that quantize-dequantizes every compressed key and value."""
    if small_blocks:  # blockwise over 64-token blocks, the prefill path
        monkeypatch.setattr(tq_attention, "SCORE_BUDGET", 64)
    rng = np.random.default_rng(D + n_q_heads)
    layout = Layout(sink, fp_window, 4, center, center_block)
    cache = _Cache(D, key_bits, value_bits, layout, key_tiers)
    scales = mx.array(np.geomspace(4, 0.25, D).astype(np.float32))
    keys = values = None
    worst = {"qmm": 0.0, "dequant": 0.0, "auto": 0.0, "reference": 0.0}
    for L in (1, 9, 1, 1, 70, 1, 3):
        k = _rand(rng, 1, n_kv_heads, L, D) * scales + 2
        v = _rand(rng, 1, n_kv_heads, L, D) - 1
        keys = k if keys is None else mx.concatenate([keys, k], axis=2)
        values = v if values is None else mx.concatenate([values, v], axis=2)
        kv, vv = cache.keys.append(k), cache.values.append(v)
        q = _rand(rng, 1, n_q_heads, L, D)
        mask = "causal" if L > 1 else None
        ref = tq_attention.attention(q, kv, vv, scale=D**-0.5, mask=mask, read="decode")
        for read in ("qmm", "dequant", "auto"):
            out = tq_attention.attention(q, kv, vv, scale=D**-0.5, mask=mask, read=read)
            worst[read] = max(worst[read], _rel(out, ref))
        exact = _reference(cache, keys, values, q, D**-0.5)
        worst["reference"] = max(worst["reference"], _rel(ref, exact))
    assert cache.keys.spec.qmm_ready and cache.values.spec.qmm_ready
    assert len(cache.keys.spec.tiers) == key_tiers
    assert cache.keys.n_quantized > cache.keys.n_sink + 64  # more than one block compressed
    print(f"D={D} K{key_bits}/V{value_bits} t{key_tiers} GQA {n_q_heads}/{n_kv_heads} window "
          f"{fp_window} sink {sink} centre {center}/{center_block}: {worst}")  # fmt: skip
    assert max(worst.values()) < TOL


def test_uniform_chunked_prefill_equals_token_by_token():
    """The same tokens give the same outputs however the prompt is split, with the qmm path
    for decode steps and the dequant path for the long chunks."""
    rng = np.random.default_rng(5)
    D, T = 64, 90
    k, v, q = _rand(rng, 1, 2, T, D), _rand(rng, 1, 2, T, D), _rand(rng, 1, 4, T, D)
    outs = []
    for chunks in ([T], [1] * T, [7, 13, 1, 69]):
        layout = Layout(2, 6, 4, 9, 11)
        cache = _Cache(D, 5, 2, layout, 2)
        parts, pos = [], 0
        for n in chunks:
            kv = cache.keys.append(k[:, :, pos : pos + n])
            vv = cache.values.append(v[:, :, pos : pos + n])
            parts.append(tq_attention.attention(q[:, :, pos : pos + n], kv, vv, scale=0.2))
            pos += n
        outs.append(mx.concatenate(parts, axis=2))
    errors = [_rel(other, outs[0]) for other in outs[1:]]
    print(f"chunked vs whole prompt: {errors}")
    assert max(errors) < TOL


def test_unknown_read_is_an_error():
    layout = Layout(0, 0, 4, 0, 0)
    cache = _Cache(64, 4, 2, layout, 0)
    kv, vv = cache.keys.append(mx.ones((1, 1, 3, 64))), cache.values.append(mx.ones((1, 1, 3, 64)))
    with pytest.raises(ValueError, match="read must be one of"):
        tq_attention.attention(mx.ones((1, 1, 1, 64)), kv, vv, scale=1.0, read="gather")
