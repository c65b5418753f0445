"""TurboQuant KV cache and attention: exactness against dequantized tensors, protocol, model use."""

import mlx.core as mx
import numpy as np
import pytest
import tiny

from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.errors import UserError
from gemma4_mlx.loading import load_model
from turboquant import attention as tq_attention
from turboquant.cache import TurboQuantKVCache, load_prompt_cache, save_prompt_cache
from turboquant.codec import CodecSpec, decode


def _rand(rng, *shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))


def _dequantized(cache):
    k, v = cache.compressed_block(0, cache.n_quantized)
    keys = mx.concatenate([decode(k, cache.key_spec), cache.fp_keys], axis=2)
    values = mx.concatenate([decode(v, cache.value_spec), cache.fp_values], axis=2)
    return keys, values


@pytest.mark.parametrize("n_q_heads, n_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("fp_window", [0, 5])
@pytest.mark.parametrize("codec", ["mse", "prod"])
def test_attention_equals_exact_attention_on_dequantized_cache(
    n_q_heads, n_kv_heads, fp_window, codec
):
    rng = np.random.default_rng(0)
    D = 64
    cache = TurboQuantKVCache(CodecSpec(D, 4, codec), CodecSpec(D, 3, codec), fp_window=fp_window)
    worst = 0.0
    for L in (9, 1, 1, 17, 1, 3):  # prefill chunks and decode steps
        view, _ = cache.update_and_fetch(
            _rand(rng, 2, n_kv_heads, L, D), _rand(rng, 2, n_kv_heads, L, D)
        )
        q = _rand(rng, 2, n_q_heads, L, D)
        out = view.attend(q, scale=D**-0.5, mask="causal" if L > 1 else None)
        keys, values = _dequantized(cache)
        ref = mx.fast.scaled_dot_product_attention(
            q, keys, values, scale=D**-0.5, mask="causal" if L > 1 else None
        )
        worst = max(worst, float(mx.abs(out - ref).max()))
    print(f"GQA {n_q_heads}/{n_kv_heads}, window {fp_window}, {codec}: max |diff| {worst:.2e}")
    assert worst < 1e-5


def test_blocks_and_sliding_window_mask(monkeypatch):
    """Force tiny blocks so a long cache is walked in many blocks, with a sliding window."""
    monkeypatch.setattr(tq_attention, "SCORE_BUDGET", 64)
    monkeypatch.setattr(tq_attention, "KV_BUDGET", 64)
    rng = np.random.default_rng(1)
    D, W = 32, 40
    cache = TurboQuantKVCache(CodecSpec(D, 5), CodecSpec(D, 2), fp_window=3)
    cache.window = W
    view, _ = cache.update_and_fetch(_rand(rng, 1, 2, 300, D), _rand(rng, 1, 2, 300, D))
    q = _rand(rng, 1, 4, 7, D)
    out = view.attend(q, scale=0.2)
    keys, values = _dequantized(cache)
    pos_q = np.arange(293, 300)[:, None]
    pos_k = np.arange(300)[None, :]
    mask = mx.array((pos_k <= pos_q) & (pos_q - pos_k < W))
    ref = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.2, mask=mask)
    err = float(mx.abs(out - ref).max())
    print(f"300 tokens in 64-token blocks, window {W}: max |diff| {err:.2e}")
    assert err < 1e-5


def test_eight_bit_attention_is_close_to_full_precision():
    rng = np.random.default_rng(2)
    k, v, q = _rand(rng, 1, 2, 200, 128), _rand(rng, 1, 2, 200, 128), _rand(rng, 1, 8, 1, 128)
    cache = TurboQuantKVCache(CodecSpec(128, 8), CodecSpec(128, 8), fp_window=0)
    view, _ = cache.update_and_fetch(k, v)
    out = view.attend(q, scale=128**-0.5)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5)
    err = float(mx.abs(out - ref).max())
    print(f"8-bit K/V vs float: max |diff| {err:.2e}")
    assert err < 0.02


def test_save_load_and_trim_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    cache = TurboQuantKVCache(CodecSpec(64, 3.5, "prod"), CodecSpec(64, 2), fp_window=4)
    cache.update_and_fetch(_rand(rng, 1, 2, 30, 64), _rand(rng, 1, 2, 30, 64))
    q = _rand(rng, 1, 2, 1, 64)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, [cache], {"note": "x"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "x"} and loaded[0].offset == 30 and loaded[0].key_spec == cache.key_spec
    k1, v1 = _rand(rng, 1, 2, 1, 64), _rand(rng, 1, 2, 1, 64)
    a, _ = cache.update_and_fetch(k1, v1)
    b, _ = loaded[0].update_and_fetch(k1, v1)
    assert np.array_equal(np.array(a.attend(q, scale=0.1)), np.array(b.attend(q, scale=0.1)))
    # trim back past the exact window into the compressed part, then grow again
    assert cache.is_trimmable() and cache.trim(10) == 10
    assert cache.offset == 21 and cache.n_quantized == 21 and cache.fp_keys.shape[2] == 0
    view, _ = cache.update_and_fetch(_rand(rng, 1, 2, 6, 64), _rand(rng, 1, 2, 6, 64))
    assert cache.offset == 27 and cache.n_quantized == 23 and cache.fp_keys.shape[2] == 4


def test_nbytes_counts_real_arrays_and_grows_in_chunks():
    cache = TurboQuantKVCache(CodecSpec(256, 3.5), CodecSpec(256, 3.5), fp_window=0)
    assert cache.nbytes == 0
    cache.update_and_fetch(mx.ones((1, 1, 10, 256)), mx.ones((1, 1, 10, 256)))
    per_token = 2 * (256 * 3.5 / 8 + 2)  # K and V codes + float16 norms
    assert cache.nbytes == per_token * cache.step  # storage for one chunk of 256 tokens
    cache.update_and_fetch(mx.ones((1, 1, 250, 256)), mx.ones((1, 1, 250, 256)))
    assert cache.nbytes == per_token * 2 * cache.step


@pytest.mark.parametrize("name", ["e2b", "26b", "gemma3"])
def test_eight_bit_turboquant_generation_matches_fp_cache(name, tiny_checkpoints):
    from mlx_lm.generate import generate_step

    path, _ = tiny_checkpoints(name)
    model, _ = load_model(path)
    prompt = mx.array([5, 9, 33, 70, 101, 4, 8])
    n = 3 * tiny.WINDOW

    def greedy(cache):
        return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache)]

    fp = greedy(model.make_cache())
    tq = greedy(model.make_cache(KVPolicy("turboquant", bits=8, fp_window=0)))
    print(f"{name}: fp {fp}\n{name}: tq {tq}")
    assert tq == fp


def test_kv_shared_consumers_read_the_producers_compressed_cache(tiny_checkpoints):
    """E2B-like: 10 layers, 5 consumers; only producers own caches, so quantized once."""
    path, _ = tiny_checkpoints("e2b")
    model, config = load_model(path)
    cache = model.make_cache(KVPolicy("turboquant", bits=4, fp_window=0))
    assert len(cache) == config.text.first_kv_shared_layer == 5
    assert sum(isinstance(c, TurboQuantKVCache) for c in cache) == 1  # layer 4, the global producer
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    assert cache[4].offset == 5


def test_policy_errors_are_clear():
    with pytest.raises(UserError, match="--kv-bits must be in 1..8, got 9"):
        KVPolicy("turboquant", bits=9)
    with pytest.raises(UserError, match="--value-bits must be in 1..8"):
        KVPolicy("turboquant", key_bits=8, value_bits=0.5)
    with pytest.raises(UserError, match="--kv-cache must be one of"):
        KVPolicy("int4")
    with pytest.raises(UserError, match="--kv-window must be >= 0"):
        KVPolicy("turboquant", fp_window=-1)
    assert KVPolicy("turboquant", bits=3.5).resolved_bits() == (5, 2)
    assert KVPolicy("turboquant", bits=3.5, key_bits=4).resolved_bits() == (4, 3)
