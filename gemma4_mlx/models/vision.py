"""The Gemma 4 vision tower and its embedder into the text model, in forward-pass order.

Reference: transformers 5.24 ``Gemma4VisionModel`` / ``Gemma4MultimodalEmbedder``. Per image:

    pixel_values (L, 3*p*p) in [0, 1], positions (L, 2) = (x, y) in patches, (-1, -1) = padding
    -> drop padding patches (the reference masks them as keys and zeroes them before pooling;
       dropping them is numerically the same and saves up to (9 * budget)^2 attention)
    -> input_proj(2 * (p - 0.5)) + table[0][x] + table[1][y]
    -> N x encoder block (sandwich RMSNorms, q/k norms, weightless v norm, scale 1.0, 2-D RoPE
       theta 100, fully bidirectional; on E2B/E4B every linear clamps its input and output)
    -> 3x3 average pool by position -> * sqrt(Hv) -> [(h - std_bias) * std_scale] (26B/31B)
    -> (n_tokens, Hv), then the embedder: weightless RMSNorm -> Linear(Hv -> text hidden).

The pool, the sqrt(Hv) scale and the standardization run in float32 whatever the weights' dtype:
26B/31B pooled values reach ~2e3, times 33.9 that overflows float16, and std_bias is O(1e4-1e5)
so ``h - std_bias`` cancels (the ``<pad>``-only output other ports shipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemma4_mlx.config import _get, _positive
from gemma4_mlx.errors import UserError
from gemma4_mlx.models.text import RMSNorm  # Gemma 4's: x * rsqrt(mean(x^2) + eps) * w

# Head dims the fused attention kernel handles; others are zero-padded up to the next one.
_FUSED_HEAD_DIMS = (64, 80, 128)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2


def parse_vision_config(raw: dict[str, Any], source: str = "config.json") -> VisionConfig | None:
    """``raw["vision_config"]`` of a gemma4 config.json -> VisionConfig (None: no vision tower)."""
    vc = raw.get("vision_config")
    if vc is None:
        return None
    if not isinstance(vc, dict):
        raise UserError(f"{source}: vision_config should be an object")
    src = f"{source}: vision_config"

    def pos(key: str, default: Any = ...) -> int:
        return _positive(_get(vc, key, src, default=default), key, src)

    hidden = pos("hidden_size")
    heads = pos("num_attention_heads")
    head_dim = pos("head_dim", hidden // heads)
    if head_dim % 4:
        raise UserError(f"{src}: field 'head_dim'={head_dim} must be a multiple of 4 (2-D RoPE)")
    activation = vc.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        raise UserError(f"{src}: field 'hidden_activation'={activation!r} is not supported")
    rope = vc.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{src}: field 'rope_parameters' should be an object")
    if rope.get("rope_type", "default") not in ("default", "axial"):
        raise UserError(f"{src}: rope_type {rope.get('rope_type')!r} is not supported (axial)")
    theta = _get(rope, "rope_theta", src, kind=float, default=100.0)
    kv_heads = pos("num_key_value_heads", heads)
    if heads % kv_heads:
        raise UserError(
            f"{src}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=pos("intermediate_size"),
        num_hidden_layers=pos("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        patch_size=pos("patch_size", 16),
        pooling_kernel_size=pos("pooling_kernel_size", 3),
        position_embedding_size=pos("position_embedding_size", 10240),
        rms_norm_eps=_get(vc, "rms_norm_eps", src, kind=float, default=1e-6),
        rope_theta=theta,
        use_clipped_linears=bool(vc.get("use_clipped_linears", False)),
        standardize=bool(vc.get("standardize", False)),
    )


class ClippableLinear(nn.Module):
    """Linear (weight under ``.linear``) that, on E2B/E4B, clamps its input and output to four
    scalar bounds stored in the checkpoint (``input_min`` ... ``output_max``)."""

    def __init__(self, dims_in: int, dims_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        self._clipped = clipped
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self._clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))


def rope_2d_tables(positions: mx.array, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """positions (B, L, 2) = (x, y) -> cos, sin (B, L, 1, head_dim) laid out [fx, fx, fy, fy].

    Frequencies theta^(-4j/D), j < D/4 (transformers' ``compute_axial_rope_parameters``): the
    first half of each head is rotated by x, the second by y, rotate_half pairing in each half.
    """
    inv = 1.0 / (theta ** (mx.arange(0, head_dim // 2, 2, dtype=mx.float32) / (head_dim // 2)))
    fx = positions[..., 0:1].astype(mx.float32) * inv  # (B, L, D/4)
    fy = positions[..., 1:2].astype(mx.float32) * inv
    freqs = mx.concatenate([fx, fx, fy, fy], axis=-1)[:, :, None, :]
    return mx.cos(freqs), mx.sin(freqs)


def apply_rope_2d(h: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """h (B, L, heads, D): each half rotated with rotate_half pairing (i, i + D/4)."""
    q = h.shape[-1] // 4
    a0, a1, b0, b1 = (h[..., i * q : (i + 1) * q] for i in range(4))
    rotated = mx.concatenate([-a1, a0, -b1, b0], axis=-1)
    return h * cos.astype(h.dtype) + rotated * sin.astype(h.dtype)


def _attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Unmasked attention with scale 1.0; q, k, v (B, heads, L, D). Head dims without a fused
    kernel (72 on 26B/31B) are zero-padded: exact, as the scale is passed explicitly."""
    d = q.shape[-1]
    if d not in _FUSED_HEAD_DIMS and d < _FUSED_HEAD_DIMS[-1]:
        pad = next(f for f in _FUSED_HEAD_DIMS if f > d) - d
        widths = [(0, 0)] * 3 + [(0, pad)]
        q, k, v = (mx.pad(t, widths) for t in (q, k, v))
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :d]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h, d, c = cfg.hidden_size, cfg.head_dim, cfg.use_clipped_linears
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            d,
        )
        self.q_proj = ClippableLinear(h, self.n_heads * d, c)
        self.k_proj = ClippableLinear(h, self.n_kv_heads * d, c)
        self.v_proj = ClippableLinear(h, self.n_kv_heads * d, c)
        self.o_proj = ClippableLinear(self.n_heads * d, h, c)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self._eps = cfg.rms_norm_eps

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = apply_rope_2d(self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)), cos, sin)
        k = apply_rope_2d(self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)), cos, sin)
        v = mx.fast.rms_norm(self.v_proj(x).reshape(B, L, self.n_kv_heads, -1), None, self._eps)
        out = _attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)))  # (B, heads, L, D)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h, w, c = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippableLinear(h, w, c)
        self.up_proj = ClippableLinear(h, w, c)
        self.down_proj = ClippableLinear(w, h, c)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, cfg.position_embedding_size, cfg.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        """pixels (B, L, 3p^2) in [0, 1], positions (B, L, 2) real patches only -> (B, L, Hv)."""
        w = self.input_proj.weight
        dtype = w.dtype if mx.issubdtype(w.dtype, mx.floating) else mx.float32
        h = self.input_proj((2 * (pixels.astype(mx.float32) - 0.5)).astype(dtype))
        table = self.position_embedding_table
        return h + (table[0][positions[..., 0]] + table[1][positions[..., 1]]).astype(h.dtype)


def pooling_order(positions: np.ndarray, k: int) -> np.ndarray:
    """positions (n, 2) of real patches -> the permutation that puts each k x k pooling cell's
    patches together, cells in the reference's order (row-major over the pooled grid)."""
    x, y = positions[:, 0], positions[:, 1]
    width = int(x.max()) + 1
    cell = x // k + (width // k) * (y // k)
    n_cells = len(positions) // (k * k)
    counts = np.bincount(cell, minlength=n_cells)
    if len(counts) != n_cells or np.any(counts != k * k):
        raise ValueError(
            f"image_position_ids: the {len(positions)} patches do not tile {k}x{k} pooling cells "
            "(expected a patch grid whose sides are multiples of the pooling kernel)"
        )
    return np.argsort(cell, kind="stable")


class VisionModel(nn.Module):
    """``vision_tower``: processor outputs -> pooled features (n_tokens_total, Hv) in float32."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = Encoder(cfg)
        if cfg.standardize:
            self.std_bias = mx.zeros((cfg.hidden_size,))
            self.std_scale = mx.ones((cfg.hidden_size,))

    def encode(self, pixels: mx.array, positions: mx.array) -> mx.array:
        """Real patches of same-length images (B, n, 3p^2), positions (B, n, 2) -> (B, n, Hv)."""
        cfg = self.config
        h = self.patch_embedder(pixels, positions)
        cos, sin = rope_2d_tables(positions, cfg.head_dim, cfg.rope_theta)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        return h

    def __call__(self, pixel_values: Any, pixel_position_ids: Any) -> list[mx.array]:
        """pixel_values (B, L, 3p^2), pixel_position_ids (B, L, 2) (the processor's arrays,
        padded) -> one float32 (n_tokens_i, Hv) array per image, in order."""
        cfg, k = self.config, self.config.pooling_kernel_size
        positions = np.asarray(pixel_position_ids).astype(np.int64)
        if positions.ndim != 3 or positions.shape[-1] != 2:
            raise ValueError(
                f"image_position_ids should have shape (B, L, 2), got {positions.shape}"
            )
        pixels = pixel_values if isinstance(pixel_values, mx.array) else mx.array(pixel_values)
        if pixels.shape[:2] != positions.shape[:2] or pixels.shape[-1] != cfg.patch_dim:
            raise ValueError(
                f"pixel_values shape {tuple(pixels.shape)} does not match image_position_ids "
                f"{positions.shape} and patch size {cfg.patch_size} (expected last dim {cfg.patch_dim})"
            )
        if positions.max(initial=0) >= cfg.position_embedding_size:
            raise ValueError(
                f"image_position_ids reach {int(positions.max())}, beyond the vision tower's "
                f"position_embedding_size={cfg.position_embedding_size}"
            )
        # Real patches of each image, reordered so every pooling cell is contiguous.
        real = [(p != -1).all(-1) for p in positions]
        orders = [np.nonzero(r)[0][pooling_order(p[r], k)] for p, r in zip(positions, real)]
        # Images with the same number of patches run as one batch (video frames: all of them).
        out: list[mx.array | None] = [None] * len(orders)
        for n in sorted({len(o) for o in orders}):
            group = [i for i, o in enumerate(orders) if len(o) == n]
            idx = mx.array(np.stack([orders[i] for i in group]))
            rows = mx.array(np.array(group))[:, None]
            pos = mx.array(np.stack([positions[i][orders[i]] for i in group]))
            h = self.encode(pixels[rows, idx], pos)  # (G, n, Hv)
            pooled = h.astype(mx.float32).reshape(len(group), n // (k * k), k * k, -1).mean(2)
            pooled = pooled * math.sqrt(cfg.hidden_size)
            if cfg.standardize:
                pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(
                    mx.float32
                )
            for j, i in enumerate(group):
                out[i] = pooled[j]
        return out  # type: ignore[return-value]


class MultimodalEmbedder(nn.Module):
    """``embed_vision`` / ``embed_audio``: weightless RMSNorm -> Linear(media -> text hidden)."""

    def __init__(self, dims_in: int, dims_out: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(dims_in, dims_out, bias=False)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        proj = self.embedding_projection
        dtype = proj.scales.dtype if "scales" in proj else proj.weight.dtype
        # The norm in float32, the projection in the weights' dtype (as the reference casts).
        return proj(mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(dtype))


__all__ = [
    "ClippableLinear",
    "MultimodalEmbedder",
    "VisionConfig",
    "VisionModel",
    "parse_vision_config",
]
