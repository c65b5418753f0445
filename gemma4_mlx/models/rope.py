"""Rotary position embeddings.

Sliding layers use default RoPE over the whole head. Gemma 4 global layers use "proportional"
RoPE: only the first ``partial_rotary_factor * head_dim / 2`` frequency pairs rotate, with
frequencies computed against the FULL head dim (inv_freq[j] = theta^(-2j/head_dim)), and
rotate_half pairs dim j with dim j + head_dim/2 across the whole head; the other pairs pass
through. That is not standard partial RoPE over the first dims (transformers' modeling_gemma4.py does the same).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from gemma4_mlx.config import RopeSpec


class RoPE(nn.Module):
    def __init__(self, head_dim: int, spec: RopeSpec):
        super().__init__()
        self.head_dim = head_dim
        half = head_dim // 2
        rotated_pairs = half
        if spec.rope_type == "proportional":
            rotated_pairs = int(spec.partial_rotary_factor * head_dim // 2)
        elif spec.partial_rotary_factor != 1.0:
            raise ValueError("partial_rotary_factor is only supported with proportional RoPE")
        factor = spec.factor if spec.rope_type in ("linear", "proportional") else 1.0
        # mx.fast.rope takes periods (1 / inv_freq); an infinite period never rotates.
        exponents = [2 * j / head_dim for j in range(rotated_pairs)]
        periods = [factor * spec.theta**e for e in exponents] + [math.inf] * (half - rotated_pairs)
        self._periods = mx.array(periods, dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        # x: (B, n_heads, L, head_dim)
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )
