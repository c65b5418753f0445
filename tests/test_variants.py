"""The released variants' config facts (gemma4_mlx.variants) give the layer plan transformers
derives from the same facts, and the cache plan the model builds from it."""

import pytest
from mlx_lm.models.cache import KVCache
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

from gemma4_mlx.cache import KVPolicy, cache_layers, make_cache
from gemma4_mlx.kv.cache import SlidingKVCache, TurboQuantKVCache
from gemma4_mlx.variants import VARIANTS, variant_config, variant_raw


def _reference(name: str) -> Gemma4TextConfig:
    raw = variant_raw(name)
    raw.pop("model_type")
    return Gemma4TextConfig(**raw)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_layers_match_transformers_config(name):
    ours, ref = variant_config(name), _reference(name)
    assert len(ours.layers) == ref.num_hidden_layers
    for spec, layer_type, mode, layer in zip(
        ours.layers, ref.layer_types, ref.kv_sharing_modes, ref.per_layer_config
    ):
        assert spec.layer_type == layer_type
        assert spec.is_kv_shared == (mode == "reuse"), spec.index
        assert (spec.head_dim, spec.n_kv_heads) == (layer.head_dim, layer.num_key_value_heads)
    assert ours.sliding_window == ref.sliding_window
    assert ours.max_position_embeddings == ref.max_position_embeddings


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_cache_plan_owns_one_cache_per_non_shared_layer(name):
    config, ref = variant_config(name), _reference(name)
    owners = [i for i, mode in enumerate(ref.kv_sharing_modes) if mode != "reuse"]
    sliding = [i for i in owners if ref.layer_types[i] == "sliding_attention"]
    assert [s.index for s in cache_layers(config)] == owners
    caches = make_cache(config, KVPolicy("turboquant"))
    kinds = [type(c) for c in caches]
    assert kinds.count(SlidingKVCache) == len(sliding)
    assert kinds.count(TurboQuantKVCache) == len(owners) - len(sliding)
    exact = make_cache(config, KVPolicy())
    assert [type(c) for c in exact].count(KVCache) == len(owners) - len(sliding)
    print(name, f"{len(sliding)} sliding + {len(owners) - len(sliding)} global cache layers")


def test_unknown_variant_is_a_value_error():
    with pytest.raises(ValueError, match="E2B"):
        variant_config("E3B")
