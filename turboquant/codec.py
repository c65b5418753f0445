"""TurboQuant codecs (arXiv 2504.19874), vectorised over any leading axes (..., d).

MSE codec at b bits: x -> (norm, unit = x / norm) -> y = R unit (rotation) -> per coordinate the
nearest Lloyd-Max centroid of the exact coordinate law -> packed b-bit indices + a float16 norm.
Decoding gives norm * R^T y_hat. MSE-only is biased (E[x~] = (1 - D) x); with norm correction we
store norm / |y_hat| instead, so the reconstruction has the input's norm (no extra bits).

Prod codec at b bits: the MSE codec at b - 1 bits plus a 1-bit QJL sketch of the residual
r = y - y_hat: sign(S r) with S a d x d Gaussian matrix, and |r| (float16). Inner products are
then unbiased: <q, x> ~ norm * (<R q, y_hat> + |r| * sqrt(pi/2) / d * <S R q, sign(S r)>).

Fractional bits (2.5, 3.5, ...): after the rotation every coordinate has the same law, so the
first round(frac * d) rotated channels use ceil(bits) and the rest floor(bits).

Tiers (``tiers=((count, bits), ...)``, MSE only): the channels are split into consecutive blocks,
each rotated on its own, normalised by its own norm and quantized with the codebook of its own
size and bits. A caller that orders channels by energy (the TurboQuant cache does, per head, from
the tokens it centres on) gives high-energy channels more bits: keys are far from isotropic (RoPE
pairs), and a single rotation would spread the few strong channels' energy over all of them.

Grids (``grid``, MSE only): ``lloyd``, the Lloyd-Max codebook of each group's law (the paper's),
or ``uniform``, the MSE-optimal uniform grid of that law (``turboquant.codebook.uniform_codebook``):
its codes are MLX's affine codes, so attention can read them with ``mx.quantized_matmul``
(``turboquant.attention``) instead of gathering centroids. With the uniform grid, codebook groups
wider than 128 channels are stored as 128-channel groups (same bits, same block norm), the widest
group ``mx.quantized_matmul`` takes; ``CodecSpec.qmm_ready`` says whether every group fits it.

Stored bytes are real array bytes (``Encoded.nbytes``); ``bits_per_channel`` reports them.

Input rules: zero vectors encode and decode to zero; non-finite input raises ValueError when
``check_finite`` is on (the default; the KV caches turn it off and let NaN propagate as a float
cache would); norms are stored in float16, so a norm above 65504 raises ValueError under the same
check, and norms below ~6e-8 decode as zero vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import mlx.core as mx
import numpy as np

from turboquant.codebook import GRIDS, MAX_BITS, grid_codebook, uniform_step
from turboquant.packing import pack, packed_words, unpack
from turboquant.rotation import Rotation, default_rotation

FP16_MAX = 65504.0
QMM_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantized_matmul (and Metal's qmv kernels) unpack
QMM_GROUPS = (32, 64, 128)  # its group sizes


@dataclass(frozen=True)
class CodecSpec:
    dim: int
    bits: float = 4.0  # average code bits per channel (norms excluded; prod: MSE bits + 1)
    kind: str = "mse"  # "mse" | "prod"
    norm_correction: bool = True  # MSE codec only (the prod codec must stay unbiased)
    rotation: str = "auto"  # "auto" (Hadamard where possible) | "hadamard" | "qr"
    seed: int = 0
    qjl: str = "gaussian"  # "gaussian" (the paper's S) | "orthogonal" (scaled orthogonal S)
    tiers: tuple[tuple[int, float], ...] = ()  # (channels, bits) blocks; bits is then their mean
    grid: str = "lloyd"  # "lloyd" | "uniform" (MSE only): the scalar grid of every group

    def __post_init__(self):
        tiers = tuple((int(n), float(b)) for n, b in self.tiers)
        object.__setattr__(self, "tiers", tiers)  # JSON round trips give lists
        if self.kind not in ("mse", "prod"):
            raise ValueError(f"codec kind must be 'mse' or 'prod', got {self.kind!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"codec grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.grid == "uniform" and self.kind != "mse":
            raise ValueError("the uniform grid is for the MSE codec only")
        if self.qjl not in ("gaussian", "orthogonal"):
            raise ValueError(f"qjl must be 'gaussian' or 'orthogonal', got {self.qjl!r}")
        low = 2 if self.kind == "prod" else 1
        high = MAX_BITS + (1 if self.kind == "prod" else 0)
        if not low <= self.bits <= high:
            raise ValueError(f"{self.kind} codec bits must be in {low}..{high}, got {self.bits}")
        if tiers:  # each tier is a codec of its own: its bits split over its channels
            if self.kind != "mse":
                raise ValueError("channel tiers are for the MSE codec only")
            if sum(n for n, _ in tiers) != self.dim or min(n for n, _ in tiers) < 4:
                raise ValueError(f"tiers {tiers} must cover {self.dim} channels, >= 4 each")
            mean = sum(n * b for n, b in tiers) / self.dim
            if abs(mean - self.bits) > 1e-6:
                raise ValueError(f"tiers {tiers} average {mean} bits, not bits={self.bits}")
            for n, b in tiers:
                CodecSpec(n, b, grid=self.grid)
            return
        n_high = (self.mse_bits - math.floor(self.mse_bits)) * self.dim
        if abs(n_high - round(n_high)) > 1e-6:
            raise ValueError(f"bits={self.bits} cannot be split exactly over {self.dim} channels")

    @property
    def mse_bits(self) -> float:
        return self.bits - 1 if self.kind == "prod" else self.bits

    @cached_property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        """(first channel, channel count) of each separately rotated and normed block."""
        if not self.tiers:
            return ((0, self.dim),)
        starts = np.cumsum([0] + [n for n, _ in self.tiers])
        return tuple((int(a), n) for a, (n, _) in zip(starts, self.tiers))

    @cached_property
    def groups(self) -> tuple[tuple[int, int, int], ...]:
        """(first channel, channel count, bits) of each codebook group of rotated channels."""
        if self.tiers:
            return tuple(
                (start + first, count, bits)
                for (start, n), (_, b) in zip(self.blocks, self.tiers)
                for first, count, bits in CodecSpec(n, b, grid=self.grid).groups
            )
        low = math.floor(self.mse_bits)
        n_high = round((self.mse_bits - low) * self.dim)
        groups = []
        if n_high:
            groups.append((0, n_high, low + 1))
        if self.dim - n_high:
            groups.append((n_high, self.dim - n_high, low))
        if self.grid == "uniform":  # at most 128 channels a group: what one qmm group takes
            groups = [
                (first + a, min(128, count - a), bits)
                for first, count, bits in groups
                for a in range(0, count, 128)
            ]
        return tuple(groups)

    @property
    def qmm_ready(self) -> bool:
        """Uniform grid with every group one ``mx.quantized_matmul`` group: 32, 64 or 128
        channels at 2, 3, 4, 5, 6 or 8 bits (attention then reads the codes without decoding)."""
        return self.grid == "uniform" and all(
            count in QMM_GROUPS and bits in QMM_BITS for _, count, bits in self.groups
        )

    @cached_property
    def group_steps(self) -> tuple[float, ...]:
        """Uniform grid: each group's step (unit-vector coordinate scale of its block's law)."""
        return tuple(
            uniform_step(block_dim, bits)
            for (_, _, bits), (_, block_dim) in zip(self.groups, self.group_block)
        )

    @cached_property
    def group_block(self) -> tuple[tuple[int, int], ...]:
        """For each group: (index of its block, size of that block: its codebook's dimension)."""
        return tuple(
            next((i, n) for i, (a, n) in enumerate(self.blocks) if a <= first < a + n)
            for first, _, _ in self.groups
        )

    @cached_property
    def rotator(self) -> Rotation | BlockRotation:
        def one(dim: int, seed: int) -> Rotation:
            if self.rotation == "auto":
                return default_rotation(dim, seed)
            return Rotation(dim, seed, self.rotation)

        if not self.tiers:
            return one(self.dim, self.seed)
        return BlockRotation(
            tuple((start, one(n, self.seed + i)) for i, (start, n) in enumerate(self.blocks))
        )

    @property
    def qjl_scale(self) -> float:
        d = self.dim
        if self.qjl == "gaussian":
            return math.sqrt(math.pi / 2) / d
        # S = sqrt(d) Q: each row is uniform on the sphere of radius sqrt(d), and
        # E[sign(u.r) u.q] = E|u_1| <q, r/|r|> with E|u_1| = G(d/2) / (sqrt(pi) G((d+1)/2)).
        mean_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
        return 1.0 / (d * math.sqrt(d) * mean_abs)

    def words(self) -> list[int]:
        return [packed_words(count, bits) for _, count, bits in self.groups]


@dataclass(frozen=True)
class BlockRotation:
    """Block-diagonal rotation: each tier of channels rotated on its own (still orthogonal)."""

    parts: tuple[tuple[int, Rotation], ...]  # (first channel, rotation of the block)

    def _apply(self, x: mx.array, inverse: bool) -> mx.array:
        return mx.concatenate(
            [(r.inverse if inverse else r.forward)(x[..., a : a + r.dim]) for a, r in self.parts],
            axis=-1,
        )

    def forward(self, x: mx.array) -> mx.array:
        return self._apply(x, False)

    def inverse(self, y: mx.array) -> mx.array:
        return self._apply(y, True)


def _block_norms(x: mx.array, spec: CodecSpec) -> mx.array:
    """(..., blocks) Euclidean norm of each block of channels."""
    return mx.concatenate(
        [mx.sqrt(mx.sum(x[..., a : a + n] ** 2, axis=-1, keepdims=True)) for a, n in spec.blocks],
        axis=-1,
    )


@lru_cache(maxsize=32)
def _qjl_matrix(dim: int, seed: int, kind: str) -> mx.array:
    rng = np.random.default_rng(seed + 7919)
    g = rng.standard_normal((dim, dim))
    if kind == "orthogonal":
        q, r = np.linalg.qr(g)
        g = q * np.sign(np.diag(r))[None, :] * math.sqrt(dim)
    return mx.array(g.astype(np.float32))


@dataclass
class Encoded:
    """Compressed vectors: every field keeps the leading axes of the input."""

    codes: tuple[mx.array, ...]  # per group (..., words) uint32
    norms: mx.array  # (..., blocks) float16: |x| (or |x| / |y_hat| with norm correction)
    signs: mx.array | None = None  # prod: (..., d/32) uint32, QJL sign bits
    res_norms: mx.array | None = None  # prod: (..., 1) float16 residual norms

    def arrays(self) -> list[mx.array]:
        out = [*self.codes, self.norms]
        if self.signs is not None:
            out += [self.signs, self.res_norms]
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.norms.shape[:-1])


def _nearest(y: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """Index of the nearest centroid: binary search over sorted boundaries, O(bits) gathers."""
    idx = mx.zeros(y.shape, dtype=mx.uint32)
    for level in range(bits):
        step = 1 << (bits - 1 - level)
        candidate = idx + step
        idx = mx.where(y > boundaries[candidate - 1], candidate, idx)
    return idx


def rotate(x: mx.array, spec: CodecSpec) -> mx.array:
    return spec.rotator.forward(x)


def unrotate(y: mx.array, spec: CodecSpec) -> mx.array:
    return spec.rotator.inverse(y)


def encode(x: mx.array, spec: CodecSpec, check_finite: bool = True) -> Encoded:
    """(..., d) -> Encoded."""
    if x.shape[-1] != spec.dim:
        raise ValueError(f"expected vectors of size {spec.dim}, got shape {tuple(x.shape)}")
    x = x.astype(mx.float32)
    norm = _block_norms(x, spec)  # (..., blocks)
    if check_finite:
        if not mx.all(mx.isfinite(x)).item():
            raise ValueError("cannot encode non-finite values (NaN or inf)")
        if mx.max(norm).item() > FP16_MAX:
            raise ValueError(f"vector norm above {FP16_MAX} does not fit the float16 norm")
    rotated, safe = rotate(x, spec), mx.maximum(norm, 1e-30)  # each block is rotated on its own
    codes, units, parts = [], [], []
    for (start, count, bits), (block, block_dim) in zip(spec.groups, spec.group_block):
        unit = rotated[..., start : start + count] / safe[..., block : block + 1]
        if spec.grid == "uniform":  # levels (k - centre) * step: round, then clip
            step, centre = uniform_step(block_dim, bits), (2**bits - 1) / 2
            level = mx.clip(mx.round(unit / step + centre), 0, 2**bits - 1)
            idx = level.astype(mx.uint32)
            parts.append((level - centre) * step)
        else:
            cb = grid_codebook(block_dim, bits)
            idx = _nearest(unit, cb.boundaries_mx, bits)
            parts.append(cb.centroids_mx[idx])
        codes.append(pack(idx, bits))
        units.append(unit)
    y_hat = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    if spec.kind == "mse":
        if spec.norm_correction:
            norm = norm / mx.maximum(_block_norms(y_hat, spec), 1e-30)
        return Encoded(tuple(codes), norm.astype(mx.float16))
    y = units[0] if len(units) == 1 else mx.concatenate(units, axis=-1)  # prod: the unit vector
    residual = y - y_hat
    projected = residual @ _qjl_matrix(spec.dim, spec.seed, spec.qjl).T
    signs = pack((projected > 0).astype(mx.uint32), 1)
    res_norm = mx.sqrt(mx.sum(residual * residual, axis=-1, keepdims=True))
    return Encoded(tuple(codes), norm.astype(mx.float16), signs, res_norm.astype(mx.float16))


def decode_rotated(enc: Encoded, spec: CodecSpec) -> mx.array:
    """Encoded -> (..., d) float32 reconstruction in the ROTATED domain (norm applied).

    The attention kernel works here: <R q, R x> = <q, x>, and a weighted sum of rotated values
    is rotated back once at the end.
    """
    parts = []
    norms = enc.norms.astype(mx.float32)
    tiered = len(spec.blocks) > 1
    for code, (_, count, bits), (block, block_dim) in zip(enc.codes, spec.groups, spec.group_block):
        index = unpack(code, bits, count)
        if spec.grid == "uniform":
            step = uniform_step(block_dim, bits)
            part = (index.astype(mx.float32) - (2**bits - 1) / 2) * step
        else:
            part = grid_codebook(block_dim, bits).centroids_mx[index]
        parts.append(part * norms[..., block : block + 1] if tiered else part)
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    if spec.kind == "prod":
        sign = unpack(enc.signs, 1, spec.dim).astype(mx.float32) * 2 - 1
        correction = sign @ _qjl_matrix(spec.dim, spec.seed, spec.qjl)  # S^T sign(S r)
        y = y + enc.res_norms.astype(mx.float32) * spec.qjl_scale * correction
    return y if tiered else y * norms


def decode(enc: Encoded, spec: CodecSpec) -> mx.array:
    """Encoded -> (..., d) float32 in the original domain."""
    return unrotate(decode_rotated(enc, spec), spec)


def bits_per_channel(spec: CodecSpec, include_norms: bool = True) -> float:
    """Bits actually stored per channel, measured from the nbytes of an encoded batch."""
    enc = encode(mx.ones((64, spec.dim)), spec)
    arrays = (
        enc.arrays()
        if include_norms
        else [*enc.codes] + ([enc.signs] if enc.signs is not None else [])
    )
    return sum(a.nbytes for a in arrays) * 8 / (64 * spec.dim)


def slice_encoded(enc: Encoded, index) -> Encoded:
    """The same index applied to every field's leading axes (e.g. a block of tokens)."""
    return Encoded(
        tuple(c[index] for c in enc.codes),
        enc.norms[index],
        None if enc.signs is None else enc.signs[index],
        None if enc.res_norms is None else enc.res_norms[index],
    )
