"""TurboQuant KV cache and attention: exactness against dequantized tensors, protocol, model use."""

import mlx.core as mx
import numpy as np
import pytest
import tiny
from mlx_lm.models.cache import save_prompt_cache

from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.kv.cache import TrimError, TurboQuantKVCache
from gemma4_mlx.loading import load_model
from gemma4_mlx.prompt_files import load_prompt_cache
from turboquant import attention as tq_attention
from turboquant.codec import CodecSpec, decode
from turboquant.tiers import plan_tiers


def _rand(rng, *shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))


def _attend(kv, q, **kwargs):
    """TurboQuant attention over what ``update_and_fetch`` returned (the K and V views)."""
    return tq_attention.attention(q, *kv, **kwargs)


def _token_means(cache, means, T):
    """(B, H, T, D) float32: the mean token j is centred on, from the cache's block means (only
    compressed tokens' entries matter; the rest clip to the last mean)."""
    if means is None:
        return mx.array(0.0)
    if not cache.layout.center_block:
        return means.astype(mx.float32)
    block = np.clip(
        (np.arange(T) - cache.layout.sink) // cache.layout.center_block, 0, means.shape[2] - 1
    )
    return means[:, :, mx.array(block)].astype(mx.float32)


def _reference(cache, keys, values, q, scale, window=None):
    """Attention a query at t would get from exact keys j (j < sink or t - fp_window <= j <= t)
    and quantize-dequantized keys elsewhere, from all exact keys/values (B, H, T, D) so far."""
    from turboquant.codec import encode

    T, L = keys.shape[2], q.shape[2]
    ks, vs = cache.keys.spec, cache.values.spec
    k_mean, v_mean = (
        _token_means(cache, mean, T) for mean in (cache.keys.means, cache.values.means)
    )
    k_q = keys - k_mean
    if cache.keys.order is None:
        k_q = decode(encode(k_q, ks), ks) + k_mean
    else:  # key tiers: each head's channels reordered, coded, put back (numpy: plain indexing)
        order = np.array(cache.keys.order)
        k_np = np.array(k_q)
        for h in range(k_np.shape[1]):
            part = mx.array(k_np[:, h : h + 1][..., order[h]])
            k_np[:, h : h + 1][..., order[h]] = np.array(decode(encode(part, ks), ks))
        k_q = mx.array(k_np) + k_mean
    v_q = decode(encode(values - v_mean, vs), vs) + v_mean
    t = np.arange(T - L, T)[:, None]
    j = np.arange(T)[None, :]
    exact = mx.array(
        (j < cache.layout.sink)
        | (t - j <= cache.layout.fp_window)
        | (t < cache.layout.sink + cache.layout.center)
    )
    visible = (j <= t) if window is None else (j <= t) & (t - j < window)
    groups = q.shape[1] // keys.shape[1]
    outs = []
    for h in range(q.shape[1]):
        kv = h // groups
        s_e = (q[:, h] * scale) @ keys[:, kv].swapaxes(-1, -2)
        s_q = (q[:, h] * scale) @ k_q[:, kv].swapaxes(-1, -2)
        sc = mx.where(mx.array(visible), mx.where(exact, s_e, s_q), -mx.inf)
        p = mx.softmax(sc, axis=-1)
        outs.append(mx.where(exact, p, 0) @ values[:, kv] + mx.where(exact, 0, p) @ v_q[:, kv])
    return mx.stack(outs, axis=1)


@pytest.mark.parametrize("n_q_heads, n_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize(
    "fp_window, sink, center, center_block",
    [
        (0, 0, 0, 0),
        (5, 0, 0, 0),
        (0, 2, 0, 0),
        (3, 4, 0, 0),
        (0, 0, 6, 0),
        (3, 2, 10, 0),
        (0, 0, 3, 5),
        (3, 2, 4, 7),
    ],
)
@pytest.mark.parametrize("codec", ["mse", "prod"])
def test_attention_reads_exact_recent_tokens_and_compressed_older_ones(
    n_q_heads, n_kv_heads, fp_window, sink, center, center_block, codec
):
    """Prefill chunks and decode steps: every query gets exact keys/values for the sink and its
    own recent window and compressed ones elsewhere, however the tokens arrived."""
    _check_attention(n_q_heads, n_kv_heads, fp_window, sink, center, center_block, codec)


@pytest.mark.parametrize("n_q_heads, n_kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize(
    "fp_window, sink, center, center_block", [(0, 0, 6, 0), (3, 2, 10, 0), (3, 2, 4, 7)]
)
@pytest.mark.parametrize("key_tiers", [2, 3])
def test_attention_with_key_tiers(
    n_q_heads, n_kv_heads, fp_window, sink, center, center_block, key_tiers
):
    """Key tiers: queries and the key means follow each head's channel order, so attention
    equals the reference that codes every head's reordered keys with the tiered spec."""
    cache = _check_attention(
        n_q_heads, n_kv_heads, fp_window, sink, center, center_block, "mse", key_tiers
    )
    assert len(cache.keys.spec.tiers) == key_tiers and cache.keys.order.shape == (n_kv_heads, 64)


def _check_attention(
    n_q_heads, n_kv_heads, fp_window, sink, center, center_block, codec, key_tiers=0
):
    rng = np.random.default_rng(0)
    D = 64
    cache = TurboQuantKVCache(
        CodecSpec(D, 4, codec),
        CodecSpec(D, 3, codec),
        fp_window=fp_window,
        sink=sink,
        center=center,
        center_block=center_block,
        key_tiers=key_tiers,
    )
    scales = mx.array(np.geomspace(4, 0.25, D).astype(np.float32))  # strong and weak channels
    keys = values = None
    worst = 0.0
    for L in (1, 9, 1, 1, 17, 1, 3):
        k, v = _rand(rng, 2, n_kv_heads, L, D) * scales + 2, _rand(rng, 2, n_kv_heads, L, D) - 1
        keys = k if keys is None else mx.concatenate([keys, k], axis=2)
        values = v if values is None else mx.concatenate([values, v], axis=2)
        view = cache.update_and_fetch(k, v)
        q = _rand(rng, 2, n_q_heads, L, D)
        out = _attend(view, q, scale=D**-0.5, mask="causal" if L > 1 else None)
        ref = _reference(cache, keys, values, q, D**-0.5)
        worst = max(worst, float(mx.abs(out - ref).max()))
    # exact copies: the window and max_rewind tokens before it, everything after the sink while
    # a trim of max_rewind could still go back before the first mean
    rewind, after_sink = cache.layout.max_rewind, cache.offset - min(sink, cache.offset)
    held = after_sink if cache.offset - rewind < sink + center else fp_window + rewind
    assert cache.keys.tail.shape[2] == min(held, after_sink)
    assert (cache.keys.means is None) == (center == 0)
    if center_block:  # one mean per started block, and the next one once a block is complete
        assert cache.keys.means.shape[2] == (cache.keys.n_quantized - sink) // center_block + 1
    print(
        f"GQA {n_q_heads}/{n_kv_heads}, window {fp_window}, sink {sink}, centre {center}/"
        f"{center_block}, {codec}, key tiers {key_tiers}: {worst:.2e}"
    )
    assert worst < 1e-5
    return cache


@pytest.mark.parametrize("center_block, key_tiers", [(0, 0), (11, 0), (11, 3)])
def test_chunked_prefill_equals_token_by_token(center_block, key_tiers):
    """The same tokens give the same attention outputs however the prompt is split."""
    rng = np.random.default_rng(5)
    D, T = 32, 40
    k, v, q = _rand(rng, 1, 2, T, D), _rand(rng, 1, 2, T, D), _rand(rng, 1, 4, T, D)
    outs = []
    for chunks in ([T], [1] * T, [7, 13, 1, 19]):
        cache = TurboQuantKVCache(
            CodecSpec(D, 5),
            CodecSpec(D, 2),
            fp_window=6,
            sink=2,
            center=9,
            center_block=center_block,
            key_tiers=key_tiers,
        )
        parts, pos = [], 0
        for n in chunks:
            view = cache.update_and_fetch(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
            parts.append(_attend(view, q[:, :, pos : pos + n], scale=0.2, mask="causal"))
            pos += n
        outs.append(mx.concatenate(parts, axis=2))
    for other in outs[1:]:
        assert float(mx.abs(other - outs[0]).max()) < 1e-5


def test_block_means_are_each_previous_blocks_mean():
    """Block 0 is centred on the mean of its first ``center`` tokens, block b on the mean of
    block b - 1's exact tokens: keys whose mean drifts (as layer 17's do over 16K tokens) get
    their error cut against one fixed mean, at the cost of one mean per block."""
    rng = np.random.default_rng(11)
    D, T, sink, center, block = 64, 300, 2, 8, 64
    drift = mx.linspace(0, 6, T)[None, None, :, None] * _rand(rng, 1, 2, 1, D)
    k, v = _rand(rng, 1, 2, T, D) + drift, _rand(rng, 1, 2, T, D) - drift
    q = _rand(rng, 1, 4, 1, D)
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5)
    errors = {}
    for b in (0, block):
        cache = TurboQuantKVCache(
            CodecSpec(D, 3), CodecSpec(D, 3), sink=sink, center=center, center_block=b
        )
        for start in range(0, T, 37):  # chunks that straddle block boundaries
            view = cache.update_and_fetch(k[:, :, start : start + 37], v[:, :, start : start + 37])
        errors[b] = float(mx.abs(_attend(view, q, scale=D**-0.5) - exact).max())
    n_blocks = (T - sink) // block + 1  # every started block, the next one once b - 1 is complete
    assert cache.keys.means.shape == (1, 2, n_blocks, D)
    for stream, x in ((cache.keys, k), (cache.values, v)):
        means = stream.means
        np.testing.assert_allclose(means[:, :, 0], x[:, :, sink : sink + center].mean(2), atol=1e-5)
        for i in range(1, n_blocks):
            lo = sink + (i - 1) * block
            np.testing.assert_allclose(means[:, :, i], x[:, :, lo : lo + block].mean(2), atol=1e-5)
    print(f"max |error| one mean {errors[0]:.4f}, a mean per {block} tokens {errors[block]:.4f}")
    assert errors[block] < 0.7 * errors[0]


@pytest.mark.parametrize("key_tiers", [0, 3])
def test_block_means_survive_save_load_and_trim(tmp_path, key_tiers):
    """A cache saved mid-block continues as if never saved; a trim back into the compressed part
    drops the means of blocks no longer reached and restores the running sum exactly (replayed
    from its checkpoint over the exact copies of the last max_rewind compressed tokens)."""
    rng = np.random.default_rng(13)
    D = 64
    make = lambda: TurboQuantKVCache(  # noqa: E731
        CodecSpec(D, 4),
        CodecSpec(D, 3),
        fp_window=3,
        sink=2,
        center=4,
        center_block=16,
        key_tiers=key_tiers,
        max_rewind=32,  # the trim below takes back 30 tokens
    )
    k, v = _rand(rng, 1, 2, 80, D) + 1, _rand(rng, 1, 2, 80, D)
    cache = make()
    cache.update_and_fetch(k[:, :, :45], v[:, :, :45])
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, [cache])
    loaded = load_prompt_cache(path)[0]
    assert loaded.layout.center_block == 16
    assert mx.array_equal(loaded.keys.sum_base, cache.keys.sum_base).item()
    assert loaded.keys.spec == cache.keys.spec and loaded.keys.tiers == key_tiers
    if key_tiers:
        assert mx.array_equal(loaded.keys.order, cache.keys.order).item()
    q = _rand(rng, 1, 2, 1, D)
    outs = []
    for c in (cache, loaded):
        view = c.update_and_fetch(k[:, :, 45:70], v[:, :, 45:70])
        outs.append(np.array(_attend(view, q, scale=0.1)))
    assert np.array_equal(*outs)
    assert mx.array_equal(cache.keys.means, loaded.keys.means).item()
    # trim to 40 tokens: 37 compressed are 2 full blocks (means for blocks 0..2) + 3 tokens
    before = cache.keys.means
    cache.trim(30)
    assert cache.keys.n_quantized == 37 and cache.keys.means.shape[2] == 3
    assert mx.array_equal(cache.keys.means, before[:, :, :3]).item()
    exact_sum = k[:, :, 34:37].sum(2, keepdims=True)  # block 2 = positions [34, 50)
    assert float(mx.abs(cache.keys.running_sum() - exact_sum).max()) < 1e-5
    cache.update_and_fetch(k[:, :, 40:80], v[:, :, 40:80])  # the next block's mean is built again
    assert cache.keys.means.shape[2] == (cache.keys.n_quantized - 2) // 16 + 1
    err = float(mx.abs(cache.keys.means[:, :, 3] - k[:, :, 34:50].mean(2)).max())
    print(f"key tiers {key_tiers}: max |rebuilt mean - exact mean| {err:.2e}")
    assert err < 1e-5


def test_centring_cuts_the_error_of_keys_that_share_a_mean():
    """Keys with a common offset (as real keys have): the centred cache's attention is closer to
    exact attention than the uncentred one at the same bits, and stores only the mean more."""
    rng = np.random.default_rng(7)
    D, T = 64, 400
    offset = _rand(rng, 1, 2, 1, D) * 2
    k, v = _rand(rng, 1, 2, T, D) + offset, _rand(rng, 1, 2, T, D)
    q = _rand(rng, 1, 4, 1, D)
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5)
    errors, sizes = {}, {}
    for center in (0, 64):
        cache = TurboQuantKVCache(CodecSpec(D, 3), CodecSpec(D, 3), sink=4, center=center)
        view = cache.update_and_fetch(k, v)
        errors[center] = float(mx.abs(_attend(view, q, scale=D**-0.5) - exact).max())
        sizes[center] = cache.nbytes
    print(f"max |error| uncentred {errors[0]:.4f}, centred {errors[64]:.4f}")
    assert errors[64] < 0.7 * errors[0]
    assert sizes[64] - sizes[0] == 2 * 2 * D * 4  # the key and value means, in the keys' float32


def test_blocks_and_sliding_window_mask(monkeypatch):
    """Force tiny blocks so a long cache is walked in many blocks, with a sliding window."""
    monkeypatch.setattr(tq_attention, "SCORE_BUDGET", 64)
    monkeypatch.setattr(tq_attention, "KV_BUDGET", 64)
    rng = np.random.default_rng(1)
    D, W = 32, 40
    cache = TurboQuantKVCache(CodecSpec(D, 5), CodecSpec(D, 2), fp_window=3, sink=1)
    k, v = _rand(rng, 1, 2, 300, D), _rand(rng, 1, 2, 300, D)
    view = cache.update_and_fetch(k, v)
    q = _rand(rng, 1, 4, 7, D)
    out = _attend(view, q, scale=0.2, sliding_window=W)
    ref = _reference(cache, k, v, q, 0.2, window=W)
    err = float(mx.abs(out - ref).max())
    print(f"300 tokens in 64-token blocks, window {W}: max |diff| {err:.2e}")
    assert err < 1e-5


def test_plan_tiers_spends_the_bits_where_the_energy_is():
    energy = np.geomspace(100, 0.01, 256)
    tiers = plan_tiers(energy, 3.0, 4)
    assert [n for n, _ in tiers] == [32, 32, 64, 128]
    bits = [b for _, b in tiers]
    assert sum(n * b for n, b in tiers) == 3.0 * 256  # the whole budget, no more
    assert bits == sorted(bits, reverse=True) and bits[0] > 3 and min(bits) >= 2
    assert plan_tiers(np.ones(64), 4.0, 3) == ((16, 4.0), (16, 4.0), (32, 4.0))  # isotropic
    assert max(b for _, b in plan_tiers(np.r_[1e9, np.ones(63)], 6.0, 2)) == 8  # capped
    assert plan_tiers(np.ones(64), 1.5, 2) == ((32, 1.5), (32, 1.5))  # below 2 bits: flat start


def test_key_tiers_cut_the_error_of_anisotropic_keys():
    """Keys with a few strong channels (as RoPE'd Gemma keys have): ordering each head's channels
    by their variance over the centring tokens and giving the strong tiers more bits beats one
    rotation over all channels at the same code bits."""
    rng = np.random.default_rng(1)
    D, T = 128, 400
    scales = mx.array(np.geomspace(8, 0.1, D).astype(np.float32))
    perm = [mx.array(rng.permutation(D)) for _ in range(2)]  # each head its own strong channels
    k = mx.concatenate([(_rand(rng, 1, 1, T, D) * scales)[..., p] for p in perm], axis=1)
    v, q = _rand(rng, 1, 2, T, D), _rand(rng, 1, 4, 8, D) * scales
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
    errors = {}
    for tiers in (0, 4):
        cache = TurboQuantKVCache(CodecSpec(D, 3), CodecSpec(D, 8), center=16, key_tiers=tiers)
        cache.update_and_fetch(k[:, :, : T - 8], v[:, :, : T - 8])
        view = cache.update_and_fetch(k[:, :, T - 8 :], v[:, :, T - 8 :])
        errors[tiers] = float(mx.abs(_attend(view, q, scale=D**-0.5, mask="causal") - exact).mean())
    strongest = np.array(cache.keys.order)[:, :4]
    assert all(set(strongest[h]) <= set(np.argsort(np.array(perm[h]))[:16]) for h in range(2))
    assert cache.keys.spec.bits == 3 and len(cache.keys.spec.tiers) == 4
    print(f"mean |error| one rotation {errors[0]:.4f}, 4 tiers {errors[4]:.4f}")
    assert errors[4] < 0.6 * errors[0]


def test_eight_bit_attention_is_close_to_full_precision():
    rng = np.random.default_rng(2)
    k, v, q = _rand(rng, 1, 2, 200, 128), _rand(rng, 1, 2, 200, 128), _rand(rng, 1, 8, 1, 128)
    cache = TurboQuantKVCache(CodecSpec(128, 8), CodecSpec(128, 8), fp_window=0)
    view = cache.update_and_fetch(k, v)
    out = _attend(view, q, scale=128**-0.5)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5)
    err = float(mx.abs(out - ref).max())
    print(f"8-bit K/V vs float: max |diff| {err:.2e}")
    assert err < 0.02


def test_save_load_and_trim_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    cache = TurboQuantKVCache(
        CodecSpec(64, 3.5, "prod"),
        CodecSpec(64, 2),
        fp_window=4,
        sink=2,
        exact_dtype=mx.bfloat16,
        center=8,
    )
    cache.update_and_fetch(_rand(rng, 1, 2, 30, 64), _rand(rng, 1, 2, 30, 64))
    assert cache.keys.tail.dtype == cache.keys.sink.dtype == mx.bfloat16
    q = _rand(rng, 1, 2, 1, 64)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, [cache], {"note": "x"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert (
        meta == {"note": "x"} and loaded[0].offset == 30 and loaded[0].keys.spec == cache.keys.spec
    )
    assert (loaded[0].layout.sink, loaded[0].keys.n_sink, loaded[0].keys.exact_dtype) == (
        2,
        2,
        mx.bfloat16,
    )
    assert (
        loaded[0].layout.center == 8
        and mx.array_equal(loaded[0].keys.means, cache.keys.means).item()
    )
    k1, v1 = _rand(rng, 1, 2, 1, 64), _rand(rng, 1, 2, 1, 64)
    a = cache.update_and_fetch(k1, v1)
    b = loaded[0].update_and_fetch(k1, v1)
    assert np.array_equal(np.array(_attend(a, q, scale=0.1)), np.array(_attend(b, q, scale=0.1)))
    # trim back past the exact window into the compressed part: the codes of positions 17..26
    # are dropped (their exact copies are still held), then grow again
    assert cache.is_trimmable() and cache.can_trim(10) and cache.trim(10) == 10
    assert cache.offset == 21 and cache.keys.n_quantized == 17
    cache.update_and_fetch(_rand(rng, 1, 2, 6, 64), _rand(rng, 1, 2, 6, 64))
    assert cache.offset == 27 and cache.keys.n_quantized == 23
    # beyond the budget a trim is refused before anything changes, never silently lossy
    small = TurboQuantKVCache(CodecSpec(64, 2), CodecSpec(64, 2), fp_window=1, max_rewind=2)
    small.update_and_fetch(_rand(rng, 1, 2, 10, 64), _rand(rng, 1, 2, 10, 64))
    assert small.can_trim(2) and not small.can_trim(3) and small.can_trim(10)  # 10: empty again
    with pytest.raises(TrimError, match="cannot trim 3 of 10 tokens exactly"):
        small.trim(3)
    assert small.offset == 10 and small.keys.n_quantized == 9


def test_nbytes_counts_real_arrays_and_grows_in_chunks():
    cache = TurboQuantKVCache(CodecSpec(256, 3.5), CodecSpec(256, 3.5), fp_window=0, max_rewind=0)
    assert cache.nbytes == 0
    cache.update_and_fetch(mx.ones((1, 1, 10, 256)), mx.ones((1, 1, 10, 256)))
    per_token = 2 * (256 * 3.5 / 8 + 2)  # K and V codes + float16 norms
    assert cache.nbytes == per_token * cache.keys.step  # storage for one chunk of 256 tokens
    cache.update_and_fetch(mx.ones((1, 1, 250, 256)), mx.ones((1, 1, 250, 256)))
    assert cache.nbytes == per_token * 2 * cache.keys.step


@pytest.mark.parametrize(
    "name, key_tiers, grid",
    [("e2b", 0, "lloyd"), ("26b", 0, "lloyd"), ("gemma3", 0, "lloyd"), ("e2b", 2, "lloyd")]
    + [("e2b", 0, "uniform"), ("gemma3", 0, "uniform")],
)
def test_eight_bit_turboquant_generation_matches_fp_cache(name, key_tiers, grid, tiny_checkpoints):
    from mlx_lm.generate import generate_step

    path, _ = tiny_checkpoints(name)
    model, _ = load_model(path)
    prompt = mx.array([5, 9, 33, 70, 101, 4, 8])
    n = 3 * tiny.WINDOW

    def greedy(cache):
        return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache)]

    fp = greedy(model.make_cache())
    # A new mean every 6 tokens: the block means are read through the model too.
    policy = KVPolicy(
        "turboquant",
        bits=8,
        fp_window=0,
        center=2,
        center_block=6,
        key_tiers=key_tiers,
        grid=grid,
    )
    cache = model.make_cache(policy)
    tq = greedy(cache)
    tq_caches = [c for c in cache if isinstance(c, TurboQuantKVCache)]
    assert all(c.keys.n_quantized > c.keys.n_sink for c in tq_caches)
    assert all(len(c.keys.spec.tiers) == key_tiers for c in tq_caches)  # tiers read by the model
    print(f"{name}: fp {fp}\n{name}: tq {tq}")
    assert tq == fp


def test_kv_shared_consumers_read_the_producers_compressed_cache(tiny_checkpoints):
    """E2B-like: 10 layers, 5 consumers; only producers own caches, so quantized once."""
    path, _ = tiny_checkpoints("e2b")
    model, config = load_model(path)
    cache = model.make_cache(KVPolicy("turboquant", bits=4, fp_window=0, center=0))
    assert len(cache) == config.text.first_kv_shared_layer == 5
    assert sum(isinstance(c, TurboQuantKVCache) for c in cache) == 1  # layer 4, the global producer
    assert cache[4].layout.center_block == 0  # centring off: the default's block size is moot
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    assert cache[4].offset == 5


@pytest.mark.parametrize("bits", [2.5, 3.0, 3.125, 4.0, 6.5])
@pytest.mark.parametrize("dim,n", [(256, 4), (512, 4), (128, 3)])
def test_uniform_tier_plans_are_ones_quantized_matmul_reads(bits, dim, n):
    from turboquant.codec import CodecSpec
    from turboquant.tiers import plan_tiers

    energy = np.sort(np.random.default_rng(dim).gamma(0.3, size=dim))[::-1]
    tiers = plan_tiers(energy, bits, n, "uniform")
    mean = sum(c * b for c, b in tiers) / dim
    spec = CodecSpec(dim, mean, tiers=tiers, grid="uniform")
    print(f"{bits} bits at d={dim}: {tiers} (mean {mean:.4f})")
    assert spec.qmm_ready and bits - 32 / dim <= mean <= bits + 1e-9
    assert all(b.is_integer() or c >= 64 for c, b in tiers)
