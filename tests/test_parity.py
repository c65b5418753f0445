"""Our MLX decoder against transformers' own Gemma 4 / Gemma 3 on tiny random checkpoints."""

import mlx.core as mx
import numpy as np
import pytest
import tiny

from gemma4_mlx.loading import load_model

NAMES = list(tiny.TINY_CONFIGS)
SEQ = 3 * tiny.WINDOW + 5  # past the sliding window three times over
TOL = 5e-4


def _tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, tiny.VOCAB, size=(batch, length))


def _compare(name: str, what: str, ours: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.abs(ours - ref).max())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{name} {what}: max |logit diff| = {err:.2e}, top-1 agreement = {top1:.3f}")
    assert err <= TOL
    assert top1 == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_prefill_matches_transformers_batch_of_two(name, tiny_checkpoints):
    path, ref = tiny_checkpoints(name)
    model, _ = load_model(path)
    tokens = _tokens(2, SEQ)  # two different prompts
    _compare(name, "prefill", np.array(model(mx.array(tokens))), tiny.reference_logits(ref, tokens))


@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_prefill_past_sliding_window(name, tiny_checkpoints):
    path, ref = tiny_checkpoints(name)
    model, _ = load_model(path)
    tokens = _tokens(2, SEQ, seed=1)
    cache = model.make_cache()
    steps = [np.array(model(mx.array(tokens[:, t : t + 1]), cache=cache)) for t in range(SEQ)]
    _compare(
        name,
        "token-by-token decode",
        np.concatenate(steps, axis=1),
        tiny.reference_logits(ref, tokens),
    )


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_through_cache_matches_transformers(name, tiny_checkpoints):
    path, ref = tiny_checkpoints(name)
    model, _ = load_model(path)
    tokens = _tokens(1, SEQ, seed=2)
    cache = model.make_cache()
    chunks = [tokens[:, i : i + 5] for i in range(0, SEQ, 5)]  # chunks straddle the window
    outs = [np.array(model(mx.array(c), cache=cache)) for c in chunks]
    _compare(
        name, "chunked prefill", np.concatenate(outs, axis=1), tiny.reference_logits(ref, tokens)
    )


@pytest.mark.parametrize("name", NAMES)
def test_generate_step_matches_transformers_greedy(name, tiny_checkpoints):
    import torch
    from mlx_lm.generate import generate_step

    path, ref = tiny_checkpoints(name)
    model, _ = load_model(path)
    prompt = _tokens(1, 6, seed=3)[0]
    n_new = 2 * tiny.WINDOW + 4
    ours = [int(tok) for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n_new)]
    with torch.no_grad():
        out = ref.generate(
            torch.tensor(prompt[None]),
            max_new_tokens=n_new,
            do_sample=False,
            min_new_tokens=n_new,
            eos_token_id=None,
            pad_token_id=0,
        )
    theirs = out[0, len(prompt) :].tolist()
    print(f"{name}: ours {ours}\n{name}: transformers {theirs}")
    assert ours == theirs


@pytest.mark.parametrize("name", NAMES)
def test_cached_multi_token_call_returns_every_position(name, tiny_checkpoints):
    """The output shape never depends on the cache (E2B/E4B's consumer-layer skip is internal);
    ``last_only`` is the explicit fast path and gives the last row of the full call."""
    path, _ = tiny_checkpoints(name)
    model, _ = load_model(path)
    tokens = mx.array(_tokens(1, 9, seed=4))
    full = model(tokens, cache=model.make_cache())
    assert full.shape[1] == 9
    last = model(tokens, cache=model.make_cache(), last_only=True)
    assert last.shape[1] == 1
    err = float(mx.abs(full[:, -1:] - last).max())
    print(f"{name}: last_only vs full call, last row max |diff| {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_per_layer_inputs_argument_equals_ids(name, tiny_checkpoints):
    """mlx-lm's ``per_layer_inputs=`` (the token half of the PLE) gives the same logits as ids."""
    path, _ = tiny_checkpoints(name)
    model, _ = load_model(path)
    text = model.language_model.model if hasattr(model, "language_model") else model.model
    if not text.config.hidden_size_per_layer_input:
        pytest.skip("no per-layer embeddings in this config")
    tokens = mx.array(_tokens(1, 7, seed=5))
    ref = model(tokens)
    got = model(tokens, per_layer_inputs=text.embed_per_layer(tokens))
    assert float(mx.abs(ref - got).max()) == 0.0
