"""The Gemma 4 / Gemma 3 text decoder, in forward-pass order.

One config-driven decoder for every variant (E2B, E4B, 26B-A4B, 31B, and Gemma 3 text). Modules
are named exactly like mlx-lm's (``mlx_lm/models/gemma4_text.py``, ``gemma3_text.py``), so weights
we write load in mlx-lm and mlx-lm conversions load here.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.switch_layers import SwitchGLU

from gemma4_mlx.config import SLIDING, LayerSpec, ModelConfig, TextConfig
from gemma4_mlx.models.attention import attend
from gemma4_mlx.models.rope import RoPE

log = logging.getLogger(__name__)


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


@partial(mx.compile, shapeless=True)
def softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (offset + w); Gemma 3 has offset 1, Gemma 4 offset 0."""

    def __init__(self, dims: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = mx.ones((dims,)) if offset == 0.0 else mx.zeros((dims,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight + self.offset if self.offset else self.weight
        return mx.fast.rms_norm(x, w, self.eps)


class RMSNormNoScale(nn.Module):
    """Weightless RMSNorm (Gemma 4 v_norm, router and PLE-free paths)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, None, self.eps)


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """MoE router: rmsnorm_noscale(x) * scale * H^-0.5 -> proj -> softmax -> top-k -> renorm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = mx.ones((cfg.hidden_size,))
        self.per_expert_scale = mx.ones((cfg.num_experts,))
        self._eps = cfg.rms_norm_eps
        self._root = cfg.hidden_size**-0.5
        self._top_k = cfg.top_k_experts

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        x = mx.fast.rms_norm(x, self.scale * self._root, self._eps)
        scores = self.proj(x).astype(mx.float32)
        top = mx.argpartition(-scores, kth=self._top_k - 1, axis=-1)[..., : self._top_k]
        top = mx.stop_gradient(top)
        # Softmax over the selected logits == full softmax renormalised over the top-k.
        weights = mx.softmax(mx.take_along_axis(scores, top, axis=-1), axis=-1)
        weights = weights * self.per_expert_scale[top]
        return top, weights.astype(x.dtype)


class _GeGLUActivation(nn.Module):
    def __call__(self, up: mx.array, gate: mx.array) -> mx.array:
        return geglu(gate, up)


class Experts(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.switch_glu = SwitchGLU(
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts,
            activation=_GeGLUActivation(),
            bias=False,
        )

    def __call__(self, x: mx.array, top: mx.array, weights: mx.array) -> mx.array:
        y = self.switch_glu(x, top)  # (B, L, k, H)
        return (y * weights[..., None]).sum(axis=-2)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = spec.n_kv_heads
        self.head_dim = spec.head_dim
        self.scale = cfg.attention_scale
        h, d = cfg.hidden_size, spec.head_dim
        offset = cfg.norm_offset
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, offset)
        if not spec.is_kv_shared:
            self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
            if not spec.k_eq_v:
                self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, offset)
        # Gemma 4 normalises values (no weight); Gemma 3 does not.
        self._v_norm = None if cfg.is_gemma3 else RMSNormNoScale(cfg.rms_norm_eps)
        self.rope = RoPE(d, cfg.rope[spec.layer_type])

    def __call__(self, x: mx.array, mask: Any, cache: Any, shared: tuple | None) -> tuple:
        """Returns (output, kv) where kv = (keys, values, offset, cache) for KV-shared consumers."""
        B, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        if shared is not None:  # KV-shared consumer: the producer's keys/values and positions
            keys, values, offset, cache = shared
        else:
            offset = cache.offset if cache is not None else 0
            raw = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
            values = (
                raw
                if self.spec.k_eq_v
                else self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
            )
            keys = self.rope(self.k_norm(raw).transpose(0, 2, 1, 3), offset=offset)
            if self._v_norm is not None:
                values = self._v_norm(values)
            values = values.transpose(0, 2, 1, 3)  # (B, n_kv, L, D)
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
        queries = self.rope(queries.transpose(0, 2, 1, 3), offset=offset)
        out = attend(queries, keys, values, scale=self.scale, mask=mask, cache=cache)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out), (keys, values, offset, cache)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.layer_type = spec.layer_type
        h, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(h, spec.mlp_width)
        self.input_layernorm = RMSNorm(h, eps, off)
        self.post_attention_layernorm = RMSNorm(h, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, off)
        self.post_feedforward_layernorm = RMSNorm(h, eps, off)
        self._moe = cfg.enable_moe_block
        if self._moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps, off)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps, off)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps, off)
        self._ple = cfg.hidden_size_per_layer_input
        if self._ple:
            self.per_layer_input_gate = nn.Linear(h, self._ple, bias=False)
            self.per_layer_projection = nn.Linear(self._ple, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps, off)
        if not cfg.is_gemma3:
            self.layer_scalar = mx.ones((1,))

    def __call__(self, x, mask, cache, shared=None, per_layer_input=None):
        h, kv = self.self_attn(self.input_layernorm(x), mask, cache, shared)
        h = x + self.post_attention_layernorm(h)

        residual = h
        ff = self.mlp(self.pre_feedforward_layernorm(h))
        if self._moe:  # dense MLP and experts in parallel, each with its own post norm
            top, weights = self.router(h)
            experts = self.experts(self.pre_feedforward_layernorm_2(h), top, weights)
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(experts)
        h = residual + self.post_feedforward_layernorm(ff)

        if self._ple:
            gate = nn.gelu_approx(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        if "layer_scalar" in self:
            h = h * self.layer_scalar
        return h, kv


def _last_row(mask: Any) -> Any:
    """The mask of the last query alone: "causal" lets it see every key; an array (a sliding
    window shorter than the keys) keeps its last row."""
    if isinstance(mask, mx.array):
        return mask[..., -1:, :]
    return None


class TextModel(nn.Module):
    """Embeddings (+ per-layer embeddings), the layer stack and the final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, spec) for spec in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self._ple = cfg.hidden_size_per_layer_input
        if self._ple:
            n = cfg.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(
                cfg.vocab_size_per_layer_input, n * self._ple
            )
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, n * self._ple, bias=False)
            self.per_layer_projection_norm = RMSNorm(self._ple, cfg.rms_norm_eps, cfg.norm_offset)
        # The first cache-owning layer of each type decides that type's mask.
        self._mask_source = {
            t: next(s.index for s in cfg.layers if s.layer_type == t) for t in set(cfg.layer_types)
        }
        # The last cache-owning layer of each type: the keys/values Gemma 4's assistant drafter
        # reads (transformers' kv_sharing_modes marks them "store").
        owners = [s for s in cfg.layers if not s.is_kv_shared]
        self._stored_layers = {s.layer_type: s.index for s in owners}

    def embed_per_layer(self, ids: mx.array) -> mx.array:
        """(B, L, n_layers, ple): the token half of the per-layer inputs, embed_pl(ids) * sqrt(ple).

        mlx-lm's ``per_layer_inputs``; a multimodal model passes it with the pad id at media slots.
        """
        n = self.config.num_hidden_layers
        tok = self.embed_tokens_per_layer(ids)
        tok = tok * mx.array(self._ple**0.5, dtype=tok.dtype)
        return tok.reshape(*ids.shape, n, self._ple)

    def _mix_per_layer(self, h: mx.array, tok: mx.array) -> mx.array:
        """(B, L, n_layers, ple): (norm(proj(h) * H^-0.5) + tok) * 2^-0.5."""
        cfg, n = self.config, self.config.num_hidden_layers
        ctx = self.per_layer_model_projection(h) * (cfg.hidden_size**-0.5)
        ctx = self.per_layer_projection_norm(ctx.reshape(*h.shape[:-1], n, self._ple))
        return (ctx + tok.astype(ctx.dtype)) * (2.0**-0.5)

    def _masks(self, h: mx.array, cache: list) -> dict[str, Any]:
        masks = {}
        for t, i in self._mask_source.items():
            window = self.config.sliding_window if t == SLIDING else None
            masks[t] = create_attention_mask(h, cache[i], window_size=window)
        return masks

    def __call__(
        self,
        inputs: mx.array | None,
        cache=None,
        input_embeddings: mx.array | None = None,
        per_layer_inputs: mx.array | None = None,
        last_only: bool = False,
        stored: dict | None = None,
    ):
        """Hidden states (B, L, H) for every position, or (B, 1, H) with ``last_only``.

        ``input_embeddings`` are unscaled token embeddings (mlx-lm's convention: the model
        multiplies them by sqrt(H)); ``per_layer_inputs`` is ``embed_per_layer(ids)``;
        ``stored``: see ``decode``.
        """
        if input_embeddings is None:
            input_embeddings = self.embed_tokens(inputs)
        return self.decode(
            self.scale_embeddings(input_embeddings), inputs, cache, per_layer_inputs, last_only,
            stored=stored,
        )  # fmt: skip

    def scale_embeddings(self, input_embeddings: mx.array) -> mx.array:
        # sqrt(hidden) rounded to the weight dtype, as the reference does (bf16: sqrt(1536) -> 39.25)
        dtype = input_embeddings.dtype
        return input_embeddings * mx.array(self.config.hidden_size**0.5, dtype=dtype)

    def decode(
        self,
        h: mx.array,
        inputs: mx.array | None = None,
        cache=None,
        per_layer_inputs: mx.array | None = None,
        last_only: bool = False,
        masks: dict[str, Any] | None = None,
        stored: dict | None = None,
    ) -> mx.array:
        """The layer stack over already-scaled embeddings h (B, L, H): the entry point of a
        multimodal model, whose soft tokens are not scaled by sqrt(H). ``masks`` (layer type ->
        mask) replaces the causal/sliding mask of those layer types (the bidirectional image
        overlay of 26B/31B sliding layers). ``stored`` (a dict) receives, per layer type, what
        the last cache-owning layer of that type attended to: (keys, values, offset, cache) as
        its cache returned them, covering the positions up to offset + L."""
        cfg = self.config
        per_layer = None
        if self._ple:
            if per_layer_inputs is None:
                if inputs is None:
                    raise ValueError(
                        "per-layer embeddings need token ids (inputs) or per_layer_inputs"
                    )
                per_layer_inputs = self.embed_per_layer(inputs)
            per_layer = self._mix_per_layer(h, per_layer_inputs)

        cache = list(cache) if cache is not None else []
        cache = cache + [None] * (len(self.layers) - len(cache))
        masks = {**self._masks(h, cache), **(masks or {})}
        kvs: list[tuple | None] = [None] * len(self.layers)
        # Consumers of shared K/V write no cache, so when only the last position is wanted
        # they run on it alone (an internal fast path of prefill; the output keeps its meaning).
        cut = cfg.first_kv_shared_layer if cfg.num_kv_shared_layers else None
        dropped = 0  # leading positions cut off: the last query's RoPE position moves by this
        for i, layer in enumerate(self.layers):
            spec = layer.spec
            if last_only and i == cut and h.shape[1] > 1:
                dropped = h.shape[1] - 1
                h = h[:, -1:]
                per_layer = per_layer[:, -1:] if per_layer is not None else None
                masks = {t: _last_row(m) for t, m in masks.items()}
            shared = None
            if spec.is_kv_shared:
                keys, values, offset, producer = kvs[spec.kv_source]
                shared = (keys, values, offset + dropped, producer)
            pli = per_layer[:, :, i] if per_layer is not None else None
            h, kvs[i] = layer(h, masks[spec.layer_type], cache[i], shared, pli)
        if last_only:
            h = h[:, -1:]
        if stored is not None:
            stored.update({t: kvs[i] for t, i in self._stored_layers.items()})
        return self.norm(h)


class CausalLM(nn.Module):
    """mlx-lm's model protocol over the decoder: logits, layers, make_cache, sanitize."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model_type = cfg.model_type
        self.model = TextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: mx.array | None = None,
        per_layer_inputs: mx.array | None = None,
        last_only: bool = False,
    ):
        """Logits (B, L, vocab) for every input position, with or without a cache;
        ``last_only`` gives (B, 1, vocab) and skips work no other position needs."""
        h = self.model(inputs, cache, input_embeddings, per_layer_inputs, last_only)
        return self.logits(h)

    def hidden_states(self, inputs: mx.array, cache=None, stored: dict | None = None):
        """Final (normed) hidden states (B, L, H) for every position: ``logits(h)`` gives this
        call's logits. ``stored``: see ``TextModel.decode`` (what an assistant drafter reads)."""
        return self.model(inputs, cache, stored=stored)

    def logits(self, h: mx.array) -> mx.array:
        """Final hidden states (B, L, H) -> softcapped logits (B, L, vocab)."""
        logits = self.lm_head(h) if "lm_head" in self else self.model.embed_tokens.as_linear(h)
        if self.config.final_logit_softcapping:
            logits = softcap(logits, self.config.final_logit_softcapping)
        return logits

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, policy=None):
        """One cache per cache-owning layer, for ``policy`` or, by default, the policy bound to
        this model (``load(..., kv_policy=...)``; the exact cache if none), so that mlx-lm's
        ``make_prompt_cache(model)`` builds our caches."""
        from gemma4_mlx.cache import bound_policy, make_cache

        return make_cache(self.config, policy if policy is not None else bound_policy(self))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF (or mlx-lm) names -> this module tree; drops what the decoder does not use."""
        cfg = self.config
        out = {}
        for name, value in normalize_weight_names(weights).items():
            if "rotary_emb" in name or name.endswith(
                ("input_max", "input_min", "output_max", "output_min")
            ):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            layer = _layer_index(name)
            if (
                layer is not None
                and cfg.layers[layer].is_kv_shared
                and any(
                    f".self_attn.{p}." in name for p in ("k_proj", "v_proj", "k_norm", "v_norm")
                )
            ):
                continue  # consumers read their producer's K/V; checkpoints may still carry these
            if name.endswith(".experts.gate_up_proj"):  # (E, 2I, H) fused -> SwitchGLU's two
                base = name.removesuffix(".gate_up_proj")
                gate, up = mx.split(value, 2, axis=-2)
                out[f"{base}.switch_glu.gate_proj.weight"] = mx.contiguous(gate)
                out[f"{base}.switch_glu.up_proj.weight"] = mx.contiguous(up)
                continue
            if name.endswith(".experts.down_proj"):
                out[name.removesuffix(".down_proj") + ".switch_glu.down_proj.weight"] = value
                continue
            out[name] = value
        return out

    @property
    def quant_predicate(self):
        def predicate(path: str, _module) -> bool | dict:
            # The MoE router and per-layer embeddings go wrong at 4 bits: keep them at 8.
            if path.endswith("router.proj") or "embed_tokens_per_layer" in path:
                return {"group_size": 64, "bits": 8}
            return True

        return predicate


def _layer_index(name: str) -> int | None:
    if "layers." not in name:
        return None
    try:
        return int(name.split("layers.")[1].split(".")[0])
    except ValueError:
        return None


_SKIPPED_PREFIXES = (
    "vision_tower",
    "multi_modal_projector",
    "audio_tower",
    "embed_audio",
    "embed_vision",
    "vision_embedder",
)


def normalize_weight_names(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map every known checkpoint layout onto the text tree (``model.layers...``, ``lm_head``).

    HF Gemma4ForConditionalGeneration (``model.language_model.*``), mlx-lm's gemma4 wrapper
    (``language_model.model.*``), HF Gemma3ForConditionalGeneration (``language_model.model.*``)
    and plain text checkpoints. Vision/audio towers are dropped with one log line.
    """
    text, skipped = {}, set()
    for name, value in weights.items():
        key = name
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("language_model.model."):
            key = "model." + key.removeprefix("language_model.model.")
        elif key.startswith("language_model."):
            key = key.removeprefix("language_model.")
        bare = key.removeprefix("model.")
        if bare.startswith(_SKIPPED_PREFIXES):
            skipped.add(bare.split(".")[0])
            continue
        text[key] = value
    if skipped:
        log.info("skipping weights the text decoder does not use: %s", ", ".join(sorted(skipped)))
    return text


class MultimodalWrapper(nn.Module):
    """The ``gemma4``/``gemma3`` config wrapper: the decoder under ``language_model`` as in
    mlx-lm's gemma4.py, so weight names match mlx-lm conversions. Text only: Gemma 3, and Gemma 4
    without a vision_config or loaded ``text_only`` (models/multimodal.py has the towers)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.model_type = config.model_type
        self.language_model = CausalLM(config.text)

    @property
    def config(self) -> TextConfig:
        return self.language_model.config

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: mx.array | None = None,
        per_layer_inputs: mx.array | None = None,
        last_only: bool = False,
    ):
        return self.language_model(inputs, cache, input_embeddings, per_layer_inputs, last_only)

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self, policy=None):
        return self.language_model.make_cache(policy)

    @property
    def quant_predicate(self):
        return self.language_model.quant_predicate

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        text = self.language_model.sanitize(weights)
        return {"language_model." + k: v for k, v in text.items()}


def build_model(config: ModelConfig, text_only: bool = False) -> nn.Module:
    """The model for a parsed config.json, following mlx-lm's model protocol. A ``gemma4``
    config with a ``vision_config`` gets its vision tower unless ``text_only``."""
    media = config.raw.get("vision_config") or config.raw.get("audio_config")
    if config.model_type == "gemma4" and media and not text_only:
        from gemma4_mlx.models.multimodal import Gemma4Multimodal

        return Gemma4Multimodal(config)
    if config.model_type in ("gemma4", "gemma3"):
        return MultimodalWrapper(config)
    return CausalLM(config.text)


__all__ = ["build_model", "CausalLM", "MultimodalWrapper", "TextModel", "normalize_weight_names"]
