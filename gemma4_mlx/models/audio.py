"""Gemma 4's audio encoder (E2B/E4B): a USM-style conformer, in forward-pass order.

log-mel features (B, T, 128) -> two stride-2 3x3 convolutions (T/4 frames, 40 ms each) -> N
conformer layers (half-step FFN, chunked local self-attention with relative positions, causal
light conv, half-step FFN) -> ``output_proj``; ``embed_audio`` (weightless RMSNorm + Linear into
the text width) is the vision tower's ``MultimodalEmbedder``. The executable reference is
transformers 5.24's ``Gemma4AudioModel`` and ``Gemma4MultimodalEmbedder``; module names equal its
checkpoint keys under ``audio_tower.`` / ``embed_audio.``. Attention runs in float32 whatever the
weights' dtype, as the reference does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemma4_mlx.config import ModelConfig, _get, _positive
from gemma4_mlx.errors import UserError
from gemma4_mlx.models.text import RMSNorm  # Gemma 4's: x * rsqrt(mean(x^2) + eps) * w

# Frames a query attends to: itself and the ones before it, ``0 <= t - s < window`` with
# ``window = attention_context_left + WINDOW_MINUS_CONTEXT_LEFT``. -1 is transformers 5.24's rule
# (12 frames for the released attention_context_left=13), our parity target; Gemma 3n's tril mask
# (and mlx-vlm's tril-based versions) let a query see 13 frames, i.e. 0 here. Which one Google
# trained is unknown; on random towers the two rules' outputs differ by a few percent.
WINDOW_MINUS_CONTEXT_LEFT = -1

_ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu": nn.gelu, "relu": nn.relu}


@dataclass(frozen=True)
class AudioConfig:
    """``audio_config`` of a ``gemma4`` config.json; defaults are transformers' Gemma4AudioConfig."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_past(self) -> int:  # frames of left context each block's keys reach back
        return self.attention_context_left - 1

    @property
    def context_size(self) -> int:  # keys per query block
        return self.attention_chunk_size + self.max_past + self.attention_context_right

    @property
    def window(self) -> int:
        return self.attention_context_left + WINDOW_MINUS_CONTEXT_LEFT


def parse_audio_config(config: ModelConfig) -> AudioConfig | None:
    """The audio tower's config, or None for models without one (26B, 31B, text-only)."""
    raw = config.raw.get("audio_config")
    if raw is None:
        return None
    return audio_config_from_dict(raw, f"{config.source}: audio_config")


def audio_config_from_dict(raw: dict[str, Any], source: str = "audio_config") -> AudioConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source} should be an object, found {type(raw).__name__}")
    d = AudioConfig()
    ints = {}
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "conv_kernel_size",
        "attention_chunk_size",
        "attention_context_left",
        "output_proj_dims",
    ):
        ints[key] = _positive(_get(raw, key, source, int, getattr(d, key)), key, source)
    right = _get(raw, "attention_context_right", source, int, d.attention_context_right)
    if right < 0:
        raise UserError(f"{source}: field 'attention_context_right'={right} must be >= 0")
    floats = {
        key: _get(raw, key, source, float, getattr(d, key))
        for key in (
            "residual_weight",
            "attention_logit_cap",
            "attention_invalid_logits_value",
            "rms_norm_eps",
            "gradient_clipping",
        )
    }
    act = _get(raw, "hidden_act", source, str, d.hidden_act)
    if act not in _ACTIVATIONS:
        raise UserError(
            f"{source}: field 'hidden_act'={act!r} is not supported "
            f"(expected one of {', '.join(_ACTIVATIONS)})"
        )
    channels = raw.get("subsampling_conv_channels", list(d.subsampling_conv_channels))
    if (
        not isinstance(channels, (list, tuple))
        or len(channels) != 2
        or not all(isinstance(c, int) and c > 0 for c in channels)
    ):
        raise UserError(
            f"{source}: field 'subsampling_conv_channels'={channels!r} should be two positive ints"
        )
    if ints["hidden_size"] % ints["num_attention_heads"] or ints["hidden_size"] % 2:
        raise UserError(
            f"{source}: field 'hidden_size'={ints['hidden_size']} must be even and divisible by "
            f"num_attention_heads={ints['num_attention_heads']}"
        )
    if ints["attention_context_left"] + WINDOW_MINUS_CONTEXT_LEFT < 1:
        raise UserError(
            f"{source}: field 'attention_context_left'={ints['attention_context_left']} leaves "
            "no attention window"
        )
    return AudioConfig(
        **ints,
        **floats,
        attention_context_right=right,
        hidden_act=act,
        subsampling_conv_channels=(channels[0], channels[1]),
        use_clipped_linears=bool(raw.get("use_clipped_linears", d.use_clipped_linears)),
    )


def _clip(x: mx.array, bound: float) -> mx.array:
    """Clamp to +-bound (an fp16 overflow guard in the reference: 1e10, below every dtype's max)."""
    bound = min(bound, float(mx.finfo(x.dtype).max))
    return mx.clip(x, -bound, bound)


class ClippableLinear(nn.Module):
    """Linear without bias between input/output clamps whose bounds come from the checkpoint."""

    def __init__(self, cfg: AudioConfig, in_dims: int, out_dims: int):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        if cfg.use_clipped_linears:  # scalars; +-inf until loaded
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)
        self._clipped = cfg.use_clipped_linears

    def __call__(self, x: mx.array) -> mx.array:
        if not self._clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        x = self.linear(x)
        return mx.clip(x, self.output_min.astype(x.dtype), self.output_max.astype(x.dtype))


class SubSampleConvLayer(nn.Module):
    """Mask -> Conv2d 3x3 stride 2 pad 1 (no bias) -> LayerNorm over channels (no bias) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x = x * mask[:, :, None, None].astype(x.dtype)  # (B, T, F, C): time is the conv's height
        x = nn.relu(self.norm(self.conv(x)))
        return x, mask[:, ::2]


class SubSampleConvProjection(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        c0, c1 = cfg.subsampling_conv_channels
        self.layer0 = SubSampleConvLayer(1, c0, cfg.rms_norm_eps)
        self.layer1 = SubSampleConvLayer(c0, c1, cfg.rms_norm_eps)
        # transformers sizes this (c0 // 4) * c1: right only when the mel bins equal c0 (128).
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, cfg.hidden_size, bias=False)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        B, T, F, C = x.shape  # frequency-major, channel-minor flatten, as the reference
        if F * C != self.input_proj_linear.weight.shape[1]:
            raise ValueError(
                f"audio features have {features.shape[-1]} mel bins; this audio tower expects "
                f"{self.input_proj_linear.weight.shape[1] // C * 4}"
            )
        return self.input_proj_linear(x.reshape(B, T, F * C)), mask


class FeedForward(nn.Module):
    """x + residual_weight * post_norm(clip(W2 act(W1 pre_norm(clip(x)))))."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.ffw_layer_1 = ClippableLinear(cfg, cfg.hidden_size, cfg.hidden_size * 4)
        self.ffw_layer_2 = ClippableLinear(cfg, cfg.hidden_size * 4, cfg.hidden_size)
        self.pre_layer_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_layer_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._act = _ACTIVATIONS[cfg.hidden_act]
        self._clip = cfg.gradient_clipping
        self._scale = cfg.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(_clip(x, self._clip))
        h = self.ffw_layer_2(self._act(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(_clip(h, self._clip)) * self._scale


def relative_position_embeddings(cfg: AudioConfig) -> mx.array:
    """(S//2 + 1, H) sinusoids for distances S//2 .. 0, sin half first (inv_timescales recomputed)."""
    half = cfg.hidden_size // 2
    increment = math.log(10_000.0) / max(half - 1, 1)
    inv_timescales = mx.exp(mx.arange(half, dtype=mx.float32) * -increment)
    positions = mx.arange(cfg.context_size // 2, -1, -1, dtype=mx.float32)[:, None]
    scaled = positions * inv_timescales[None]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1)


def block_attention_mask(cfg: AudioConfig, frame_mask: mx.array) -> mx.array:
    """(B, U, C, S) bool: key c of block u (frame uC - P + c) is visible to query w (frame uC + w)
    iff it is a real frame inside the window (see WINDOW_MINUS_CONTEXT_LEFT)."""
    C, P, S = cfg.attention_chunk_size, cfg.max_past, cfg.context_size
    T = frame_mask.shape[1]
    U = -(-T // C)
    block = mx.arange(U)[:, None, None] * C
    dist = (block + mx.arange(C)[None, :, None]) - (block - P + mx.arange(S)[None, None, :])
    in_window = ((dist >= 0) & (dist < cfg.window)) | (
        (dist < 0) & (-dist < cfg.attention_context_right)
    )
    keys_real = _context_blocks(cfg, frame_mask[..., None]).squeeze(-1)  # (B, U, S)
    return in_window[None] & keys_real[:, :, None, :]


def _context_blocks(cfg: AudioConfig, x: mx.array) -> mx.array:
    """(B, T, ...) -> (B, U, S, ...): block u's keys are frames uC - P .. uC - P + S - 1, zero outside."""
    C, P, S = cfg.attention_chunk_size, cfg.max_past, cfg.context_size
    T = x.shape[1]
    U = -(-T // C)
    pad = [(0, 0)] * x.ndim
    pad[1] = (P, cfg.attention_context_right + C - 1)
    x = mx.pad(x, pad)
    index = (mx.arange(U)[:, None] * C + mx.arange(S)[None, :]).reshape(-1)
    return mx.take(x, index, axis=1).reshape(x.shape[0], U, S, *x.shape[2:])


class Attention(nn.Module):
    """Chunked local attention: query blocks of C frames, each seeing S = C + P + R key frames,
    Transformer-XL relative-position logits, tanh logit cap, float32 throughout."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.q_proj = ClippableLinear(cfg, H, H)
        self.k_proj = ClippableLinear(cfg, H, H)
        self.v_proj = ClippableLinear(cfg, H, H)
        self.post = ClippableLinear(cfg, H, H)
        self.relative_k_proj = nn.Linear(H, H, bias=False)
        self.per_dim_scale = mx.zeros((cfg.head_dim,))
        self.cfg = cfg

    def __call__(self, x: mx.array, pos_emb: mx.array, mask: mx.array) -> mx.array:
        cfg = self.cfg
        B, T, _ = x.shape
        N, D, C, S = (
            cfg.num_attention_heads,
            cfg.head_dim,
            cfg.attention_chunk_size,
            cfg.context_size,
        )
        U = -(-T // C)
        f32 = mx.float32
        # softplus(0) = ln 2, so the 1/ln 2 makes a fresh per_dim_scale a plain D^-0.5.
        q_scale = (D**-0.5 / math.log(2)) * nn.softplus(self.per_dim_scale.astype(f32))
        q = self.q_proj(x).astype(f32).reshape(B, T, N, D) * q_scale
        k = self.k_proj(x).astype(f32).reshape(B, T, N, D) * (math.log(1 + math.e) / math.log(2))
        v = self.v_proj(x).astype(f32).reshape(B, T, N, D)

        q = mx.pad(q, [(0, 0), (0, U * C - T), (0, 0), (0, 0)]).reshape(B, U, C, N, D)
        q = q.transpose(0, 3, 1, 2, 4)  # (B, N, U, C, D)
        k = _context_blocks(cfg, k).transpose(0, 3, 1, 4, 2)  # (B, N, U, D, S)
        v = _context_blocks(cfg, v).transpose(0, 3, 1, 2, 4)  # (B, N, U, S, D)
        content = q @ k  # (B, N, U, C, S)

        rel = self.relative_k_proj(pos_emb.astype(x.dtype)).astype(f32)  # (R, N*D), R = S//2+1
        rel = rel.reshape(-1, N, D).transpose(1, 2, 0)  # (N, D, R)
        position = (q.reshape(B, N, U * C, D) @ rel[None]).reshape(B, N, U, C, -1)
        logits = content + _rel_shift(position, S)

        cap = cfg.attention_logit_cap
        logits = mx.tanh(logits / cap) * cap
        logits = mx.where(mask[:, None], logits, cfg.attention_invalid_logits_value)
        probs = mx.softmax(logits, axis=-1)
        out = (probs @ v).transpose(0, 2, 3, 1, 4).reshape(B, U * C, N * D)[:, :T]
        return self.post(out.astype(x.dtype))


def _rel_shift(x: mx.array, context: int) -> mx.array:
    """Transformer-XL's shift (appendix B of arXiv:1901.02860), exactly as transformers does it:
    (..., C, R) -> pad to S+1 -> flatten -> keep C*S -> (..., C, S); entry [w, c] = x[w, c - w]."""
    *lead, C, R = x.shape
    x = mx.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, context + 1 - R)])
    x = x.reshape(*lead, C * (context + 1))[..., : C * context]
    return x.reshape(*lead, C, context)


class LightConv(nn.Module):
    """x + W_end act(conv_norm(clip(causal_depthwise_conv(glu(W_start pre_norm(x))))))."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.linear_start = ClippableLinear(cfg, H, 2 * H)
        self.linear_end = ClippableLinear(cfg, H, H)
        # (H, K, 1): MLX's grouped-conv layout of PyTorch's (H, 1, K); one filter per channel.
        self.depthwise_conv1d = nn.Conv1d(H, H, cfg.conv_kernel_size, groups=H, bias=False)
        self.pre_layer_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.conv_norm = RMSNorm(H, cfg.rms_norm_eps)
        self._act = _ACTIVATIONS[cfg.hidden_act]
        self._clip = cfg.gradient_clipping
        self._kernel = cfg.conv_kernel_size

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_start(self.pre_layer_norm(x))
        a, b = mx.split(h, 2, axis=-1)
        h = a * mx.sigmoid(b)  # GLU
        h = mx.pad(h, [(0, 0), (self._kernel - 1, 0), (0, 0)])  # causal: left pad only
        h = self.depthwise_conv1d(h)
        h = self.conv_norm(_clip(h, self._clip))
        return x + self.linear_end(self._act(h))


class ConformerLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.feed_forward1 = FeedForward(cfg)
        self.self_attn = Attention(cfg)
        self.lconv1d = LightConv(cfg)
        self.feed_forward2 = FeedForward(cfg)
        self.norm_pre_attn = RMSNorm(H, cfg.rms_norm_eps)
        self.norm_post_attn = RMSNorm(H, cfg.rms_norm_eps)
        self.norm_out = RMSNorm(H, cfg.rms_norm_eps)
        self._clip = cfg.gradient_clipping

    def __call__(self, x: mx.array, pos_emb: mx.array, mask: mx.array) -> mx.array:
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(_clip(x, self._clip)), pos_emb, mask)
        x = x + self.norm_post_attn(_clip(h, self._clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clip(x, self._clip))


class AudioModel(nn.Module):
    """``audio_tower``: (B, T, mel) features + (B, T) frame mask -> (B, T', output_proj_dims) and the
    (B, T') mask of real output frames (T' = ceil(ceil(T/2)/2), 40 ms each)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        self.subsample_conv_projection = SubSampleConvProjection(cfg)
        self.layers = [ConformerLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.output_proj_dims, bias=True)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(
                f"audio features should be (batch, frames, mel) with a (batch, frames) mask; got "
                f"{tuple(features.shape)} and {tuple(mask.shape)}"
            )
        mask = mask.astype(mx.bool_)
        # The reference runs the tower in the weights' dtype (attention aside, float32 inside).
        features = features.astype(self.subsample_conv_projection.layer0.conv.weight.dtype)
        x, mask = self.subsample_conv_projection(features, mask)
        pos_emb = relative_position_embeddings(self.config)
        attn_mask = block_attention_mask(self.config, mask)
        for layer in self.layers:
            x = layer(x, pos_emb, attn_mask)
        return self.output_proj(x), mask

    def sanitize(self, weights: dict[str, mx.array], prefix: str = "") -> dict[str, mx.array]:
        """PyTorch conv layouts -> MLX: Conv2d (O, I, 3, 3) -> (O, 3, 3, I), depthwise (H, 1, K) ->
        (H, K, 1). Weights already in MLX layout (our or mlx-lm conversions) pass unchanged.
        Buffers we recompute (the relative-position timescales, the logit cap) are dropped if a
        checkpoint carries them; clip bounds stored as (1,) become scalars."""
        out = dict(weights)
        for name, value in weights.items():
            if not name.startswith(prefix):
                continue
            if name.endswith(("rel_pos_enc.inv_timescales", "self_attn.softcap")):
                del out[name]
            elif name.endswith(("input_min", "input_max", "output_min", "output_max")):
                if value.size == 1 and value.ndim > 0:
                    out[name] = value.reshape(())
            elif name.endswith(".conv.weight") and value.ndim == 4:
                expected = 1 if ".layer0." in name else self.config.subsampling_conv_channels[0]
                if value.shape[1] == expected and value.shape[-1] != expected:
                    out[name] = value.transpose(0, 2, 3, 1)
            elif (
                name.endswith("depthwise_conv1d.weight") and value.ndim == 3 and value.shape[1] == 1
            ):
                if value.shape[2] != 1:
                    out[name] = value.transpose(0, 2, 1)
        return out


def audio_soft_tokens(
    tower: AudioModel, embedder: nn.Module, features: mx.array, mask: mx.array
) -> list[mx.array]:
    """One (n_i, text hidden) array of soft tokens per clip: its real output frames only (the
    reference's ``features[output_mask]``)."""
    hidden, out_mask = tower(features, mask)
    embedded = embedder(hidden)
    rows = np.array(out_mask)
    return [embedded[i][mx.array(np.flatnonzero(row))] for i, row in enumerate(rows)]
