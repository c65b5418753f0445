"""Gemma 4's assistant drafter (``gemma4_assistant``, multi-token prediction), in forward order.

transformers 5.24: ``Gemma4AssistantForCausalLM`` (the model) and
``SinglePositionMultiTokenCandidateGenerator`` (how it drafts). A small gemma4_text stack with
no KV cache and no K/V projections of its own: every layer attends to the keys/values the
target stored at its last cache-owning sliding and full-attention layers. One draft step:

    x = [target_embed(token) * sqrt(H_target), target_hidden]   (1, 1, 2 * backbone_hidden_size)
    h = layers(pre_projection(x)) at the fixed position p of ``token``, then the final norm
    logits = lm_head(h)  (tied to embed_tokens, no softcap) or the centroid-masked head
    next target_hidden = post_projection(h)                    (1, 1, backbone_hidden_size)

The next step feeds the drafted token with that projected state, at the same position p and over
the same target keys/values: drafting N tokens costs N small forward passes and no target call.
Module names follow the HF checkpoint (``model.layers.*``, ``pre_projection``,
``masked_embedding.centroids``), so Google's safetensors load as they are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma4_mlx.config import AssistantConfig, TextConfig
from gemma4_mlx.errors import UserError
from gemma4_mlx.models.text import TextModel


class MaskedEmbedder(nn.Module):
    """The centroid-masked head (``use_ordered_embeddings``; E2B/E4B assistants).

    The vocabulary is split into ``num_centroids`` clusters of vocab / num_centroids tokens
    (``token_ordering`` lists the token ids cluster by cluster). The head scores the clusters,
    keeps the top-k, and computes logits only for their tokens (k * vocab / num_centroids of
    them, e.g. 32 * 128 = 4096 of 262144); every other token gets min(those logits) - 1."""

    def __init__(self, hidden: int, vocab: int, num_centroids: int, top_k: int):
        super().__init__()
        self.centroids = nn.Linear(hidden, num_centroids, bias=False)
        self.token_ordering = mx.zeros((vocab,), dtype=mx.int32)
        self._top_k, self._per_cluster = top_k, vocab // num_centroids

    def __call__(self, h: mx.array, head_rows: Any) -> mx.array:
        """h (B, L, H), ``head_rows(ids)`` -> the head's rows for token ids; -> (B, L, vocab)."""
        B, L, _ = h.shape
        scores = self.centroids(h)  # (B, L, num_centroids)
        top = mx.argpartition(-scores, kth=self._top_k - 1, axis=-1)[..., : self._top_k]
        clusters = self.token_ordering.reshape(-1, self._per_cluster)  # (num_centroids, V / C)
        ids = clusters[top].reshape(B, L, -1)  # (B, L, k * V / C) token ids
        rows = head_rows(ids)  # (B, L, k * V / C, H)
        selected = (rows @ h[..., None])[..., 0]  # (B, L, k * V / C)
        out = mx.full((B, L, self.token_ordering.shape[0]), selected.min() - 1, selected.dtype)
        return mx.put_along_axis(out, ids, selected, axis=-1)


class Assistant(nn.Module):
    """The drafter: ``draft_step`` maps (token, target hidden, target keys/values) to logits
    and the next hidden state. ``make_cache`` is empty: it keeps no cache of its own."""

    is_assistant = True
    model_type = "gemma4_assistant"

    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.assistant_config = config
        text = config.text
        # Every layer reads the target's keys/values: no K/V projections, no cache of its own
        # (kv_source -1: "not a layer of this stack").
        text = replace(
            text,
            num_kv_shared_layers=text.num_hidden_layers,
            layers=tuple(replace(s, kv_source=-1) for s in text.layers),
        )
        self.config: TextConfig = text
        self.model = TextModel(text)
        hidden, backbone = text.hidden_size, config.backbone_hidden_size
        self.pre_projection = nn.Linear(2 * backbone, hidden, bias=False)
        self.post_projection = nn.Linear(hidden, backbone, bias=False)
        if not text.tie_word_embeddings:
            self.lm_head = nn.Linear(hidden, text.vocab_size, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(
                hidden, text.vocab_size, config.num_centroids, config.centroid_intermediate_top_k
            )

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, policy: Any = None) -> list:
        return []

    def draft_step(
        self, x: mx.array, position: int, target_kv: dict[str, tuple]
    ) -> tuple[mx.array, mx.array]:
        """x (B, 1, 2 * backbone): [scaled target embedding of the token, target hidden state];
        ``position``: the token's position (the queries' RoPE position); ``target_kv``: layer
        type -> (keys, values, mask, cache) of the target's stored layer of that type.
        -> (logits (B, 1, vocab), next hidden state (B, 1, backbone))."""
        h = self.hidden(x, position, target_kv)
        return self.logits(h), self.post_projection(h)

    def hidden(self, x: mx.array, position: int, target_kv: dict[str, tuple]) -> mx.array:
        """``draft_step``'s final normed hidden state (B, 1, H): what the head maps."""
        h = self.pre_projection(x)
        for layer in self.model.layers:
            keys, values, mask, cache = target_kv[layer.layer_type]
            h, _ = layer(h, mask, None, (keys, values, position, cache))
        return self.model.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        if "masked_embedding" in self:
            return self.masked_embedding(h, self._head_rows)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    def _head_rows(self, ids: mx.array) -> mx.array:
        """The output head's rows (token vectors) for ``ids``, dequantized if need be."""
        if "lm_head" not in self:
            return self.model.embed_tokens(ids)
        head = self.lm_head
        if isinstance(head, nn.QuantizedLinear):
            return mx.dequantize(
                head.weight[ids], head.scales[ids], head.biases[ids], head.group_size, head.bits
            )
        return head.weight[ids]

    def check_target(self, target: TextConfig) -> None:
        """UserError unless this drafter was made for ``target``'s shape: the same vocabulary,
        hidden size, and per layer type the head dim and kv heads of the layer it reads."""
        cfg, backbone = self.config, self.assistant_config.backbone_hidden_size
        if target.model_type != "gemma4_text":
            raise UserError(
                f"a gemma4_assistant drafter drafts for Gemma 4 targets, not {target.model_type}"
            )
        if target.vocab_size != cfg.vocab_size:
            raise UserError(
                f"the assistant drafter's vocabulary ({cfg.vocab_size} tokens) differs from the "
                f"target's ({target.vocab_size}); use the assistant made for this model"
            )
        if target.hidden_size != backbone:
            raise UserError(
                f"the assistant drafter was made for a target of hidden size {backbone}, this "
                f"target's is {target.hidden_size}; use the assistant made for this model size"
            )
        stored = {s.layer_type: s for s in target.layers if not s.is_kv_shared}
        if len(stored) < 2:  # every Gemma 4 has both; the drafter's loop reads both
            raise UserError(
                "a gemma4_assistant drafter reads a sliding and a full-attention layer of the "
                f"target, which has only {', '.join(stored) or 'neither'}"
            )
        for layer in cfg.layers:
            src = stored.get(layer.layer_type)
            if src is None or (src.head_dim, src.n_kv_heads) != (layer.head_dim, layer.n_kv_heads):
                have = "none" if src is None else f"head_dim {src.head_dim}, {src.n_kv_heads} kv"
                raise UserError(
                    f"the assistant drafter's {layer.layer_type} layers read head_dim "
                    f"{layer.head_dim} with {layer.n_kv_heads} kv heads, the target's last such "
                    f"layer has {have}; use the assistant made for this model size"
                )

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF names are this module tree's; drop the tied head and RoPE buffers."""
        out = {}
        for name, value in weights.items():
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith("token_ordering"):
                value = value.astype(mx.int32)
            out[name] = value
        return out

    @property
    def quant_predicate(self):
        def predicate(path: str, _module) -> bool | dict:
            # The cluster scores pick which 1/64 of the vocabulary gets logits: keep them at 8.
            if path.endswith("masked_embedding.centroids"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate


__all__ = ["Assistant", "MaskedEmbedder"]
