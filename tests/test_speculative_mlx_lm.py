"""mlx-lm's speculative_generate_step drives our models and caches unchanged: with a draft model
it gives exactly the tokens of greedy generate_step with the same target cache policy.

The draft is a differently seeded tiny model of the same shape blended 1:9 with the target, so
it agrees often but not always: the target accepts some drafts, rejects others, and every cache
is trimmed back (exactly, within max_rewind) by every amount up to the draft length.
"""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
import tiny
from mlx.utils import tree_map
from mlx_lm.generate import generate_step, speculative_generate_step

from gemma4_mlx.cache import KVPolicy, make_cache
from gemma4_mlx.kv.cache import TurboQuantKVCache
from gemma4_mlx.loading import load_model

N_NEW = 24
DRAFT_MIX = 0.1  # the differently seeded model's share of the draft's weights
# The default TurboQuant policy compresses nothing before sink + center (132) tokens and starts
# its second centring block at 516: a prompt of 560 tokens has both behind it.
POLICIES = {
    "exact": (KVPolicy(), 40),
    "affine": (KVPolicy("affine", bits=8), 40),
    "turboquant": (KVPolicy("turboquant"), 560),
}


@pytest.fixture(scope="module")
def draft_checkpoints(tmp_path_factory):
    """name -> checkpoint dir of a tiny model seeded differently from the target's."""
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = tiny.write_checkpoint(name, tmp_path_factory.mktemp(f"draft-{name}"), 1)[0]
        return made[name]

    return get


def _bind(monkeypatch, model, policy, made: list):
    """Until load(kv_policy=) binds a policy, bind it by hand: mlx-lm's make_prompt_cache(model)
    calls model.make_cache() with no argument. ``made`` collects the caches built."""

    def build():
        caches = make_cache(model.config, policy)
        made.append(caches)
        return caches

    monkeypatch.setattr(model, "make_cache", build)


def _count_trims(caches: list, trims: list) -> None:
    for c in caches:
        trim = c.trim

        def counted(n, trim=trim):
            trims.append(n)
            return trim(n)

        c.trim = counted


@pytest.mark.parametrize("kind", list(POLICIES))
@pytest.mark.parametrize("name", list(tiny.TINY_CONFIGS))
def test_speculative_decoding_gives_the_greedy_tokens(
    name, kind, tiny_checkpoints, draft_checkpoints, monkeypatch
):
    policy, n_prompt = POLICIES[kind]
    model, config = load_model(tiny_checkpoints(name)[0])
    if kind == "affine" and any(s.head_dim % 32 for s in config.text.layers if not s.is_sliding):
        pytest.skip("mlx-lm's affine quantization needs a head dim divisible by 32")
    draft, _ = load_model(draft_checkpoints(name))
    mix = lambda own, other: (1 - DRAFT_MIX) * own + DRAFT_MIX * other  # noqa: E731
    draft.update(tree_map(mix, model.parameters(), draft.parameters()))
    prompt = mx.array(np.random.default_rng(0).integers(3, tiny.VOCAB, size=n_prompt))

    greedy = [
        int(t)
        for t, _ in generate_step(
            prompt, model, max_tokens=N_NEW, prompt_cache=make_cache(model.config, policy)
        )
    ]
    made, trims = [], []
    _bind(monkeypatch, model, policy, made)
    _bind(monkeypatch, draft, policy, [])
    out = []
    for token, _, from_draft in speculative_generate_step(
        prompt, model, draft, num_draft_tokens=3, max_tokens=N_NEW
    ):
        if not out:  # the target's caches exist once the first token is out
            _count_trims(made[0], trims)
        out.append((int(token), from_draft))
    tokens = [t for t, _ in out]
    accepted = sum(d for _, d in out)
    print(f"{name} {kind}: greedy {greedy}\n{name} {kind}: speculative {tokens}")
    rounds = Counter(trims[:: len(made[0])])  # one entry per trim of the whole cache list
    print(f"{name} {kind}: {accepted}/{N_NEW} drafts accepted; trims (tokens: times) {rounds}")
    assert tokens == greedy
    assert any(n > 0 for n in trims)  # drafts were rejected and the target cache trimmed back
    if kind == "turboquant":
        tq = [c for c in made[0] if isinstance(c, TurboQuantKVCache)]
        assert tq and all(c.keys.n_quantized > c.keys.n_sink for c in tq)
        assert all(c.keys.means.shape[2] >= 2 for c in tq)  # a centring-block boundary passed
