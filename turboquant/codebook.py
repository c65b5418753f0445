"""Lloyd-Max scalar codebooks for one coordinate of a uniformly random unit vector in R^d.

That coordinate has density f(x) ∝ (1 - x^2)^((d-3)/2) on [-1, 1] (close to N(0, 1/d)).
Centroids minimise E[(x - q(x))^2] under that exact law; they are computed once per (d, bits)
with numpy (fine grid + cumulative moments, Lloyd iterations to convergence) and cached.
The mean squared error of a whole unit vector is d * that per-coordinate error: for large d
about 0.3634, 0.1175, 0.0345, 0.0095 at 1..4 bits (TurboQuant paper, arXiv 2504.19874).

``uniform_codebook``: the same law quantized on a uniform grid, levels (k - (2^b - 1) / 2) * step
for k = 0..2^b - 1, with the step that minimises the same error (golden-section search over the
same cumulative moments). Its codes are what MLX's affine quantization stores (scale = step,
bias = -(2^b - 1) / 2 * step), so ``mx.quantized_matmul`` reads them directly. Its error is
higher than Lloyd-Max's, by 1% / 7-8% / 18-21% at 2 / 3 / 4 bits for d = 32..128 (about 0.01 /
0.05 / 0.13 bits' worth).
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
    grid: str = "lloyd"  # "lloyd" (Lloyd-Max) | "uniform" (``uniform_codebook``)

    @property
    def centroids_mx(self) -> mx.array:
        return _as_mx(self.dim, self.bits, "c", self.grid)

    @property
    def boundaries_mx(self) -> mx.array:
        return _as_mx(self.dim, self.bits, "b", self.grid)


def _grid(dim: int, n: int = 200_001) -> tuple[np.ndarray, np.ndarray]:
    """Grid over the support where the density is not negligible, and normalised density."""
    half_width = min(1.0, 14.0 / np.sqrt(dim))
    x = np.linspace(-half_width, half_width, n)
    with np.errstate(divide="ignore"):
        logf = 0.5 * (dim - 3) * np.log(np.clip(1.0 - x * x, 1e-300, None))
    f = np.exp(logf - logf.max())
    f /= np.trapezoid(f, x)
    return x, f


def _check(dim: int, bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"codebook bits must be in 1..{MAX_BITS}, got {bits}")
    if dim < 4:
        raise ValueError(f"codebook dim must be >= 4, got {dim}")


@cache
def _moments(dim: int):
    """(grid, cell_stats): cell_stats(edges) gives each cell's mass and first and second
    moments under the coordinate law, from cumulative sums (trapezoid rule) in O(1) a cell."""
    x, f = _grid(dim)
    dx = np.diff(x)

    def cumulative(g):
        return np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * dx)])

    mass, first, second = cumulative(f), cumulative(f * x), cumulative(f * x * x)

    def cell_stats(edges):
        m = np.diff(np.interp(edges, x, mass))
        s1 = np.diff(np.interp(edges, x, first))
        s2 = np.diff(np.interp(edges, x, second))
        return m, s1, s2

    return x, cell_stats


@cache
def codebook(dim: int, bits: int) -> Codebook:
    _check(dim, bits)
    x, cell_stats = _moments(dim)
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
def uniform_codebook(dim: int, bits: int) -> Codebook:
    """The MSE-optimal uniform grid: centroids (k - (2^bits - 1) / 2) * uniform_step(dim, bits)."""
    _check(dim, bits)
    x, cell_stats = _moments(dim)
    centre = (2**bits - 1) / 2
    k = np.arange(2**bits) - centre

    def mse(step: float) -> float:
        c = k * step
        m, s1, s2 = cell_stats(np.concatenate([[x[0]], 0.5 * (c[1:] + c[:-1]), [x[-1]]]))
        return float(np.sum(s2 - 2 * c * s1 + c * c * m)) * dim

    # The error is unimodal in the step: golden-section search between 0 and a grid that
    # spans +-4 sigma at 1 bit (much wider than optimal at any bits).
    lo, hi = 0.0, 8.0 / np.sqrt(dim) / max(centre, 0.5)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = mse(a), mse(b)
    for _ in range(200):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = mse(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = mse(b)
        if hi - lo < 1e-12 / np.sqrt(dim):
            break
    step = 0.5 * (lo + hi)
    c = k * step
    return Codebook(dim, bits, c, 0.5 * (c[1:] + c[:-1]), mse(step), "uniform")


def uniform_step(dim: int, bits: int) -> float:
    """The step of ``uniform_codebook(dim, bits)`` (unit-vector coordinate scale)."""
    cb = uniform_codebook(dim, bits)
    return float(cb.centroids[1] - cb.centroids[0])


GRIDS = ("lloyd", "uniform")


def grid_codebook(dim: int, bits: int, grid: str = "lloyd") -> Codebook:
    return (uniform_codebook if grid == "uniform" else codebook)(dim, bits)


@cache
def _as_mx(dim: int, bits: int, which: str, grid: str = "lloyd") -> mx.array:
    cb = (uniform_codebook if grid == "uniform" else codebook)(dim, bits)
    return mx.array((cb.centroids if which == "c" else cb.boundaries).astype(np.float32))


# The Gaussian Lloyd-Max values of the paper (unit variance), for checks.
GAUSSIAN_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}
GAUSSIAN_CENTROIDS = {
    1: (0.7979,),
    2: (0.4528, 1.5104),
    3: (0.2451, 0.7560, 1.3439, 2.1519),
    4: (0.1284, 0.3880, 0.6567, 0.9422, 1.2561, 1.6179, 2.0689, 2.7325),
}
