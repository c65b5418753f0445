"""The benchmark harness (gemma4_mlx.bench.common): chunk spans, the lockstep runner, settings."""

import mlx.core as mx
import numpy as np

from gemma4_mlx.bench.common import Lockstep, choose, default_policy, setting_name, spans
from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.loading import load_model


def test_spans_cover_the_tokens_and_end_at_every_stop():
    got = spans(12, 5, stops=[7, 12, 30])
    assert got == [(0, 5), (5, 7), (7, 12)]
    assert spans(4, 5) == [(0, 4)]


def test_lockstep_feeds_every_setting_the_baselines_chunks(tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints("e2b")[0])
    settings = choose({"affine8": KVPolicy("affine", bits=8)}, "affine8;turboquant")
    assert list(settings)[0] == "fp32" and setting_name(default_policy()) in settings
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 13).tolist()
    lock = Lockstep(model, settings)
    seen, stops, logits = [], [], {n: [] for n in settings}

    def each(start, end, name, out):
        seen.append((start, end, name))
        logits[name].append(np.array(out))

    lock.run(tokens[:9], 4, stops=[6, 9], each=each, on_stop=stops.append)
    lock.run(tokens[9:], 4, stops=[13], each=each, on_stop=stops.append)  # continues at 9
    chunks = [(0, 4), (4, 6), (6, 9), (9, 13)]
    assert seen == [(s, e, n) for s, e in chunks for n in settings]  # baseline first
    assert stops == [6, 9, 13] and lock.fed == 13
    assert all(c.offset == 13 for caches in lock.caches.values() for c in caches)
    # the exact cache's chunked logits are the whole prompt's in one call
    whole = np.array(model(mx.array([tokens]))[0])
    err = np.abs(np.concatenate(logits["fp32"]) - whole).max()
    print(f"chunked vs whole-prompt logits, exact cache: max error {err:.2e}")
    assert err < 1e-4
    branch = lock.branch()
    branch.feed(tokens[:2])
    assert branch.fed == 15 and lock.fed == 13
    assert all(c.offset == 13 for caches in lock.caches.values() for c in caches)
