"""HF ``config.json`` -> frozen dataclasses for the text decoder.

Three model types are read: ``gemma4`` (multimodal wrapper; the decoder lives under
``text_config``), ``gemma4_text`` and ``gemma3_text`` (the real 270M demo model runs through the
same decoder). Gemma 4 configs come in two forms: Google's released files carry
``global_head_dim`` / ``num_global_key_value_heads``; newer transformers writes a
``per_layer_config`` map ``{"<layer>": {"head_dim": .., "num_key_value_heads": ..}}`` instead. Both
are read into the same per-layer facts (``LayerSpec``). Every inconsistency is a ``UserError``
naming the field and the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gemma4_mlx.errors import UserError

SUPPORTED_MODEL_TYPES = ("gemma4", "gemma4_text", "gemma3_text", "gemma3")
SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class RopeSpec:
    """One layer type's rotary embedding: default, linear-scaled or Gemma 4 proportional."""

    rope_type: str  # "default" | "linear" | "proportional"
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    """Facts about one decoder layer that the model, the cache plan and benchmarks need."""

    index: int
    layer_type: str  # SLIDING | FULL
    head_dim: int
    n_kv_heads: int
    k_eq_v: bool  # values are the raw key projection (26B/31B global layers)
    kv_source: int  # the layer whose keys/values this layer attends to (itself unless shared)
    mlp_width: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING

    @property
    def is_kv_shared(self) -> bool:
        return self.kv_source != self.index


@dataclass(frozen=True)
class TextConfig:
    model_type: str  # "gemma4_text" | "gemma3_text"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    rope: dict[str, RopeSpec]  # layer type -> rope
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None  # Gemma 3: scale = this ** -0.5; Gemma 4: 1.0
    hidden_size_per_layer_input: int = 0  # PLE width (0 = no per-layer embeddings)
    vocab_size_per_layer_input: int = 0
    num_kv_shared_layers: int = 0
    attention_k_eq_v: bool = False
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    tie_word_embeddings: bool = True
    layers: tuple[LayerSpec, ...] = field(default=())

    @property
    def is_gemma3(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def norm_offset(self) -> float:
        """Gemma 3 RMSNorm multiplies by (1 + w); Gemma 4 by w."""
        return 1.0 if self.is_gemma3 else 0.0

    @property
    def attention_scale(self) -> float:
        if self.query_pre_attn_scalar is None:
            return 1.0
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # as written in config.json
    text: TextConfig
    raw: dict[str, Any]
    source: str


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: no config.json in the model directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{source}: model_type={model_type!r} is not supported "
            f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if model_type in ("gemma4", "gemma3"):
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise UserError(f"{source}: model_type={model_type!r} needs a text_config object")
        text = dict(text)
        text.setdefault("model_type", model_type + "_text")
        # The wrapper's vocab/tie settings apply to the decoder when the nested config omits them.
        for key in ("vocab_size", "tie_word_embeddings"):
            if key not in text and key in raw:
                text[key] = raw[key]
    else:
        text = raw
    return ModelConfig(
        model_type=model_type, text=_parse_text(text, source), raw=raw, source=source
    )


def _get(d: dict, key: str, source: str, kind: type | tuple = int, default: Any = ...) -> Any:
    value = d.get(key, default)
    if value is ...:
        raise UserError(f"{source}: missing field {key!r}")
    if value is None and default is None:
        return None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(
            f"{source}: field {key!r}={value!r} should be of type {getattr(kind, '__name__', kind)}"
        )
    return value


def _positive(value: int, key: str, source: str) -> int:
    if value <= 0:
        raise UserError(f"{source}: field {key!r}={value} must be positive")
    return value


def _parse_rope(text: dict, model_type: str, source: str) -> dict[str, RopeSpec]:
    if model_type == "gemma3_text":
        local_theta = float(text.get("rope_local_base_freq", 10000.0))
        params = text.get("rope_parameters")
        if isinstance(params, dict) and FULL in params:  # transformers 5 writes per-type params
            specs = {}
            for layer_type in (SLIDING, FULL):
                p = params.get(layer_type) or {}
                specs[layer_type] = _rope_from_params(p, source, default_theta=local_theta)
            return specs
        scaling = text.get("rope_scaling") or {}
        global_theta = float(text.get("rope_theta", 1_000_000.0))
        kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if kind not in ("default", "linear"):
            raise UserError(f"{source}: rope_scaling type {kind!r} is not supported")
        factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
        return {
            SLIDING: RopeSpec("default", local_theta),
            FULL: RopeSpec(kind, global_theta, factor=factor),
        }
    params = text.get("rope_parameters")
    if params is None:
        return {
            SLIDING: RopeSpec("default", 10_000.0),
            FULL: RopeSpec("proportional", 1_000_000.0, partial_rotary_factor=0.25),
        }
    if not isinstance(params, dict) or SLIDING not in params or FULL not in params:
        raise UserError(f"{source}: rope_parameters needs entries for {SLIDING!r} and {FULL!r}")
    return {t: _rope_from_params(params[t], source) for t in (SLIDING, FULL)}


def _rope_from_params(p: dict, source: str, default_theta: float = 10_000.0) -> RopeSpec:
    kind = p.get("rope_type", "default")
    if kind not in ("default", "linear", "proportional"):
        raise UserError(f"{source}: rope_type {kind!r} is not supported")
    return RopeSpec(
        rope_type=kind,
        theta=float(p.get("rope_theta", default_theta)),
        partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
        factor=float(p.get("factor", 1.0)),
    )


def _default_layer_types(n_layers: int, pattern: int) -> list[str]:
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]


def _parse_text(text: dict, source: str) -> TextConfig:
    model_type = text.get("model_type", "gemma4_text")
    if model_type not in ("gemma4_text", "gemma3_text"):
        raise UserError(f"{source}: text model_type={model_type!r} is not supported")
    gemma3 = model_type == "gemma3_text"

    hidden = _positive(_get(text, "hidden_size", source), "hidden_size", source)
    n_layers = _positive(_get(text, "num_hidden_layers", source), "num_hidden_layers", source)
    n_heads = _positive(_get(text, "num_attention_heads", source), "num_attention_heads", source)
    n_kv = _positive(_get(text, "num_key_value_heads", source), "num_key_value_heads", source)
    head_dim = _positive(
        _get(text, "head_dim", source, default=hidden // n_heads), "head_dim", source
    )
    vocab = _positive(_get(text, "vocab_size", source, default=262144), "vocab_size", source)
    intermediate = _positive(_get(text, "intermediate_size", source), "intermediate_size", source)
    window = _positive(_get(text, "sliding_window", source, default=512), "sliding_window", source)

    layer_types = text.get("layer_types")
    if layer_types is None:
        pattern = _get(text, "sliding_window_pattern", source, default=6)
        layer_types = _default_layer_types(n_layers, pattern)
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise UserError(
            f"{source}: layer_types has {len(layer_types) if isinstance(layer_types, list) else '?'} "
            f"entries but num_hidden_layers={n_layers}"
        )
    for t in layer_types:
        if t not in (SLIDING, FULL):
            raise UserError(f"{source}: layer_types contains unknown type {t!r}")

    n_shared = _get(text, "num_kv_shared_layers", source, default=0) or 0
    if n_shared < 0 or n_shared >= n_layers and n_shared != 0:
        raise UserError(
            f"{source}: num_kv_shared_layers={n_shared} must be below num_hidden_layers={n_layers}"
        )
    k_eq_v = bool(text.get("attention_k_eq_v", False))

    # Global-layer head dim and kv heads: old form (global_*) or new per_layer_config map.
    per_layer = text.get("per_layer_config")
    overrides: dict[int, dict] = {}
    if isinstance(per_layer, dict) and per_layer:
        for key, value in per_layer.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                continue  # per-type entries carry nothing a layer index does not
            if not 0 <= idx < n_layers:
                raise UserError(
                    f"{source}: per_layer_config names layer {idx}, outside 0..{n_layers - 1}"
                )
            if not isinstance(value, dict):
                raise UserError(f"{source}: per_layer_config[{key!r}] should be an object")
            overrides[idx] = value
    elif not gemma3:
        global_head_dim = _get(text, "global_head_dim", source, default=None) or head_dim
        global_kv = _get(text, "num_global_key_value_heads", source, default=None)
        for i, t in enumerate(layer_types):
            if t == FULL:
                o = {"head_dim": global_head_dim}
                if global_kv is not None and k_eq_v:
                    o["num_key_value_heads"] = global_kv
                overrides[i] = o

    moe = bool(text.get("enable_moe_block", False))
    n_experts = top_k = moe_inter = 0
    if moe:
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if text.get(key) is None:
                raise UserError(f"{source}: enable_moe_block is true but {key!r} is missing")
        n_experts = _positive(_get(text, "num_experts", source), "num_experts", source)
        top_k = _positive(_get(text, "top_k_experts", source), "top_k_experts", source)
        moe_inter = _positive(
            _get(text, "moe_intermediate_size", source), "moe_intermediate_size", source
        )
        if top_k > n_experts:
            raise UserError(f"{source}: top_k_experts={top_k} exceeds num_experts={n_experts}")

    first_shared = n_layers - n_shared
    producers: dict[str, int] = {}
    for i in range(first_shared):
        producers[layer_types[i]] = i
    double_wide = bool(text.get("use_double_wide_mlp", False))

    layers = []
    for i, t in enumerate(layer_types):
        o = overrides.get(i, {})
        ld = _positive(int(o.get("head_dim", head_dim)), f"per_layer_config[{i}].head_dim", source)
        lkv = _positive(
            int(o.get("num_key_value_heads", n_kv)),
            f"per_layer_config[{i}].num_key_value_heads",
            source,
        )
        if n_heads % lkv:
            raise UserError(
                f"{source}: num_attention_heads={n_heads} is not a multiple of layer {i}'s "
                f"num_key_value_heads={lkv}"
            )
        if ld % 2:
            raise UserError(f"{source}: layer {i} head_dim={ld} must be even for RoPE")
        shared = n_shared > 0 and i >= first_shared
        if shared and t not in producers:
            raise UserError(
                f"{source}: KV-shared layer {i} ({t}) has no earlier non-shared {t} layer to read from "
                f"(num_kv_shared_layers={n_shared})"
            )
        layers.append(
            LayerSpec(
                index=i,
                layer_type=t,
                head_dim=ld,
                n_kv_heads=lkv,
                k_eq_v=k_eq_v and t == FULL,
                kv_source=producers[t] if shared else i,
                mlp_width=intermediate * (2 if (double_wide and shared) else 1),
            )
        )
    for layer in layers:
        if layer.is_kv_shared:
            src = layers[layer.kv_source]
            if (src.head_dim, src.n_kv_heads) != (layer.head_dim, layer.n_kv_heads):
                raise UserError(
                    f"{source}: KV-shared layer {layer.index} expects head_dim={layer.head_dim}, "
                    f"kv heads={layer.n_kv_heads} but its producer layer {src.index} has "
                    f"{src.head_dim}, {src.n_kv_heads}"
                )

    ple = _get(text, "hidden_size_per_layer_input", source, default=0) or 0 if not gemma3 else 0
    softcap = text.get("final_logit_softcapping")
    if text.get("attn_logit_softcapping") not in (None, 0, 0.0):
        raise UserError(f"{source}: attn_logit_softcapping is not supported")
    activation = text.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        raise UserError(f"{source}: hidden_activation={activation!r} is not supported")
    qpas = text.get("query_pre_attn_scalar") if gemma3 else None
    if gemma3 and qpas is None:
        qpas = head_dim

    return TextConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        sliding_window=window,
        rope=_parse_rope(text, model_type, source),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        final_logit_softcapping=float(softcap) if softcap else None,
        query_pre_attn_scalar=float(qpas) if qpas is not None else None,
        hidden_size_per_layer_input=int(ple),
        vocab_size_per_layer_input=int(text.get("vocab_size_per_layer_input", vocab) if ple else 0),
        num_kv_shared_layers=int(n_shared),
        attention_k_eq_v=k_eq_v,
        enable_moe_block=moe,
        num_experts=n_experts,
        top_k_experts=top_k,
        moe_intermediate_size=moe_inter,
        tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
        layers=tuple(layers),
    )


ASSISTANT_MODEL_TYPES = ("gemma4_assistant",)


@dataclass(frozen=True)
class AssistantConfig:
    """Gemma 4's assistant (MTP) drafter: a small gemma4_text stack (``text``) every layer of
    which reads the target's stored keys/values instead of computing its own (so ``text`` is
    parsed as if no layer shared: its layers have no K/V projections at all, models/assistant.py).
    Its input is the target's token embedding joined with the target's last hidden state
    (``backbone_hidden_size`` each); ``use_ordered_embeddings``: the centroid-masked head."""

    text: TextConfig
    backbone_hidden_size: int
    use_ordered_embeddings: bool
    num_centroids: int
    centroid_intermediate_top_k: int
    source: str

    @property
    def model_type(self) -> str:
        return "gemma4_assistant"


def parse_assistant_config(raw: dict[str, Any], source: str = "config.json") -> AssistantConfig:
    """A gemma4_assistant config.json (transformers' Gemma4AssistantConfig) -> AssistantConfig."""
    if not isinstance(raw, dict) or raw.get("model_type") not in ASSISTANT_MODEL_TYPES:
        raise UserError(f"{source}: not a gemma4_assistant config")
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise UserError(f"{source}: model_type='gemma4_assistant' needs a text_config object")
    text = dict(text, model_type="gemma4_text", num_kv_shared_layers=0)
    for key in ("vocab_size", "tie_word_embeddings"):
        if key not in text and key in raw:
            text[key] = raw[key]
    parsed = _parse_text(text, source)
    for key, bad in (
        ("hidden_size_per_layer_input", parsed.hidden_size_per_layer_input),
        ("enable_moe_block", parsed.enable_moe_block),
        ("use_double_wide_mlp", text.get("use_double_wide_mlp", False)),
    ):
        if bad:
            raise UserError(f"{source}: an assistant drafter has no {key} (got {bad!r})")
    ordered = bool(raw.get("use_ordered_embeddings", False))
    centroids = _positive(_get(raw, "num_centroids", source, default=2048), "num_centroids", source)
    top_k = _positive(
        _get(raw, "centroid_intermediate_top_k", source, default=32),
        "centroid_intermediate_top_k",
        source,
    )
    if ordered and (parsed.vocab_size % centroids or top_k > centroids):
        raise UserError(
            f"{source}: num_centroids={centroids} must divide vocab_size={parsed.vocab_size} "
            f"and be >= centroid_intermediate_top_k={top_k}"
        )
    tie = bool(raw.get("tie_word_embeddings", parsed.tie_word_embeddings))
    return AssistantConfig(
        text=replace(parsed, tie_word_embeddings=tie),
        backbone_hidden_size=_positive(
            _get(raw, "backbone_hidden_size", source, default=1536), "backbone_hidden_size", source
        ),
        use_ordered_embeddings=ordered,
        num_centroids=centroids,
        centroid_intermediate_top_k=top_k,
        source=source,
    )
