"""Tiny random checkpoints in the HF layout, built with transformers' own classes.

- ``TINY_CONFIGS``: name -> kwargs of a transformers text config shaped like a real variant
  (E2B: PLE + KV sharing + double-wide MLP; E4B; 26B-A4B: MoE + k_eq_v + global kv heads;
  31B: k_eq_v, many layers; gemma3: the Gemma 3 text decoder of the real 270M demo model).
- ``build_reference(name, seed)``: the transformers model (float32, eval, eager attention) with
  EVERY saved parameter and buffer perturbed away from its init, so that a missing norm weight,
  layer_scalar or router scale cannot hide behind an all-ones default.
- ``write_checkpoint(name, out_dir, seed)``: save_pretrained (safetensors) and return
  (out_dir, torch_model).
- ``reference_logits(torch_model, tokens)``: float32 numpy logits for an int array (B, L).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WINDOW = 8
VOCAB = 512

_GEMMA4_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    head_dim=16,
    sliding_window=WINDOW,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    final_logit_softcapping=30.0,
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
_S, _F = "sliding_attention", "full_attention"

TINY_CONFIGS: dict[str, dict] = {
    # E2B: (4 sliding + 1 full) x2, last 5 layers read layers 3 (sliding) and 4 (full).
    "e2b": dict(
        _GEMMA4_COMMON,
        model_type="gemma4_text",
        num_hidden_layers=10,
        layer_types=[_S, _S, _S, _S, _F] * 2,
        num_key_value_heads=1,
        global_head_dim=32,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=5,
        use_double_wide_mlp=True,
    ),
    # E4B: (5+1) x2, two kv heads, last 4 layers shared.
    "e4b": dict(
        _GEMMA4_COMMON,
        model_type="gemma4_text",
        num_hidden_layers=12,
        layer_types=[_S] * 5 + [_F] + [_S] * 5 + [_F],
        num_key_value_heads=2,
        global_head_dim=32,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=4,
    ),
    # 26B-A4B: MoE (8 experts, top-2) in parallel with the dense MLP, k_eq_v, 1 global kv head.
    "26b": dict(
        _GEMMA4_COMMON,
        model_type="gemma4_text",
        num_hidden_layers=6,
        layer_types=[_S] * 5 + [_F],
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        global_head_dim=32,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=32,
    ),
    # 31B: k_eq_v, global kv heads, (5+1) x2.
    "31b": dict(
        _GEMMA4_COMMON,
        model_type="gemma4_text",
        num_hidden_layers=12,
        layer_types=([_S] * 5 + [_F]) * 2,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        global_head_dim=32,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=0,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
        query_pre_attn_scalar=16,
        max_position_embeddings=1024,
        layer_types=[_S] * 5 + [_F],
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    ),
}


def _config(name: str):
    kwargs = dict(TINY_CONFIGS[name])
    model_type = kwargs.pop("model_type")
    if model_type == "gemma3_text":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**kwargs)
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**kwargs)


def build_reference(name: str, seed: int = 0):
    import torch

    config = _config(name)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    if config.model_type == "gemma3_text":
        from transformers import Gemma3ForCausalLM as cls
    else:
        from transformers import Gemma4ForCausalLM as cls
    model = cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if "norm" in key or "scale" in key or "layer_scalar" in key:
                tensor.add_(0.2 * noise)  # norms, router scales, layer scalars: away from 1 / 0
            else:
                tensor.add_(0.05 * noise)
    return model


def write_checkpoint(name: str, out_dir: str | Path, seed: int = 0):
    out_dir = Path(out_dir)
    model = build_reference(name, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir, model


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def collect_caches(monkeypatch, model) -> list:
    """Every cache list ``model.make_cache`` builds from now on (for tests that look inside the
    caches a generate call used, e.g. that trims or compression happened)."""
    made, build = [], model.make_cache

    def make(policy=None):
        made.append(build(policy))
        return made[-1]

    monkeypatch.setattr(model, "make_cache", make)
    return made


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """n random prompt ids from 11 on: past <eos> (1) and the chat markers, so that no prompt
    token is a stop token."""
    return [int(t) for t in np.random.default_rng(seed).integers(11, VOCAB, size=n)]


def load_target(name: str, tiny_checkpoints, tmp_path_factory) -> tuple:
    """(model, config, tokenizer) of the session's tiny ``name`` checkpoint, with a tokenizer
    of its own (the speculative and assistant tests' target)."""
    from tiny_tokenizer import write_tokenizer

    from gemma4_mlx.loading import load_model, load_tokenizer

    tok_dir = tmp_path_factory.mktemp(f"tok-{name}")
    write_tokenizer(tok_dir)
    model, config = load_model(tiny_checkpoints(name)[0])
    return model, config, load_tokenizer(tok_dir, config)


def _top_k_probs(logits, k: int) -> dict[int, float]:
    import mlx.core as mx

    logits = np.array(logits.astype(mx.float32)).astype(np.float64)
    top = np.argsort(-logits)[:k]
    p = np.exp(logits[top] - logits[top].max())
    return dict(zip(top.tolist(), (p / p.sum()).tolist()))


def sampled_pair_test(model, tokenizer, prompt, draft, num_draft_tokens, k=4, draws=1200):
    """(p value, accepted, drafted): the first two tokens ``generate`` samples with ``draft``
    (temperature 1, top-k ``k``) over ``draws`` seeds, against the target's own joint
    distribution of them, by a chi-square test (a pair outside the top-k raises KeyError)."""
    import mlx.core as mx
    from scipy.stats import chisquare

    from gemma4_mlx.generate import SamplingOptions, generate

    first = _top_k_probs(model(mx.array([prompt]))[0, -1], k)
    expected = {}
    for t1, p1 in first.items():
        for t2, p2 in _top_k_probs(model(mx.array([prompt + [t1]]))[0, -1], k).items():
            expected[(t1, t2)] = p1 * p2
    counts = dict.fromkeys(expected, 0)
    accepted = drafted = 0
    for seed in range(draws):
        sampling = SamplingOptions(temp=1.0, top_k=k, seed=seed)
        r = generate(
            model, tokenizer, prompt, 3, sampling, draft_model=draft,
            num_draft_tokens=num_draft_tokens,
        )  # fmt: skip
        counts[tuple(r.tokens[:2])] += 1
        accepted, drafted = accepted + r.accepted_tokens, drafted + r.drafted_tokens
    keys = sorted(expected)
    observed = np.array([counts[key] for key in keys])
    stat, p_value = chisquare(observed, np.array([expected[key] for key in keys]) * draws)
    print(
        f"accepted {accepted}/{drafted} drafts; chi2 {stat:.1f} over {len(keys)} bins, p {p_value:.3f}"
    )
    return p_value, accepted, drafted
