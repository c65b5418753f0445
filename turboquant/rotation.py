"""Random rotations that make every coordinate of a unit vector follow the same law (Beta(d)).

- ``hadamard``: x -> H (s * x) / sqrt(d), random signs s applied BEFORE the Walsh-Hadamard
  transform (signs applied after it would randomise nothing: H x is fixed for a given x).
  O(d log d); needs a size mx.hadamard_transform supports (m * 2^k, m in 1, 12, 20, 28).
- ``qr``: a dense Haar-random orthogonal matrix (QR of a Gaussian, sign-fixed): the paper's
  exact variant and the fallback for any other size. O(d^2).
Queries and keys must use the same rotation (same dim, kind and seed). Work in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np


def hadamard_supported(dim: int) -> bool:
    for m in (1, 12, 20, 28):
        if dim % m == 0:
            n = dim // m
            if n & (n - 1) == 0:
                return True
    return False


@lru_cache(maxsize=64)
def _signs(dim: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=dim))


@lru_cache(maxsize=64)
def _orthogonal(dim: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))[None, :]  # Haar measure
    return mx.array(q.astype(np.float32))


@dataclass(frozen=True)
class Rotation:
    dim: int
    seed: int = 0
    kind: str = "hadamard"  # "hadamard" | "qr"

    def __post_init__(self):
        if self.kind not in ("hadamard", "qr"):
            raise ValueError(f"rotation kind must be 'hadamard' or 'qr', got {self.kind!r}")
        if self.kind == "hadamard" and not hadamard_supported(self.dim):
            raise ValueError(f"no Hadamard transform of size {self.dim}: use kind='qr'")

    def forward(self, x: mx.array) -> mx.array:
        """(..., d) -> (..., d) rotated, float32."""
        x = x.astype(mx.float32)
        if self.kind == "hadamard":
            return mx.hadamard_transform(x * _signs(self.dim, self.seed))
        return x @ _orthogonal(self.dim, self.seed).T

    def inverse(self, y: mx.array) -> mx.array:
        y = y.astype(mx.float32)
        if self.kind == "hadamard":  # the normalised H is symmetric and its own inverse
            return mx.hadamard_transform(y) * _signs(self.dim, self.seed)
        return y @ _orthogonal(self.dim, self.seed)


def default_rotation(dim: int, seed: int = 0) -> Rotation:
    return Rotation(dim, seed, "hadamard" if hadamard_supported(dim) else "qr")
