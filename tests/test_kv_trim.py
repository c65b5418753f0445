"""Exact trims: within max_rewind a trim restores every cache as if the trimmed tokens never came
(what speculative decoding and prompt-prefix reuse do); beyond it the trim is refused loudly."""

import mlx.core as mx
import numpy as np
import pytest
import tiny
from mlx_lm.models.cache import trim_prompt_cache

from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.kv.cache import SlidingKVCache, TrimError, TurboQuantKVCache
from gemma4_mlx.loading import load_model
from turboquant.attention import attention
from turboquant.codec import CodecSpec

REWIND = 6
PROMPT = 3 * tiny.WINDOW  # the sliding windows are full
CONTINUE = 4
TOL = 1e-5
# Every token crosses the compression boundary (an exact window of 2), a new block mean every 4
# tokens (block starts at 5, 9, ..., 25, 29: the drafts at 24..29 cross two), key tiers on.
POLICIES = {
    "turboquant": KVPolicy(
        "turboquant", fp_window=2, sink=1, center=3, center_block=4, max_rewind=REWIND
    ),
    # uniform grid: head dim 32 reads by qmm (gemma3's 16 by decoding), no tiers (< 32 a tier)
    "turboquant-uniform": KVPolicy(
        "turboquant",
        fp_window=2,
        sink=1,
        center=3,
        center_block=4,
        max_rewind=REWIND,
        grid="uniform",
    ),
    "exact": KVPolicy(max_rewind=REWIND),  # sliding rings; global layers mlx-lm's KVCache
}


def _tokens(n: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(3, tiny.VOCAB, size=n))


def _continue(model, cache, tokens: mx.array) -> list[mx.array]:
    """Logits of feeding ``tokens`` one at a time."""
    return [model(tokens[None, i : i + 1], cache=cache) for i in range(tokens.shape[0])]


@pytest.mark.parametrize("kind", list(POLICIES))
@pytest.mark.parametrize("name", list(tiny.TINY_CONFIGS))
def test_trim_within_max_rewind_continues_like_the_untrimmed_path(name, kind, tiny_checkpoints):
    """Prompt + k tokens in one call (a draft), trim k - 1, continue: the logits equal those of
    prompt + 1 token, continue, for every k <= max_rewind + 1."""
    model, _ = load_model(tiny_checkpoints(name)[0])
    policy = POLICIES[kind]
    prompt, follow = _tokens(PROMPT, 0), _tokens(1 + CONTINUE, 1)
    drafts = _tokens(REWIND, 2)  # rejected: never the continuation

    cache = model.make_cache(policy)
    model(prompt[None], cache=cache)
    ref = _continue(model, cache, follow)
    tq = [c for c in cache if isinstance(c, TurboQuantKVCache)]
    assert kind != "turboquant" or (tq and tq[0].keys.means.shape[2] > 2)  # blocks were crossed
    worst = 0.0
    for k in range(1, REWIND + 2):
        cache = model.make_cache(policy)
        model(prompt[None], cache=cache)
        step = model(mx.concatenate([follow[:1], drafts[: k - 1]])[None], cache=cache)
        assert trim_prompt_cache(cache, k - 1) == k - 1
        assert all(c.offset == PROMPT + 1 for c in cache)
        got = [step[:, :1]] + _continue(model, cache, follow[1:])
        for a, b in zip(got, ref):
            worst = max(worst, float(mx.abs(a - b).max()))
    print(f"{name} {kind}: max |logit diff| trimmed vs untrimmed, k <= {REWIND + 1}: {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("kind", list(POLICIES))
def test_trim_beyond_max_rewind_is_refused_before_anything_changes(kind, tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints("e2b")[0])
    cache = model.make_cache(POLICIES[kind])
    model(_tokens(PROMPT + REWIND + 1, 3)[None], cache=cache)
    ours = [c for c in cache if isinstance(c, (SlidingKVCache, TurboQuantKVCache))]
    assert ours and all(c.is_trimmable() for c in cache)
    assert all(c.can_trim(REWIND) and not c.can_trim(REWIND + 1) for c in ours)
    with pytest.raises(TrimError, match=f"cannot trim {REWIND + 1} of"):
        trim_prompt_cache(cache, REWIND + 1)  # mlx-lm's helper: loud, not a silent 0
    assert all(c.offset == PROMPT + REWIND + 1 for c in cache)
    assert trim_prompt_cache(cache, PROMPT + REWIND + 1) == PROMPT + REWIND + 1  # all: a reset
    assert all(c.offset == 0 for c in cache)


def _rand(rng, *shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("key_tiers", [0, 2])
def test_trim_back_before_the_first_mean_restores_the_uncentred_state(key_tiers):
    """A trim to before sink + center tokens forgets the mean and the channel order: the same
    tokens again give the same codes, means and attention as a cache that never saw the drafts."""
    rng = np.random.default_rng(0)
    D = 32

    def make():
        return TurboQuantKVCache(
            CodecSpec(D, 3), CodecSpec(D, 2), fp_window=1, sink=2, center=6, center_block=8,
            key_tiers=key_tiers, max_rewind=8,
        )  # fmt: skip

    k, v, q = _rand(rng, 1, 2, 20, D), _rand(rng, 1, 2, 20, D), _rand(rng, 1, 4, 1, D)
    drafts = _rand(rng, 1, 2, 6, D)
    trimmed, plain = make(), make()
    trimmed.update_and_fetch(k[:, :, :7], v[:, :, :7])
    trimmed.update_and_fetch(drafts, drafts)  # offset 13: mean taken, tiers planned, compressed
    assert trimmed.keys.means is not None and trimmed.keys.n_quantized == 12
    trimmed.trim(6)
    assert trimmed.keys.means is None and trimmed.keys.order is None
    assert trimmed.keys.spec == trimmed.keys.base_spec and trimmed.keys.n_quantized == 2
    plain.update_and_fetch(k[:, :, :7], v[:, :, :7])
    for c in (trimmed, plain):
        kv = c.update_and_fetch(k[:, :, 7:], v[:, :, 7:])
        c.out = attention(q, *kv, scale=D**-0.5)
    assert mx.array_equal(trimmed.out, plain.out).item()
    for a, b in ((trimmed.keys, plain.keys), (trimmed.values, plain.values)):
        assert a.spec == b.spec and mx.array_equal(a.means, b.means).item()
        n = a.n_quantized - a.n_sink
        assert n == b.n_quantized - b.n_sink > 0
        assert all(mx.array_equal(x[:, :, :n], y[:, :, :n]).item()
                   for x, y in zip(a.codes.arrays(), b.codes.arrays()))  # fmt: skip


def test_sliding_cache_reads_exactly_its_window_and_trims_within_budget():
    """The sliding cache against exact windowed attention over every key, chunked and token by
    token, with trims of up to max_rewind tokens in between."""
    rng = np.random.default_rng(1)
    W, R, D = 5, 3, 16
    cache = SlidingKVCache(W, R)
    cache.step = 4  # move the live tokens to the front often
    k_all, v_all = _rand(rng, 1, 2, 80, D), _rand(rng, 1, 2, 80, D)
    held_k, held_v, worst, pos = [], [], 0.0, 0
    for n, trim in [(7, 0), (1, 1), (1, 3), (3, 2), (1, 0), (9, 3), (1, 1), (2, 0), (1, 3)]:
        k, v = k_all[:, :, pos : pos + n], v_all[:, :, pos : pos + n]
        mask = cache.make_mask(n, window_size=W)
        keys, values = cache.update_and_fetch(k, v)
        held_k, held_v = held_k + [k], held_v + [v]
        q = _rand(rng, 1, 4, n, D)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.3, mask=mask)
        all_k, all_v = mx.concatenate(held_k, axis=2), mx.concatenate(held_v, axis=2)
        T = all_k.shape[2]
        qp, kp = mx.arange(T - n, T)[:, None], mx.arange(T)[None, :]
        ref_mask = (kp <= qp) & (qp - kp < W)
        ref = mx.fast.scaled_dot_product_attention(q, all_k, all_v, scale=0.3, mask=ref_mask)
        worst = max(worst, float(mx.abs(out - ref).max()))
        pos += n
        if trim:
            assert cache.trim(trim) == trim
            all_k, all_v = all_k[:, :, : T - trim], all_v[:, :, : T - trim]
            held_k, held_v = [all_k], [all_v]
            pos -= trim
    print(f"sliding window {W} + rewind {R}: max |diff| vs exact windowed attention {worst:.2e}")
    assert worst < 1e-6
    with pytest.raises(TrimError):
        cache.trim(R + 1)


@pytest.mark.parametrize("kind", list(POLICIES))
def test_saved_cache_continues_and_trims_like_the_original(kind, tiny_checkpoints, tmp_path):
    """mlx-lm's save_prompt_cache writes our caches' state (sliding rings, TurboQuant streams
    with their exact tails and running sums); loaded, they give the same logits and trims."""
    from mlx_lm.models.cache import save_prompt_cache

    from gemma4_mlx.prompt_files import load_prompt_cache

    model, _ = load_model(tiny_checkpoints("e2b")[0])
    cache = model.make_cache(POLICIES[kind])
    model(_tokens(PROMPT + 3, 4)[None], cache=cache)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    drafts, follow = _tokens(REWIND, 5), _tokens(3, 6)
    outs = []
    for c in (cache, loaded):
        first = model(drafts[None], cache=c)
        assert trim_prompt_cache(c, REWIND) == REWIND
        outs.append(mx.concatenate([first, *_continue(model, c, follow)], axis=1))
    assert mx.array_equal(*outs).item()
