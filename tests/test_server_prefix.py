"""The prefix store: exact-only trims, checkpoints preferred, a byte budget from real nbytes."""

from __future__ import annotations

import mlx.core as mx
import pytest

from gemma4_mlx.engine.prefix import PrefixStore, cache_nbytes, trim_is_exact


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    from gemma4_mlx.loading import load

    return load(tiny_chat_model)[0]


def filled(model, tokens, policy=None):
    cache = model.make_cache(policy)
    model(mx.array([tokens]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_trims_are_exact_only_where_the_cache_says_so(model):
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    short = filled(model, list(range(5, 10)))  # 5 tokens: inside the 8-token sliding window
    assert trim_is_exact(short, 2)
    wrapped = filled(model, list(range(5, 25)))  # 20 tokens: the sliding rings have wrapped
    assert any(type(c) is RotatingKVCache for c in wrapped)
    assert not trim_is_exact(wrapped, 1)
    exact = KVCache()
    exact.update_and_fetch(mx.zeros((1, 1, 4, 8)), mx.zeros((1, 1, 4, 8)))
    assert trim_is_exact([exact], 3) and not trim_is_exact([exact], 5)
    turbo = filled(model, list(range(5, 10)), "turboquant")
    assert not trim_is_exact(turbo, 1)  # never trimmed: a trim is not a cold prefill


def test_fetch_prefers_checkpoints_and_never_trims_a_wrapped_cache(model):
    store = PrefixStore(1 << 30)
    prompt = list(range(5, 40))
    store.insert("k", prompt[:20], filled(model, prompt[:20]), copy_cache=False)
    store.insert("k", prompt[:30], filled(model, prompt[:30]), copy_cache=False)
    hit = store.fetch("k", prompt[:25] + [99, 98])  # diverges inside the longer entry
    assert (hit.how, hit.reused) == ("checkpoint", 20)
    assert store.fetch("other", prompt).how == "miss"  # another model/policy key
    exact = store.fetch("k", prompt[:31])
    assert (exact.how, exact.reused) == ("checkpoint", 30)


def test_fetch_trims_only_an_exact_cache(model):
    store = PrefixStore(1 << 30)
    store.insert("k", [5, 6, 7, 8, 9, 10], filled(model, [5, 6, 7, 8, 9, 10]), copy_cache=False)
    hit = store.fetch("k", [5, 6, 7, 20, 21])
    assert (hit.how, hit.reused) == ("trimmed", 3)
    assert all(c.offset == 3 for c in hit.cache)
    warm = model(mx.array([[20]]), cache=hit.cache)
    reference = model(mx.array([[20]]), cache=filled(model, [5, 6, 7]))
    err = mx.abs(warm - reference).max().item()
    print(f"trimmed reuse vs cold: max logit error {err:.2e}")
    assert err < 1e-4
    turbo_store = PrefixStore(1 << 30)
    tokens = [5, 6, 7, 8, 9, 10]
    turbo_store.insert("t", tokens, filled(model, tokens, "turboquant"), copy_cache=False)
    assert turbo_store.fetch("t", [5, 6, 7, 20, 21]).how == "miss"


def test_budget_counts_real_bytes_and_skips_oversized_entries(model):
    one = filled(model, list(range(5, 15)))
    size = cache_nbytes(one)
    store = PrefixStore(int(size * 2.5))
    for start in range(3):
        tokens = list(range(5 + 100 * start, 15 + 100 * start))
        assert store.insert("k", tokens, filled(model, tokens), copy_cache=False)
    assert len(store) == 2 and store.nbytes <= store.max_bytes
    assert store.fetch("k", list(range(5, 16))).how == "miss"  # the oldest was evicted
    tiny = PrefixStore(size - 1)
    assert not tiny.insert("k", list(range(5, 15)), one, copy_cache=False)
    assert len(tiny) == 0
