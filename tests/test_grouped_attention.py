"""The grouped exact attention (query heads of a kv head as the rows of one matmul) equals
mx.fast.scaled_dot_product_attention, alone and through the model's caches."""

import mlx.core as mx
import numpy as np
import pytest
import tiny

from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.loading import load_model
from gemma4_mlx.models.attention import grouped_attention


def _sliding_mask(L, T, window):
    q = np.arange(T - L, T)[:, None]
    k = np.arange(T)[None, :]
    return mx.array((k <= q) & (q - k < window))


@pytest.mark.parametrize("n_q, n_kv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("L, T", [(1, 1), (1, 37), (9, 9), (9, 40)])
@pytest.mark.parametrize("mask", [None, "causal", "sliding", "additive", "4d"])
def test_grouped_attention_equals_sdpa(n_q, n_kv, L, T, mask):
    rng = np.random.default_rng(L * T + n_q)
    q, k, v = (
        mx.array(rng.standard_normal(shape).astype(np.float32))
        for shape in ((2, n_q, L, 16), (2, n_kv, T, 16), (2, n_kv, T, 16))
    )
    m = {
        None: None,
        "causal": "causal",
        "sliding": _sliding_mask(L, T, 5),
        "additive": mx.where(_sliding_mask(L, T, 7), 0.0, -1e9),
        "4d": _sliding_mask(L, T, 6)[None, None],
    }[mask]
    if mask is None and L > 1 and T == L:
        m = None  # every key visible to every query
    ours = grouped_attention(q, k, v, scale=0.3, mask=m)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=m)
    err = float(mx.abs(ours - theirs).max())
    print(f"GQA {n_q}/{n_kv} L={L} T={T} mask {mask}: {err:.2e}")
    assert ours.shape == theirs.shape and err < 1e-5


@pytest.mark.parametrize("name", ["e2b", "gemma3"])
@pytest.mark.parametrize("kind", ["exact", "turboquant"])
def test_grouped_exact_attention_gives_the_models_logits(name, kind, tiny_checkpoints, monkeypatch):
    """Prompt and decode steps past the sliding window: attention=grouped (and auto, on this
    CPU grouped) give the logits of mlx-lm's SDPA path."""
    import gemma4_mlx.models.attention as attention

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return grouped_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "grouped_attention", counted)
    path, _ = tiny_checkpoints(name)
    model, _ = load_model(path)
    tokens = mx.array(np.random.default_rng(3).integers(3, tiny.VOCAB, size=2 * tiny.WINDOW + 5))
    runs = {}
    for form in ("sdpa", "grouped", "auto"):
        policy = KVPolicy(kind, attention=form) if kind == "exact" else KVPolicy(
            kind, bits=4, attention=form, center=4
        )  # fmt: skip
        cache = model.make_cache(policy)
        assert all(getattr(c, "attention", form) == form for c in cache)
        calls.clear()
        logits = [model(tokens[None, :-4], cache=cache)[:, -1]]
        n = tokens.shape[0]
        logits += [model(tokens[None, i : i + 1], cache=cache)[:, -1] for i in range(n - 4, n)]
        runs[form] = mx.concatenate(logits)
        assert bool(calls) == (form != "sdpa")  # every exact layer read grouped, or none
    for form in ("grouped", "auto"):
        err = float(mx.abs(runs[form] - runs["sdpa"]).max())
        print(f"{name} {kind} {form} vs sdpa: {err:.2e}")
        assert err < 1e-4
