"""Lloyd-Max scalar codebooks for one coordinate of a uniformly random unit vector in R^d.

That coordinate has density f(x) ∝ (1 - x^2)^((d-3)/2) on [-1, 1] (close to N(0, 1/d)).
Centroids minimise E[(x - q(x))^2] under that exact law; they are computed once per (d, bits)
with numpy (fine grid + cumulative moments, Lloyd iterations to convergence) and cached.
The mean squared error of a whole unit vector is d * that per-coordinate error: for large d
about 0.3634, 0.1175, 0.0345, 0.0095 at 1..4 bits (TurboQuant paper, arXiv 2504.19874).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import numpy as np

MAX_BITS = 8


@dataclass(frozen=True)
class Codebook:
    dim: int
    bits: int
    centroids: np.ndarray  # (2^bits,) increasing, unit-vector coordinate scale
    boundaries: np.ndarray  # (2^bits - 1,) midpoints between centroids
    mse_per_vector: float  # d * E[(x - q(x))^2] under the exact law

    @property
    def centroids_mx(self) -> mx.array:
        return _as_mx(self.dim, self.bits, "c")

    @property
    def boundaries_mx(self) -> mx.array:
        return _as_mx(self.dim, self.bits, "b")


def _grid(dim: int, n: int = 200_001) -> tuple[np.ndarray, np.ndarray]:
    """Grid over the support where the density is not negligible, and normalised density."""
    half_width = min(1.0, 14.0 / np.sqrt(dim))
    x = np.linspace(-half_width, half_width, n)
    with np.errstate(divide="ignore"):
        logf = 0.5 * (dim - 3) * np.log(np.clip(1.0 - x * x, 1e-300, None))
    f = np.exp(logf - logf.max())
    f /= np.trapezoid(f, x)
    return x, f


@cache
def codebook(dim: int, bits: int) -> Codebook:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"codebook bits must be in 1..{MAX_BITS}, got {bits}")
    if dim < 4:
        raise ValueError(f"codebook dim must be >= 4, got {dim}")
    x, f = _grid(dim)
    dx = np.diff(x)

    # Cumulative mass and first and second moments (trapezoid rule) for O(1) cell integrals.
    def cumulative(g):
        return np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * dx)])

    mass, first, second = cumulative(f), cumulative(f * x), cumulative(f * x * x)

    def cell_stats(edges):
        m = np.diff(np.interp(edges, x, mass))
        s1 = np.diff(np.interp(edges, x, first))
        s2 = np.diff(np.interp(edges, x, second))
        return m, s1, s2

    levels = 2**bits
    sigma = 1.0 / np.sqrt(dim)
    # Start from Gaussian quantiles of the cell midpoints.
    from statistics import NormalDist

    probs = (np.arange(levels) + 0.5) / levels
    c = np.array([NormalDist(0, sigma).inv_cdf(p) for p in probs])
    lo, hi = x[0], x[-1]
    for _ in range(20_000):
        b = 0.5 * (c[1:] + c[:-1])
        m, s1, _ = cell_stats(np.concatenate([[lo], b, [hi]]))
        new = np.where(m > 0, s1 / np.maximum(m, 1e-300), c)
        if np.max(np.abs(new - c)) < 1e-10 * sigma:
            c = new
            break
        c = new
    b = 0.5 * (c[1:] + c[:-1])
    m, s1, s2 = cell_stats(np.concatenate([[lo], b, [hi]]))
    mse = float(np.sum(s2 - 2 * c * s1 + c * c * m)) * dim
    return Codebook(dim, bits, c.astype(np.float64), b.astype(np.float64), mse)


@cache
def _as_mx(dim: int, bits: int, which: str) -> mx.array:
    cb = codebook(dim, bits)
    return mx.array((cb.centroids if which == "c" else cb.boundaries).astype(np.float32))


# The Gaussian Lloyd-Max values of the paper (unit variance), for checks.
GAUSSIAN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}
GAUSSIAN_CENTROIDS = {
    1: (0.7979,),
    2: (0.4528, 1.5104),
    3: (0.2451, 0.7560, 1.3439, 2.1519),
    4: (0.1284, 0.3880, 0.6567, 0.9422, 1.2561, 1.6179, 2.0689, 2.7325),
}
