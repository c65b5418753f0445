"""Gemma 4's assistant drafter against transformers' Gemma4AssistantForCausalLM.

Tiny assistants (tests/tiny_assistant.py, every float tensor perturbed, token_ordering a
random permutation) for the tiny Gemma 4 targets of tests/tiny.py. The prompt is longer than
the sliding window (8), so the drafter's sliding layers see only part of the target's keys.
"""

import mlx.core as mx
import numpy as np
import pytest
import tiny
import tiny_assistant

from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.loading import load_assistant, load_model
from gemma4_mlx.speculative import TargetKV, _draft

torch = pytest.importorskip("torch")

PROMPT = 20
STEPS = 4
TOL = 5e-4


@pytest.fixture(scope="module")
def pairs(tiny_checkpoints, tmp_path_factory):
    """name -> (MLX target, MLX assistant, HF target, HF assistant)."""
    made = {}

    def get(name: str):
        if name not in made:
            target_dir, hf_target = tiny_checkpoints(name)
            out = tmp_path_factory.mktemp(f"assistant-{name}")
            _, hf_assistant = tiny_assistant.write_assistant(name, out)
            made[name] = (
                load_model(target_dir)[0],
                load_assistant(out)[0],
                hf_target,
                hf_assistant,
            )
        return made[name]

    return get


def _ids(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(11, tiny.VOCAB, size=n)]


def _reference_drafts(hf_target, hf_assistant, ids: list[int], p: int, steps: int):
    """transformers' drafting (SinglePositionMultiTokenCandidateGenerator.get_candidates, greedy)
    from position p: the target's states over ``ids`` cut to positions < p, the hidden state
    at p - 1, the token ids[p]."""
    with torch.no_grad():
        out = hf_target(
            torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True,
            use_cache=False,
        )  # fmt: skip
        shared = {k: (v[0][:, :, :p], v[1][:, :, :p]) for k, v in out.shared_kv_states.items()}
        hidden = out.hidden_states[-1][:, p - 1 : p]
        token = torch.tensor([[ids[p]]])
        logits = []
        for _ in range(steps):
            x = torch.cat([hf_target.get_input_embeddings()(token), hidden], dim=-1)
            o = hf_assistant(
                inputs_embeds=x, position_ids=torch.tensor([[p]]), shared_kv_states=shared,
                attention_mask=torch.ones(1, p + 1, dtype=torch.long),
            )  # fmt: skip
            token, hidden = o.logits.argmax(-1), o.last_hidden_state
            logits.append(o.logits[0, -1].numpy())
    return np.stack(logits)


def _our_drafts(target, assistant, ids, p, steps, splits, fed=None, policy=None):
    """Our drafting from position p after the target's calls over ids[: splits[0]], ...,
    ids[splits[-1] : fed] (positions >= p that it saw play rejected drafts)."""
    lm = target.language_model if hasattr(target, "language_model") else target
    cache, stored, kv, hs = target.make_cache(policy), {}, None, []
    bounds = [0, *splits, len(ids) if fed is None else fed]
    for a, b in zip(bounds, bounds[1:]):
        hs.append(lm.hidden_states(mx.array([ids[a:b]]), cache, stored))
        kv = TargetKV.after_call(stored, b, kv)
    hidden = mx.concatenate(hs, axis=1)[:, p - 1 : p]
    view = kv.for_position(p, lm.config.sliding_window)
    tokens, logits, _ = _draft(lm, assistant, ids[p], hidden, view, p, steps, None)
    return np.array(logits), tokens.tolist()


@pytest.mark.parametrize("name", list(tiny_assistant.ASSISTANT_FOR))
def test_drafted_logits_match_transformers_after_the_prompt(name, pairs):
    """Round one: the drafter reads the prompt's states (fed in two calls, the last of one
    token, so the sliding keys come from both) and drafts from the target's first token."""
    target, assistant, hf_target, hf_assistant = pairs(name)
    ids = _ids(PROMPT + 1)
    want = _reference_drafts(hf_target, hf_assistant, ids, PROMPT, STEPS)
    got, tokens = _our_drafts(target, assistant, ids, PROMPT, STEPS, [PROMPT - 1], fed=PROMPT)
    err = float(np.abs(got - want).max())
    print(f"{name}: drafted logits max abs error {err:.2e} (logits up to {np.abs(want).max():.1f})")
    assert err <= TOL
    assert tokens == want.argmax(-1).tolist()


@pytest.mark.parametrize("name", ["e2b", "26b"])
def test_drafted_logits_match_transformers_after_rejected_drafts(name, pairs):
    """A later round: the target's last call scored [token, d1, d2, d3] and kept d1, so the
    drafter starts from the target's token after d1 and must not read d2, d3's keys."""
    target, assistant, hf_target, hf_assistant = pairs(name)
    ids = _ids(PROMPT + 4, seed=1)
    p = PROMPT + 2  # ids[PROMPT + 2] plays the target's token that replaced d2
    want = _reference_drafts(hf_target, hf_assistant, ids, p, STEPS)
    got, _ = _our_drafts(target, assistant, ids, p, STEPS, [PROMPT])
    err = float(np.abs(got - want).max())
    print(f"{name}: drafted logits after rejections, max abs error {err:.2e}")
    assert err <= TOL


def test_drafting_reads_quantized_and_compressed_target_keys(pairs):
    """Through the affine cache the drafter's logits stay close to the exact cache's; through
    TurboQuant (tokens compressed to 3/2 bits) it reads the stream views, compressed tokens
    included: finite logits that differ (how much is the codec's business, not the drafter's)."""
    target, assistant, *_ = pairs("26b")  # the dense head: no cluster choice that can flip
    ids = _ids(48, seed=2)
    exact, _ = _our_drafts(target, assistant, ids, 44, STEPS, [40])
    affine, _ = _our_drafts(
        target, assistant, ids, 44, STEPS, [40], policy=KVPolicy("affine", bits=8)
    )
    err = float(np.abs(affine - exact).max())
    print(f"affine:8: drafted logits vs the exact cache's, max abs difference {err:.3f}")
    assert 0 < err < 0.05 * np.abs(exact).max()
    policy = KVPolicy("turboquant", sink=2, fp_window=4, center=8, center_block=16)
    got, _ = _our_drafts(target, assistant, ids, 44, STEPS, [40], policy=policy)
    err = float(np.abs(got - exact).max())
    print(f"{policy}: drafted logits vs the exact cache's, max abs difference {err:.3f}")
    assert np.isfinite(got).all() and err > 0


@pytest.mark.parametrize("name", ["e2b", "26b"])
def test_speculative_tokens_match_transformers_assisted_generation(name, pairs, tmp_path):
    """The whole loop, greedy: our tokens are those transformers' assisted generation with the
    same drafter gives (and plain greedy decoding's)."""
    from tiny_tokenizer import write_tokenizer

    from gemma4_mlx.config import parse_config
    from gemma4_mlx.generate import generate
    from gemma4_mlx.loading import load_tokenizer

    target, assistant, hf_target, hf_assistant = pairs(name)
    write_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path, parse_config(tiny.TINY_CONFIGS[name]))
    ids, n_new = _ids(24, seed=3), 16
    hf_assistant.generation_config.num_assistant_tokens = 3
    with torch.no_grad():
        prompt = torch.tensor([ids])
        want = hf_target.generate(
            prompt, assistant_model=hf_assistant, max_new_tokens=n_new, do_sample=False
        )[0, len(ids) :].tolist()
        plain = hf_target.generate(prompt, max_new_tokens=n_new, do_sample=False)
    got = generate(target, tokenizer, ids, n_new, draft_model=assistant, num_draft_tokens=3)
    print(f"{name}: transformers {want}\n{name}: ours         {got.tokens}")
    assert got.tokens == want == plain[0, len(ids) :].tolist()
    assert got.drafted_tokens > 0
