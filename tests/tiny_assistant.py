"""Tiny random Gemma 4 assistant (MTP) drafters for the tiny targets of tiny.py, built with
transformers' own Gemma4AssistantForCausalLM.

- ``ASSISTANT_FOR``: target name -> the attention shape its drafter must read (the target's
  last sliding and full layers: kv heads, head dims, k_eq_v) and its head: the E2B/E4B shapes
  get the centroid-masked head (``use_ordered_embeddings``, as Google's E2B/E4B assistants),
  26B/31B the tied dense head.
- ``build_assistant(name, seed)``: the transformers model (float32, eval, eager) with every
  float parameter perturbed away from its init and ``token_ordering`` a random permutation.
- ``write_assistant(name, out_dir, seed)``: save_pretrained (safetensors) -> (out_dir, model).
"""

from __future__ import annotations

from pathlib import Path

import tiny

CENTROIDS = 16  # 512 / 16 = 32 tokens per cluster
TOP_K = 4  # 4 clusters -> 128 of the 512 tokens get logits

_S, _F = "sliding_attention", "full_attention"
_COMMON = dict(
    vocab_size=tiny.VOCAB,
    hidden_size=96,  # wide enough that tests/test_assistant.py's fitted head agrees often
    intermediate_size=64,
    num_hidden_layers=4,
    layer_types=[_S, _S, _S, _F],
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    sliding_window=tiny.WINDOW,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=0,
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

ASSISTANT_FOR: dict[str, dict] = {
    "e2b": dict(text=dict(num_key_value_heads=1), ordered=True),
    "e4b": dict(text=dict(num_key_value_heads=2), ordered=True),
    "26b": dict(
        text=dict(num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True),
        ordered=False,
    ),
    "31b": dict(
        text=dict(num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True),
        ordered=False,
    ),
}


def assistant_config(name: str, **overrides):
    from transformers import Gemma4AssistantConfig, Gemma4TextConfig

    spec = ASSISTANT_FOR[name]
    text = Gemma4TextConfig(**dict(_COMMON, **spec["text"]))
    kwargs = dict(
        backbone_hidden_size=tiny.TINY_CONFIGS[name]["hidden_size"],
        use_ordered_embeddings=spec["ordered"],
        num_centroids=CENTROIDS,
        centroid_intermediate_top_k=TOP_K,
    )
    config = Gemma4AssistantConfig(text_config=text, **dict(kwargs, **overrides))
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    return config


def build_assistant(name: str, seed: int = 0, **overrides):
    import torch
    from transformers import Gemma4AssistantForCausalLM

    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(assistant_config(name, **overrides)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("token_ordering"):
                tensor.copy_(torch.randperm(tensor.numel(), generator=gen))
                continue
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if "norm" in key or "layer_scalar" in key:
                tensor.add_(0.2 * noise)  # norms and layer scalars: away from 1
            else:
                tensor.add_(0.3 * noise)  # large enough that drafts are sharp, not uniform
    return model


def write_assistant(name: str, out_dir: str | Path, seed: int = 0, **overrides):
    out_dir = Path(out_dir)
    model = build_assistant(name, seed, **overrides)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir, model
