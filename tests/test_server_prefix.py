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
    from mlx_lm.models.cache import KVCache

    short = filled(model, list(range(5, 10)))
    assert trim_is_exact(short, 2)
    # sliding rings keep window - 1 + max_rewind tokens: trims within the budget are exact
    budget = filled(model, list(range(5, 45)), "exact:rewind=4")
    assert trim_is_exact(budget, 4) and not trim_is_exact(budget, 5)
    exact = KVCache()
    exact.update_and_fetch(mx.zeros((1, 1, 4, 8)), mx.zeros((1, 1, 4, 8)))
    assert trim_is_exact([exact], 3) and not trim_is_exact([exact], 5)
    turbo = filled(model, list(range(5, 45)), "turboquant:window=4,rewind=3")
    assert trim_is_exact(turbo, 3) and not trim_is_exact(turbo, 4)


def test_fetch_prefers_checkpoints_and_never_trims_past_the_rewind_budget(model):
    store = PrefixStore(1 << 30)
    prompt = list(range(5, 40))
    small = "exact:rewind=2"  # sliding rings that can give back 2 tokens, not 5
    store.insert("k", prompt[:20], filled(model, prompt[:20], small), copy_cache=False)
    store.insert("k", prompt[:30], filled(model, prompt[:30], small), copy_cache=False)
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
    # TurboQuant: exact within its rewind budget (a trimmed entry continues as a cold prefill
    # would), refused beyond it
    tokens = list(range(5, 45))
    for spec, how in (("turboquant:window=4", "trimmed"), ("turboquant:window=4,rewind=2", "miss")):
        turbo_store = PrefixStore(1 << 30)
        turbo_store.insert("t", tokens, filled(model, tokens, spec), copy_cache=False)
        hit = turbo_store.fetch("t", tokens[:37] + [99])
        assert hit.how == how
        if how == "trimmed":
            warm = model(mx.array([[99]]), cache=hit.cache)
            reference = model(mx.array([[99]]), cache=filled(model, tokens[:37], spec))
            err = mx.abs(warm - reference).max().item()
            print(f"TurboQuant trimmed reuse vs cold: max logit error {err:.2e}")
            assert err < 1e-4


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
